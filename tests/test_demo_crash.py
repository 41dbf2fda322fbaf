"""The demo when an engine dies under load: a prompt, clear stop, nothing left running.

A real aggregated deployment under aiperf load, and its vLLM worker killed with SIGILL (what
the AMX crash of issue 11 looked like); the demo must exit non-zero within 30 s of the death
with one Error line naming the process and the signal, and leave no process of its own.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from proctools import IsolatedRun

from kvprof import semconv
from kvprof.analysis.loaders.traces import load_spans

REPO = Path(__file__).resolve().parents[1]
AIPERF = REPO / ".venv-aiperf" / "bin" / "aiperf"

pytestmark = [pytest.mark.demo, pytest.mark.timeout(900)]


def _find(root: int, name: str) -> psutil.Process | None:
    try:
        for proc in psutil.Process(root).children(recursive=True):
            try:
                if proc.name().startswith(name) or name in " ".join(proc.cmdline()[:3]):
                    return proc
            except psutil.Error:
                continue
    except psutil.Error:
        return None
    return None


@pytest.mark.skipif(not AIPERF.exists(), reason="aiperf venv missing: make .venv-aiperf/.installed")
def test_a_worker_killed_under_load_stops_the_demo_fast_and_clean(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, COLUMNS="160", KVPROF_DEMO_LOG="WARNING")
    run = IsolatedRun([sys.executable, str(REPO / "demo" / "run_demo.py"), "--out", str(out),
                       "--stack", "vllm", "--skip-microbench", "--concurrency", "1",
                       "--requests", "400",
                       "--input-tokens", "256", "--output-tokens", "64"], env=env, cwd=REPO)
    killed: dict = {}

    def finished_one() -> bool:
        """A request has finished and its span is out (what the crash must not lose)."""
        for f in (out / "traces" / "agg").glob("*.jsonl"):
            try:
                if semconv.SPAN_REQUEST.encode() + b'"' in f.read_bytes():
                    return True
            except OSError:
                continue
        return False

    def kill_when_loaded() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and run.popen.poll() is None:
            # Load is on once aiperf runs and a request has come back (on a loaded machine
            # aiperf takes a while to send its first); then the aggregated server's worker
            # dies.
            if _find(run.popen.pid, "aiperf") is not None and finished_one():
                time.sleep(2)
                worker = _find(run.popen.pid, "VLLM::Worker")
                if worker is not None:
                    killed["pid"], killed["t"] = worker.pid, time.monotonic()
                    os.kill(worker.pid, signal.SIGILL)
                    return
            time.sleep(1)

    thread = threading.Thread(target=kill_when_loaded, daemon=True)
    thread.start()
    done = run.wait(timeout=800)
    ended = time.monotonic()
    assert killed, "the worker was never found under load:\n" + done.stdout[-3000:] + \
        done.stderr[-2000:]
    assert done.returncode != 0
    assert ended - killed["t"] < 30, f"the demo took {ended - killed['t']:.0f} s to stop"
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("Error: vllm-agg (pid ")
    assert "during 'Aggregated deployment under load'" in errors[0]
    assert f"(pid {killed['pid']}" in errors[0] and "died from SIGILL" in errors[0], errors[0]
    assert "Hint: See " in done.stderr and "Traceback" not in done.stderr
    assert not run.leftovers, f"processes left running: {run.leftovers}"
    # kvprof attach said which requests the death hit, as the API server (which outlived
    # the engine) saw them: exact, not a snapshot of the last flush ...
    log = (out / "logs" / "vllm-agg.log").read_text(errors="replace")
    assert f"kvprof: VLLM::Worker (pid {killed['pid']}, vllm-agg, aggregated) died from " \
           "SIGILL" in log
    (line,) = [ln for ln in log.splitlines() if ln.startswith("kvprof: requests in flight: ")]
    inflight = [r for r in line.split(": ", 2)[2].split(";")[0].split(", ") if r.startswith(
        "cmpl-")]
    assert inflight, line
    # ... the API server, which outlived it, ended their spans with an error and the reason,
    # and what was recorded before the crash is kept (their hand-off to the EngineCore, and
    # the requests finished before).
    spans = load_spans(out / "traces" / "agg").spans
    for rid in inflight:  # the engine call's id; the spans carry the EngineCore's (+suffix)
        mine = spans[spans["request_id"].astype(str).str.startswith(rid)]
        (top,) = mine[mine["name"] == semconv.SPAN_API_REQUEST].itertuples()
        assert top.status_code == 2 and top.status_message, top
        assert semconv.SPAN_API_TO_CORE in set(mine["name"]), sorted(set(mine["name"]))
    assert (spans["name"] == semconv.SPAN_REQUEST).sum() >= 1
