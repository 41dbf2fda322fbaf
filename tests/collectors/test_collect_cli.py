"""`kvprof collect` through the real entry point: --once, the daemon, signals, faults, usage."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from collect_paths import IB_SYSFS

from kvprof import semconv
from kvprof.collectors.base import SampleSet
from kvprof.collectors.daemon import CollectorLoop, Scheduled
from kvprof.collectors.parquet_schema import read_samples

REPO = Path(__file__).resolve().parents[2]


def kvprof(*args, **kw):
    return subprocess.run([sys.executable, "-m", "kvprof", "collect", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_once_json_on_this_machine():
    run = kvprof("--once", "--format", "json", "--interval", "0.05")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    cols = doc["collectors"]
    assert "NVML library not found" in cols["nvml"]["no_data"][0]["reason"]
    assert "no InfiniBand/RoCE devices" in cols["infiniband"]["no_data"][0]["reason"]
    host = {s["metric"]: s["value"] for s in cols["host"]["samples"]}
    assert host[semconv.METRIC_HOST_MEMORY_TOTAL] == psutil.virtual_memory().total
    assert 0.0 <= host[semconv.METRIC_HOST_CPU] <= 1.0  # two readings: a real utilisation
    assert cols["host"]["ok"] and not cols["nvml"]["ok"]
    assert "Traceback" not in run.stderr


def test_once_prom_with_ib_fixture_and_rates():
    run = kvprof("--once", "--format", "prom", "--no-nvml", "--sysfs", str(IB_SYSFS))
    assert run.returncode == 0, run.stderr
    assert 'kvprof_ib_port_xmit_bytes_total{device="mlx5_0",port="1"} 1.1523046035392e+13' \
        in run.stdout
    # the fixture does not change between the two readings: rate 0, never absent or negative
    assert 'kvprof_ib_port_xmit_throughput_bytes_per_second{device="mlx5_0",port="1"} 0.0' \
        in run.stdout
    assert 'reason="NVML disabled by --no-nvml"' in run.stdout


@pytest.mark.parametrize("args,needle", [
    (["--once", "--format", "xml"], "--format must be json or prom"),
    (["--listen", "nonsense", "--duration", "0"], "is not HOST:PORT"),
    (["--interval", "0"], "--interval must be > 0"),
])
def test_bad_usage_exit_2(args, needle):
    run = kvprof(*args)
    assert run.returncode == 2
    assert run.stderr.startswith("Error: ") and needle in run.stderr and "Hint:" in run.stderr
    assert "Traceback" not in run.stderr


def _start(tmp_path, *extra):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvprof", "collect", "--listen", f"127.0.0.1:{port}",
         "--interval", "0.05", "--no-nvml", "--sysfs", str(IB_SYSFS), *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(base + "/readyz", timeout=1).status == 200:
                return proc, base
        except OSError:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
    proc.kill()
    raise AssertionError("collector never became ready")


def _wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met")


def test_daemon_serves_metrics_and_sigterm_finishes_file(tmp_path):
    out = tmp_path / "samples"
    proc, base = _start(tmp_path, "--output", str(out), "--rotate", "3600")
    try:
        body = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        assert 'kvprof_collector_success{collector="infiniband"} 1.0' in body
        assert "kvprof_ib_port_xmit_bytes_total" in body
        _wait_for(lambda: list(out.glob("*.parquet.tmp")))  # a file is being written
        assert not list(out.glob("*.parquet"))  # nothing under a final name yet
        # A rate needs two readings: then at least two ticks went to the sinks (a loaded
        # machine can make the second tick late).
        _wait_for(lambda: "kvprof_ib_port_xmit_throughput_bytes_per_second" in urllib.request
                  .urlopen(base + "/metrics", timeout=5).read().decode())
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "SIGTERM received" in stderr and "Traceback" not in stderr
    assert not list(out.glob("*.tmp"))
    (final,) = out.glob("*.parquet")
    df = read_samples(final)
    assert (df.metric == semconv.METRIC_IB_XMIT).sum() >= 4 * 2  # 4 ports, >= 2 ticks


def test_sigkill_leaves_no_partial_file_under_final_name(tmp_path):
    out = tmp_path / "samples"
    proc, _ = _start(tmp_path, "--output", str(out), "--rotate", "1")
    try:
        _wait_for(lambda: len(list(out.glob("*.parquet"))) >= 1)
        _wait_for(lambda: list(out.glob("*.parquet.tmp")))
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    for final in out.glob("*.parquet"):
        assert len(read_samples(final)) > 0  # every final-named file is whole


def test_unwritable_output_fails_at_start(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    r = subprocess.run([sys.executable, "-m", "kvprof", "collect", "--listen", "", "--no-nvml",
                        "--output", str(blocker / "samples"), "--duration", "1"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("Error:")]
    assert len(errors) == 1 and str(blocker) in errors[0] and "is a file" in errors[0]
    assert "Hint:" in r.stderr and "Traceback" not in r.stderr


def test_output_lost_mid_run_keeps_serving_then_exits_nonzero(tmp_path):
    out = tmp_path / "samples"
    proc, base = _start(tmp_path, "--output", str(out), "--rotate", "3600")
    try:
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        reader.start()
        shutil.rmtree(out)
        out.write_text("a file where the folder was")
        time.sleep(1)
        body = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        assert "kvprof_ib_port_xmit_bytes_total" in body  # still serving
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 1  # files asked for were not written
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any("cannot write Parquet file" in x for x in lines), lines
    errors = [x for x in lines if x.startswith("Error:")]
    assert len(errors) == 1 and "could not be written" in errors[0], lines
    assert any(x.startswith("Hint:") for x in lines)


class _Clocked:
    name = "clocked"

    def __init__(self, cost_s: float, slow_at: int | None = None):
        self.cost_s = cost_s
        self.slow_at = slow_at
        self.times: list[float] = []

    def sample(self) -> SampleSet:
        self.times.append(time.monotonic())
        time.sleep(self.cost_s * (6 if len(self.times) - 1 == self.slow_at else 1))
        return SampleSet(self.name, time.time())


def test_loop_is_drift_free():
    sampler = _Clocked(cost_s=0.008)
    loop = CollectorLoop([Scheduled(sampler)], interval=0.025, sinks=[])
    loop.run(threading.Event(), duration=0.6)
    start = sampler.times[0]
    # With sleep(interval) after each sample the 24th tick would be ~190 ms late.
    offsets = [t - (start + k * 0.025) for k, t in enumerate(sampler.times)]
    assert 20 <= len(sampler.times) <= 25
    assert max(offsets) < 0.06, offsets


def test_loop_skips_late_ticks_instead_of_bunching():
    sampler = _Clocked(cost_s=0.01, slow_at=2)  # tick 2 takes 60 ms = 2.4 intervals
    loop = CollectorLoop([Scheduled(sampler)], interval=0.025, sinks=[])
    loop.run(threading.Event(), duration=0.4)
    assert loop.late_ticks >= 2
    gaps = [b - a for a, b in zip(sampler.times, sampler.times[1:], strict=False)]
    assert min(gaps[3:]) > 0.012  # after the overrun: back on the grid, no burst


def test_slow_samplers_run_at_their_own_rate():
    fast, slow = _Clocked(0.0), _Clocked(0.0)
    loop = CollectorLoop([Scheduled(fast), Scheduled(slow, every_s=0.1)], 0.025, sinks=[])
    for k in range(8):
        loop.tick(k)
    assert len(fast.times) == 8 and len(slow.times) == 2


def test_help_mentions_port_choice():
    run = kvprof("--help")
    assert run.returncode == 0 and "9402" in run.stdout and "dcgm-exporter" in run.stdout
