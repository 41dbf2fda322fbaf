"""Sinks: golden /metrics for a fixture node, Parquet files (rotation, atomicity, loader)."""

from __future__ import annotations

import os
import re
import urllib.request

import pyarrow.parquet as pq
import pytest
from collect_paths import FIXTURES, T4_UUID
from fake_nvml import FakeNvml

from kvprof import semconv
from kvprof.collectors.base import NoData, Sample, SampleSet
from kvprof.collectors.daemon import CollectorLoop, build_samplers
from kvprof.collectors.parquet_schema import arrow_schema, read_samples
from kvprof.collectors.parquet_sink import ParquetSink
from kvprof.collectors.prometheus_sink import LatestSamplesCollector, MetricsServer, render_text
from kvprof.errors import BadInputError

GOLDEN = FIXTURES / "metrics_golden.prom"
NODE = "gke-k9s-default-pool-0fa2fb89-lbtf"


def fixture_node(fixture_gpus, ib_tree, kubelet_socket, api_server, tmp_path):
    fake = FakeNvml(fixture_gpus)
    fake.advance(10.0)
    proc = tmp_path / "proc"
    (proc / "5762").mkdir(parents=True)  # the T4's recorded compute PID, in the nginx pod
    (proc / "5762" / "cgroup").write_text(
        "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
        "91bb1cf2_2c03_11ea_883f_42010a800044.slice/cri-containerd-" + "b" * 64 + ".scope\n")
    schedule, _ = build_samplers(sysfs=ib_tree, proc=proc, kubelet_socket=kubelet_socket,
                                 nvml=fake, pod_source=api_server(200).pod_source(),
                                 node=NODE, with_host=False)
    return CollectorLoop(schedule, 0.1, sinks=[])


def test_metrics_golden(fixture_gpus, ib_tree, kubelet_socket, api_server, tmp_path):
    latest = LatestSamplesCollector()
    for result in fixture_node(fixture_gpus, ib_tree, kubelet_socket, api_server,
                               tmp_path).tick(everything=True):
        latest.update(result)
    text = render_text(latest).decode()
    # Durations are timings; everything else is determined by the recorded data.
    text = re.sub(r"^(kvprof_collector_duration_seconds\{[^}]*\}) .*$", r"\1 <seconds>", text,
                  flags=re.M)
    if os.environ.get("KVPROF_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
    # the contract names, spot-checked independently of the golden file
    assert 'kvprof_ib_port_xmit_bytes_total{device="mlx4_0",port="1"} 1.0603645318e+11' in text
    assert f'kvprof_gpu_power_watts{{gpu="0",uuid="{T4_UUID}"}} 26.78' in text
    assert "# TYPE kvprof_nvlink_tx_bytes_total" not in text  # no NVLink: absent, not 0


def test_metrics_server_paths():
    latest = LatestSamplesCollector()
    server = MetricsServer(latest, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/readyz", timeout=5)
        assert err.value.code == 503
        latest.update(SampleSet("host", 1.0, [Sample(semconv.METRIC_HOST_CPU, 0.5, "host", {})]))
        latest.ready.set()
        assert urllib.request.urlopen(base + "/readyz", timeout=5).status == 200
        assert urllib.request.urlopen(base + "/healthz", timeout=5).read() == b"ok\n"
        body = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        assert "kvprof_host_cpu_utilization_ratio 0.5" in body
        assert 'kvprof_collector_success{collector="host"} 1.0' in body
    finally:
        server.stop()


def _set(ts, collector="infiniband", value=4.0, changed=True):
    return SampleSet(collector, ts, [
        Sample(semconv.METRIC_IB_XMIT, value, "mlx5_0/1", {"device": "mlx5_0", "port": "1"},
               counter=True)], [NoData("mlx5_0/1", semconv.METRIC_IB_RCV, "file missing")],
        duration_s=0.001, changed=changed)


def test_parquet_rotation_schema_and_loader(tmp_path):
    sink = ParquetSink(tmp_path, "node-a", rotate_s=60.0, flush_rows=3)
    base = 1_700_000_040.0  # a multiple of 60: windows [040, 100) and [100, 160)
    sink.write(_set(base, collector="placement"), sticky=True)
    for i in range(5):
        sink.write(_set(base + i * 20, value=float(i)))
        sink.write(_set(base + i * 20, collector="placement", changed=False), sticky=True)
    sink.finish()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["kvprof-samples-node-a-20231114T221400Z.parquet",
                     "kvprof-samples-node-a-20231114T221500Z.parquet"]
    assert pq.read_schema(tmp_path / names[0]).equals(arrow_schema(), check_metadata=True)
    df = read_samples(tmp_path)
    xmit = df[(df.metric == semconv.METRIC_IB_XMIT) & (df.collector == "infiniband")]
    assert list(xmit.value) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert xmit.iloc[0].labels == {"device": "mlx5_0", "port": "1"}
    assert str(xmit.ts.dtype) == "datetime64[ns, UTC]"
    nodata = df[df.value.isna()]
    assert set(nodata.metric) == {semconv.METRIC_IB_RCV}
    assert all(labels == {"reason": "file missing"} for labels in nodata.labels)
    # the unchanged placement sets are not rows; the first is re-written in the second file
    placement = df[(df.collector == "placement") & (df.metric == semconv.METRIC_IB_XMIT)]
    assert len(placement) == 2
    assert set(df.metric) >= {semconv.METRIC_COLLECTOR_DURATION, semconv.METRIC_COLLECTOR_SUCCESS}


def test_loader_rejects_truncated_and_garbage(tmp_path):
    sink = ParquetSink(tmp_path, "n", rotate_s=60.0)
    sink.write(_set(1_700_000_040.0))
    path = sink.finish()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError, match="cannot read Parquet"):
        read_samples(path)
    path.write_text("{not parquet")
    with pytest.raises(BadInputError):
        read_samples(tmp_path)
    with pytest.raises(BadInputError, match="no such file"):
        read_samples(tmp_path / "missing")


def test_unwritable_directory_then_recovers(tmp_path, caplog):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the directory should be")
    sink = ParquetSink(blocker, "n", rotate_s=60.0, flush_rows=1)
    sink.write(_set(1_700_000_040.0))
    sink.write(_set(1_700_000_050.0))
    assert sink.write_errors == 1  # reported once per file, not per row
    assert "cannot write Parquet file" in caplog.text
    blocker.unlink()
    blocker.mkdir()
    sink.write(_set(1_700_000_100.0))  # next window: tried again
    done = sink.finish()
    assert done is not None and done.exists()
    assert list(read_samples(done).value.dropna())[0] == 4.0


def test_clock_stepping_back_never_overwrites_a_file(tmp_path):
    sink = ParquetSink(tmp_path, "n", rotate_s=60.0)
    sink.write(_set(1_700_000_100.0, value=1.0))
    sink.write(_set(1_700_000_050.0, value=2.0))  # NTP stepped the clock back a window
    sink.finish()
    (only,) = list(tmp_path.iterdir())
    assert list(read_samples(only).value.dropna())[:1] == [1.0]
    assert len(read_samples(only).query("metric == @semconv.METRIC_IB_XMIT")) == 2
