"""Loaders of the other inputs: collector Parquet, aiperf exports, microbench JSON, vLLM logs
and vllm:nixl_* Prometheus samples."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from conftest import FIXTURES

from kvprof import semconv as sc
from kvprof.analysis.loaders.aiperf import load_aiperf_records, load_aiperf_summary
from kvprof.analysis.loaders.microbench_results import load_microbench
from kvprof.analysis.loaders.samples import SAMPLE_COLUMNS, load_samples, placement_records
from kvprof.analysis.loaders.vllm_metrics import (
    nixl_summary,
    parse_kv_transfer_log,
    parse_nixl_prometheus,
)
from kvprof.errors import BadInputError

AIPERF = FIXTURES / "aiperf_c2"


# --- collector samples -----------------------------------------------------------------------

def test_samples_directory_tolerates_files_being_written_and_broken_ones(golden, tmp_path):
    d = tmp_path / "samples"
    shutil.copytree(golden.samples, d)
    good = load_samples(d)
    (d / "truncated.parquet").write_bytes((d / "gpu-node-1.parquet").read_bytes()[:300])
    (d / ".gpu-node-3.parquet").write_bytes(b"half")  # temp name: ignored
    (d / "gpu-node-4.parquet.tmp").write_bytes(b"half")
    pd.DataFrame({"ts": [1.0], "value": [2.0]}).to_parquet(d / "other.parquet")
    load = load_samples(d)
    assert len(load.samples) == len(good.samples) and len(load.files) == 2
    skipped = {p.split("/")[-1]: why for p, why in load.skipped}
    assert set(skipped) == {"truncated.parquet", "other.parquet"}
    assert "not a readable Parquet" in skipped["truncated.parquet"]
    assert "missing columns" in skipped["other.parquet"]
    assert list(load.samples.columns) == list(SAMPLE_COLUMNS)


def test_samples_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="no \\*.parquet"):
        load_samples(tmp_path)
    (tmp_path / "x.parquet").write_text("nope")
    with pytest.raises(BadInputError, match="x.parquet") as err:
        load_samples(tmp_path)
    assert err.value.exit_code == 3


def test_timestamp_column_and_placement_rows(tmp_path):
    df = pd.DataFrame({
        "ts": pd.to_datetime([1_761_000_000.5], unit="s", utc=True),
        "node": ["gpu-node-1"], "collector": ["placement"], "entity": ["pod-a"],
        "metric": [sc.METRIC_PLACEMENT_INFO], "value": [1.0],
        "labels": [json.dumps({"pod": "pod-a", "namespace": "ns", "node": "gpu-node-1",
                               "gpu_uuid": "GPU-1", "role": "decode", "numa_node": 1})]})
    df.to_parquet(tmp_path / "p.parquet")
    s = load_samples(tmp_path).samples
    assert s["ts"].iloc[0] == pytest.approx(1_761_000_000.5)
    rec = placement_records(s).iloc[0]
    assert (rec["pod"], rec["gpu_uuid"], rec["role"], rec["numa"]) == ("pod-a", "GPU-1",
                                                                      "decode", "1")


# --- aiperf -----------------------------------------------------------------------------------

def test_aiperf_real_records_match_its_own_summary():
    rec = load_aiperf_records(AIPERF)
    summary = load_aiperf_summary(AIPERF)
    assert len(rec) == 20
    assert rec["ttft_ms"].mean() == pytest.approx(summary["time_to_first_token"]["avg"])
    assert rec["request_latency_ms"].max() == pytest.approx(summary["request_latency"]["max"])
    assert rec["x_request_id"].iloc[0] == "8b02ce0c-69ad-4bbb-b846-bf2bdfec556b"
    assert rec["request_start_ns"].iloc[0] == 1795758395883239043


def test_aiperf_csv_and_json_summaries_agree(tmp_path):
    shutil.copy(AIPERF / "profile_export_aiperf.csv", tmp_path)
    from_csv = load_aiperf_summary(tmp_path)
    from_json = load_aiperf_summary(AIPERF / "profile_export_aiperf.json")
    for metric in ("time_to_first_token", "inter_token_latency", "request_latency"):
        for stat in ("avg", "p99"):
            assert from_csv[metric][stat] == pytest.approx(from_json[metric][stat], abs=0.01)
    assert from_csv["output_token_throughput"]["avg"] == pytest.approx(227.56, abs=0.01)


def test_aiperf_old_schema_keys_and_units_are_normalised(tmp_path):
    # aiperf 0.x wrote short keys; this record gives TTFT in ns and latency in seconds.
    (tmp_path / "profile_export.jsonl").write_text(json.dumps({
        "metadata": {"x_request_id": "abc", "timestamp_ns": 5},
        "metrics": {"ttft": {"value": 129811129, "unit": "ns"},
                    "request_latency": {"value": 0.305, "unit": "s"},
                    "itl": {"value": 29.2, "unit": "ms"}}}) + "\n")
    rec = load_aiperf_records(tmp_path).iloc[0]
    assert rec["ttft_ms"] == pytest.approx(129.811129)
    assert rec["request_latency_ms"] == pytest.approx(305.0)
    assert rec["itl_ms"] == pytest.approx(29.2)
    (tmp_path / "profile_export_aiperf.json").write_text(json.dumps(
        {"ttft": {"unit": "ns", "avg": 2e6, "p99": 3e6}}))
    assert load_aiperf_summary(tmp_path)["time_to_first_token"]["p99"] == pytest.approx(3.0)


@pytest.mark.parametrize("line, words", [
    ('{"metrics": {"foo": {"value": 1}}}', "unknown aiperf record schema"),
    ("not json", "is not JSON"),
    ('{"data": []}', "not an aiperf record"),
])
def test_aiperf_unknown_schema_fails_clearly(tmp_path, line, words):
    (tmp_path / "profile_export.jsonl").write_text(line + "\n")
    with pytest.raises(BadInputError, match=words) as err:
        load_aiperf_records(tmp_path)
    assert "profile_export.jsonl" in err.value.message


def test_aiperf_unknown_summary_schema(tmp_path):
    (tmp_path / "profile_export_aiperf.json").write_text('{"throughput": 3}')
    with pytest.raises(BadInputError, match="unknown aiperf summary schema"):
        load_aiperf_summary(tmp_path)


# --- microbench, vLLM ------------------------------------------------------------------------

def test_microbench_should_cost(golden, tmp_path):
    cost = load_microbench(golden.microbench)
    assert cost.total_ms == pytest.approx(1.5 + 11.0 + 1.6)
    assert cost.kv_bytes == 524_288_000
    (tmp_path / "m.json").write_text(json.dumps({"steps": {"total": {"median_ms": 9.0},
                                                           "x": {"median_ms": 1.0}}}))
    assert load_microbench(tmp_path / "m.json").total_ms == 9.0
    (tmp_path / "bad.json").write_text('{"geometry": {}}')
    with pytest.raises(BadInputError, match="steps"):
        load_microbench(tmp_path / "bad.json")


def test_vllm_kv_transfer_log_lines():
    df = parse_kv_transfer_log(FIXTURES / "kv_transfer_log_lines.txt")
    assert len(df) == 2
    second = df.iloc[1]
    assert second["transfers"] == 80 and second["avg_xfer_ms"] == pytest.approx(173.794)
    assert second["avg_descriptors"] == pytest.approx(40064.0)
    assert df.iloc[0]["throughput_mb_s"] == pytest.approx(7097.952)


def test_vllm_nixl_prometheus_samples(tmp_path):
    # Rendered by prometheus_client with the names and kinds vLLM's NixlPromMetrics registers.
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    reg = CollectorRegistry()
    xfer = Histogram("vllm:nixl_xfer_time_seconds", "NIXL transfer duration", ["engine"],
                     registry=reg, buckets=(0.01, 0.1, 1.0))
    sent = Histogram("vllm:nixl_bytes_transferred", "bytes per transfer", ["engine"],
                     registry=reg, buckets=(1e6, 1e9))
    failed = Counter("vllm:nixl_num_failed_transfers", "failed", ["engine"], registry=reg)
    for seconds in (0.1, 0.3):
        xfer.labels("0").observe(seconds)
        sent.labels("0").observe(524_288_000)
    failed.labels("0").inc(2)
    (tmp_path / "metrics.txt").write_bytes(generate_latest(reg))
    summary = nixl_summary(parse_nixl_prometheus(tmp_path / "metrics.txt"))
    assert summary["vllm:nixl_xfer_time_seconds (mean)"] == pytest.approx(0.2)
    assert summary["vllm:nixl_bytes_transferred (mean)"] == pytest.approx(524_288_000)
    assert summary["vllm:nixl_num_failed_transfers_total"] == 2
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(BadInputError, match="no vllm:nixl"):
        parse_nixl_prometheus(tmp_path / "empty.txt")
