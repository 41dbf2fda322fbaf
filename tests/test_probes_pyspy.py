"""`kvprof attach --pid` summaries of real py-spy files: per thread, real sample counts, waits."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kvprof.errors import BadInputError
from kvprof.probes.phases import (
    PHASE_IDLE,
    PHASE_KV_CONNECTOR,
    PHASE_MODEL_FORWARD,
    PHASE_OTHER,
    PHASE_SAMPLING,
    PHASE_SCHEDULER,
    PHASES,
    Frame,
    classify_stack,
    wait_site,
)
from kvprof.probes.pyspy import (
    _pyspy_report,
    load_speedscope,
    render_table,
    summarize_profile,
    write_collapsed,
)

FIXTURES = Path(__file__).parent / "fixtures" / "probes"
WORKER, ENGINE_CORE = 7502, 7403  # the pids the fixtures were recorded from


def summary(name: str, pid: int) -> dict:
    threads, tool = load_speedscope(FIXTURES / f"{name}.speedscope.json")
    return summarize_profile(threads, pid, duration=3, rate=100, tool=tool)


def by_name(s: dict) -> dict[str, dict]:
    return {t["name"]: t for t in s["threads"]}


def share(thread: dict, phase: str) -> float:
    return thread["phases"][phase]["share"]


def test_threads_keep_their_own_real_sample_counts():
    threads, tool = load_speedscope(FIXTURES / "vllm_worker_busy.speedscope.json")
    assert tool == "py-spy@0.4.3"
    assert [(t.tid, t.name, len(t.stacks)) for t in threads] == [
        ("7502", "MainThread", 299), ("7576", "tqdm_monitor", 299),
        ("7581", "DeathPipeMonitor", 299)]
    s = summary("vllm_worker_busy", WORKER)
    assert s["sampling"]["instants"] == 299
    for t in s["threads"]:
        counts = [p["samples"] for p in t["phases"].values()]
        assert all(isinstance(c, int) for c in counts)
        assert sum(counts) == t["samples"] == 299  # samples, not seconds; not summed
        assert sum(p["share"] for p in t["phases"].values()) == pytest.approx(1.0, abs=1e-3)


def test_idle_worker_waits_for_work_in_message_queue_dequeue():
    s = summary("vllm_worker_idle", WORKER)
    main, *others = s["threads"]
    assert (main["name"], main["main"], main["idle"]) == ("MainThread", True, True)
    assert main["entry"] == "WorkerProc.worker_main"
    assert share(main, PHASE_IDLE) == 1.0
    assert main["waits"][0]["site"] == "MessageQueue.dequeue <- WorkerProc.worker_busy_loop"
    threads = by_name(s)
    assert threads["DeathPipeMonitor"]["idle"] and not threads["DeathPipeMonitor"]["main"]
    assert threads["DeathPipeMonitor"]["waits"][0]["site"].startswith("_ConnectionBase.recv")
    assert threads["tqdm_monitor"]["waits"][0]["site"] == "Event.wait <- TMonitor.run"


def test_busy_worker_shows_model_forward_on_its_main_thread_only():
    s = summary("vllm_worker_busy", WORKER)
    main, *others = s["threads"]
    assert main["name"] == "MainThread" and main["runs_model"]
    forward = share(main, PHASE_MODEL_FORWARD)
    assert forward >= 0.3  # 45 % when recorded
    assert forward > max(share(main, p) for p in (PHASE_SAMPLING, PHASE_SCHEDULER,
                                                  PHASE_OTHER, PHASE_KV_CONNECTOR))
    assert main["phases"][PHASE_SAMPLING]["samples"] > 0
    # Between steps the worker waits for the next one; that is idle, not "other".
    assert main["waits"][0]["site"] == "MessageQueue.dequeue <- WorkerProc.worker_busy_loop"
    assert share(main, PHASE_IDLE) >= 0.2
    assert all(t["idle"] and share(t, PHASE_IDLE) == 1.0 for t in others)


def test_engine_core_waits_for_requests_then_for_the_worker():
    idle = summary("vllm_enginecore_idle", ENGINE_CORE)
    main = idle["threads"][0]
    assert main["name"] == "MainThread" and share(main, PHASE_IDLE) == 1.0
    assert main["waits"][0]["site"] == "Queue.get <- EngineCoreProc._process_input_queue"
    threads = by_name(idle)
    assert threads["Thread-1 (process_input_sockets)"]["waits"][0]["site"] == (
        "Poller.poll <- EngineCoreProc.process_input_sockets")
    assert all(t["idle"] for t in idle["threads"])

    busy = summary("vllm_enginecore_busy", ENGINE_CORE)
    main = busy["threads"][0]
    sites = {w["site"] for w in main["waits"]}
    assert "MessageQueue.dequeue <- MultiprocExecutor.collective_rpc.<locals>.get_response" \
        in sites  # a step waiting for the worker's output
    assert "Queue.get <- EngineCoreProc._process_input_queue" in sites
    assert main["phases"][PHASE_SCHEDULER]["samples"] > 0
    # The executor only dispatches: the EngineCore never runs the model itself.
    assert main["phases"][PHASE_MODEL_FORWARD]["samples"] == 0 and not main["runs_model"]


def test_message_queue_spin_and_block_are_both_waiting():
    threads, _ = load_speedscope(FIXTURES / "workload_messagequeue.speedscope.json")
    fed = next(t for t in threads if t.name == "fed-reader")
    spins = [st for st in fed.stacks if st[-1].name == "sched_yield"]
    assert len(spins) > 100  # the busy-wait of MessageQueue.dequeue, as recorded
    assert {classify_stack(st) for st in spins} == {PHASE_IDLE}
    s = summary("workload_messagequeue", 14058)
    t = by_name(s)
    for name in ("fed-reader", "starved-reader"):
        assert t[name]["idle"] and share(t[name], PHASE_IDLE) == 1.0
        assert t[name]["waits"][0]["site"] == "MessageQueue.dequeue <- main.<locals>.reader_loop"
    assert s["threads"][0]["name"] == "MainThread"
    assert share(s["threads"][0], PHASE_MODEL_FORWARD) >= 0.5


def test_stdlib_waits_are_waiting():
    t = by_name(summary("workload_stdlib", 13888))
    assert t["fed-reader"]["waits"][0]["site"] == "Queue.get <- main.<locals>.reader_loop"
    assert t["monitor"]["waits"][0]["site"] == "Event.wait"
    assert share(t["MainThread"], PHASE_MODEL_FORWARD) >= 0.5


def _frames(*spec: tuple[str, str]) -> list[Frame]:
    return [Frame(name, f"/venv/lib/python3.11/site-packages/{file}", 1) for name, file in spec]


def test_rules_do_not_confuse_names_and_paths():
    yield_ = _frames(("WorkerProc.worker_busy_loop", "vllm/v1/executor/multiproc_executor.py"),
                     ("MessageQueue.dequeue",
                      "vllm/distributed/device_communicators/shm_broadcast.py"),
                     ("sched_yield", "vllm/distributed/utils.py"))
    assert classify_stack(yield_) == PHASE_IDLE  # not "scheduler"
    dispatch = _frames(("EngineCore.step", "vllm/v1/engine/core.py"),
                       ("MultiprocExecutor.execute_model",
                        "vllm/v1/executor/multiproc_executor.py"),
                       ("MessageQueue.enqueue",
                        "vllm/distributed/device_communicators/shm_broadcast.py"))
    assert classify_stack(dispatch) == PHASE_OTHER  # hands the step over; no forward here
    bookkeeping = _frames(("Worker.sample_tokens", "vllm/v1/worker/gpu_worker.py"),
                          ("GPUModelRunner.sample_tokens", "vllm/v1/worker/gpu_model_runner.py"),
                          ("GPUModelRunner._bookkeeping_sync",
                           "vllm/v1/worker/gpu_model_runner.py"))
    assert classify_stack(bookkeeping) == PHASE_SAMPLING
    kv_wait = _frames(("Worker.execute_model", "vllm/v1/worker/gpu_worker.py"),
                      ("NixlConnectorWorker.wait_for_save",
                       "vllm/distributed/kv_transfer/kv_connector/v1/nixl_connector.py"),
                      ("Event.wait", "threading.py"))
    kv_wait[-1] = Frame("Event.wait", "/usr/lib/python3.11/threading.py", 629)
    assert classify_stack(kv_wait) == PHASE_KV_CONNECTOR  # waiting for the KV is KV time
    assert wait_site(kv_wait) is None
    # An event loop is idle only when nothing runs on it.
    loop = [Frame("Runner.run", "/usr/lib/python3.11/asyncio/runners.py", 118)]
    assert classify_stack(loop) == PHASE_IDLE
    assert classify_stack([*loop, Frame("handle", "/app/server.py", 3)]) == PHASE_OTHER
    assert classify_stack([]) == PHASE_OTHER


def test_text_table_lists_threads_main_first():
    text = render_table(summary("vllm_worker_busy", WORKER))
    lines = text.splitlines()
    assert lines[0].startswith("pid 7502: 3 threads, 299 sampling instants")
    assert lines[1].startswith("MainThread (tid 7502) [main, runs the model]: 299 samples")
    for phase in PHASES:
        assert any(line.strip().startswith(phase) for line in lines[2:10])
    assert any(line.startswith("DeathPipeMonitor (tid 7581) [idle]: 299 samples, "
                               "idle / waiting 299 (100.0%)") for line in lines)
    assert "waits in MessageQueue.dequeue <- WorkerProc.worker_busy_loop" in text


def test_collapsed_stacks_count_samples_per_thread(tmp_path):
    threads, _ = load_speedscope(FIXTURES / "vllm_worker_idle.speedscope.json")
    out = tmp_path / "c.txt"
    write_collapsed(threads, out)
    rows = [line.rsplit(" ", 1) for line in out.read_text().splitlines()]
    assert sum(int(n) for _, n in rows) == 3 * 299
    assert {stack.split(";", 1)[0] for stack, _ in rows} == {
        'thread 7502 "MainThread"', 'thread 7576 "tqdm_monitor"',
        'thread 7581 "DeathPipeMonitor"'}


def test_pyspy_lag_and_error_lines_are_read():
    # py-spy 0.4.3's own lines, from the busy recordings
    text = ("py-spy> 1.26s behind in sampling, results may be inaccurate. Try reducing the "
            "sampling rate\npy-spy> 2.18s behind in sampling, results may be inaccurate. "
            "Try reducing the sampling rate\npy-spy> Wrote speedscope file to 'x.json'. "
            "Samples: 897 Errors: 100\n")
    assert _pyspy_report(text) == (100, 2.18)
    assert _pyspy_report("py-spy> Wrote speedscope file to 'x'. Samples: 9 Errors: 0") == (
        0, None)


def test_a_file_that_is_not_speedscope_is_bad_input(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"profiles": []}')
    with pytest.raises(BadInputError):
        load_speedscope(bad)


WORKLOAD = Path(__file__).parent / "probes" / "pyspy_workload.py"


@pytest.fixture
def message_queue_workload():
    """tests/probes/pyspy_workload.py with vLLM's real MessageQueue, in its own session."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    proc = subprocess.Popen([sys.executable, str(WORKLOAD), "90"], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"  # EOF if it died
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def test_attach_pid_on_a_step_loop_and_real_message_queue_waits(message_queue_workload,
                                                                 tmp_path):
    out = tmp_path / "spy"
    r = subprocess.run([sys.executable, "-m", "kvprof", "attach", "--pid",
                        str(message_queue_workload.pid), "--duration", "2", "--rate", "50",
                        "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    s = json.loads(next(out.glob("*.phases.json")).read_text())
    instants = s["sampling"]["instants"]
    assert instants > 0 and s["sampling"]["mode"] == "blocking"
    main, *others = s["threads"]
    assert main["name"] == "MainThread" and main["runs_model"]
    assert share(main, PHASE_MODEL_FORWARD) >= 0.3  # pure Python arithmetic: ~80-95 %
    t = by_name(s)
    assert {x["name"] for x in others} == {"fed-reader", "starved-reader", "monitor"}
    for x in s["threads"]:
        assert x["samples"] == instants  # one sample per instant per thread, never summed
    for name in ("fed-reader", "starved-reader"):
        assert t[name]["idle"] and share(t[name], PHASE_IDLE) >= 0.95
        assert t[name]["waits"][0]["site"] == "MessageQueue.dequeue <- main.<locals>.reader_loop"
    assert t["monitor"]["idle"]
    # The fed reader was caught spinning (sched_yield) and it still counted as waiting.
    collapsed = next(out.glob("*.collapsed.txt")).read_text().splitlines()
    assert any(line.startswith('thread ') and '"fed-reader"' in line and "sched_yield" in line
               for line in collapsed)
    threads_text = [line for line in r.stdout.splitlines()[1:]
                    if not line.startswith(("warning:", " "))]
    assert threads_text[0].startswith("MainThread (tid ")
