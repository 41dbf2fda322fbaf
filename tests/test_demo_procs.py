"""The demo's process manager: real processes, real signals, real HTTP readiness."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from demo.procs import DemoProcessError, ProcessManager, free_port, http_ok  # noqa: E402

# A parent that starts a grandchild, optionally in a session of its own (as `kvprof attach`
# does for the engine), and prints the grandchild's pid.
PARENT = textwrap.dedent("""
    import subprocess, sys, time, signal
    new_session = sys.argv[1] == "1"
    ignore_term = sys.argv[2] == "1"
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             start_new_session=new_session)
    print(child.pid, flush=True)
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes; psutil tells them apart.
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _grandchild_pid(log: Path, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text().strip() if log.exists() else ""
        if text:
            return int(text.splitlines()[0])
        time.sleep(0.05)
    raise AssertionError(f"parent never printed its child's pid; log: {log.read_text()!r}")


@pytest.mark.parametrize("new_session", [False, True], ids=["same-group", "own-session"])
def test_stop_reaches_grandchildren(tmp_path: Path, new_session: bool) -> None:
    pm = ProcessManager(tmp_path)
    proc = pm.start("parent", [sys.executable, "-c", PARENT, "1" if new_session else "0", "0"])
    grandchild = _grandchild_pid(proc.log_path)
    assert _alive(proc.pid) and _alive(grandchild)
    rc = pm.stop(proc, grace_s=5)
    assert rc == -signal.SIGTERM
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild), "grandchild survived stop()"
    assert pm.running() == []


def test_sigterm_ignored_means_sigkill_after_grace(tmp_path: Path) -> None:
    pm = ProcessManager(tmp_path)
    proc = pm.start("stubborn", [sys.executable, "-c", PARENT, "0", "1"])
    grandchild = _grandchild_pid(proc.log_path)
    started = time.monotonic()
    rc = pm.stop(proc, grace_s=1.0)
    assert rc == -signal.SIGKILL
    assert time.monotonic() - started >= 1.0
    time.sleep(0.2)
    assert not _alive(grandchild)


def test_env_override_and_removal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_TEST_REMOVE_ME", "x")
    pm = ProcessManager(tmp_path)
    code = ("import os; "
            "print(os.environ.get('DEMO_TEST_SET'), os.environ.get('DEMO_TEST_REMOVE_ME'))")
    proc = pm.start("env", [sys.executable, "-c", code],
                    env={"DEMO_TEST_SET": "yes", "DEMO_TEST_REMOVE_ME": None})
    assert pm.wait_exit(proc, 30) == 0
    assert proc.log_path.read_text().strip() == "yes None"


def test_wait_http_ok_against_a_real_server(tmp_path: Path) -> None:
    port = free_port()
    pm = ProcessManager(tmp_path)
    # The server only starts listening after a second, so the poll loop really polls.
    code = ("import time, http.server, functools; time.sleep(1); "
            f"http.server.ThreadingHTTPServer(('127.0.0.1', {port}), "
            "http.server.SimpleHTTPRequestHandler).serve_forever()")
    proc = pm.start("http", [sys.executable, "-c", code], cwd=tmp_path)
    try:
        waited = pm.wait_http_ok(proc, f"http://127.0.0.1:{port}/", timeout_s=30)
        assert waited >= 0.5
        assert http_ok(f"http://127.0.0.1:{port}/")
    finally:
        pm.stop_all()
    assert not http_ok(f"http://127.0.0.1:{port}/", timeout_s=0.5)


def test_wait_http_ok_reports_a_dead_process_with_its_log(tmp_path: Path) -> None:
    pm = ProcessManager(tmp_path)
    proc = pm.start("dies", [sys.executable, "-c",
                             "import sys; print('engine failed: no memory'); sys.exit(7)"])
    with pytest.raises(DemoProcessError) as err:
        pm.wait_http_ok(proc, f"http://127.0.0.1:{free_port()}/health", timeout_s=30)
    assert "exited with code 7" in err.value.message
    assert "engine failed: no memory" in err.value.message
    assert str(proc.log_path) in (err.value.hint or "")


def test_wait_http_ok_times_out(tmp_path: Path) -> None:
    pm = ProcessManager(tmp_path)
    proc = pm.start("silent", [sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(DemoProcessError, match="did not answer"):
            pm.wait_http_ok(proc, f"http://127.0.0.1:{free_port()}/health", timeout_s=1)
    finally:
        pm.stop_all()
    assert not proc.alive()


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_http_ok_is_false_for_non_200(tmp_path: Path) -> None:
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(503)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert not http_ok(f"http://127.0.0.1:{server.server_address[1]}/health")
    finally:
        server.shutdown()
        server.server_close()


# A driver that owns a ProcessManager with cleanup installed, as run_demo.py does, and
# prints the pid of the engine-like grandchild it started.
DRIVER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from demo.procs import ProcessManager
    pm = ProcessManager(Path({logs!r}))
    pm.install_cleanup()
    try:
        proc = pm.start("engine", [sys.executable, "-c", {parent!r}, "1", "0"])
        deadline = time.monotonic() + 20
        while not proc.log_path.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        print(proc.log_path.read_text().strip(), flush=True)
        time.sleep(600)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_signal_to_the_driver_stops_everything(tmp_path: Path, sig: int) -> None:
    code = DRIVER.format(repo=str(REPO), logs=str(tmp_path), parent=PARENT)
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(driver.stdout.readline().strip())
        assert _alive(grandchild)
        driver.send_signal(sig)
        rc = driver.wait(timeout=40)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert rc == (130 if sig == signal.SIGINT else 128 + sig)
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild), "Ctrl-C / SIGTERM left the engine running"


def test_full_run_starts_from_clean_outputs_but_keeps_the_model(tmp_path: Path) -> None:
    """An earlier run's traces must not leak into this run's report (e.g. its handshake)."""
    from demo.run_demo import RUN_OUTPUTS, Console, Demo, DemoConfig

    out = tmp_path / "out"
    stale = out / "traces" / "disagg" / "kvprof-vllm-decode-vm-1-0000.jsonl"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}\n")
    (out / "report.json").write_text("{}")
    (out / "model").mkdir()
    (out / "model" / "config.json").write_text("{}")
    Demo(DemoConfig(out=out), Console()).clear_previous_run()
    assert not any((out / name).exists() for name in RUN_OUTPUTS)
    assert (out / "model" / "config.json").read_text() == "{}"


def test_report_gets_only_engine_logs_with_nixl_lines(tmp_path: Path) -> None:
    from demo.run_demo import nixl_worker_logs

    (tmp_path / "vllm-decode.log").write_text("INFO KV Transfer metrics: Num transfers=1\n")
    (tmp_path / "vllm-prefill.log").write_text(
        "WARNING Releasing expired KV blocks for request r1 which were retrieved by 0 remote\n")
    (tmp_path / "vllm-agg.log").write_text("INFO plain engine\n")
    (tmp_path / "router.log").write_text("KV Transfer metrics\n")
    assert [p.name for p in nixl_worker_logs(tmp_path)] == ["vllm-decode.log", "vllm-prefill.log"]


def test_watchdog_fails_the_stage_when_a_watched_process_dies(tmp_path: Path) -> None:
    """A watched process killed by a signal ends the stage's wait within seconds, with one
    line naming it, its signal and the fatal lines of its log."""
    pm = ProcessManager(tmp_path)
    pm.stage = "Disaggregated deployment under the same load"
    script = ("import os, signal, sys, time; "
              "print('kvprof: VLLM::Worker (pid 7, vllm-decode, decode) died from SIGILL', "
              "flush=True); time.sleep(0.5); os.kill(os.getpid(), signal.SIGILL)")
    victim = pm.start("vllm-decode", [sys.executable, "-c", script])
    waiter = pm.start("aiperf-c1", [sys.executable, "-c", "import time; time.sleep(600)"])
    pm.watch(victim)
    started = time.monotonic()
    with pytest.raises(DemoProcessError) as err:
        pm.wait_exit(waiter, timeout_s=120)
    assert time.monotonic() - started < 10
    head = err.value.message.splitlines()[0]
    assert head.startswith(f"vllm-decode (pid {victim.pid}) died from SIGILL during "
                           "'Disaggregated deployment under the same load'")
    assert "VLLM::Worker (pid 7, vllm-decode, decode) died from SIGILL" in head
    assert str(victim.log_path) in err.value.hint
    pm.stop_all()
    assert pm.running() == []


def test_a_hung_server_stops_everything_within_30_s(tmp_path: Path) -> None:
    """A real HTTP server that answers /health, then hangs (SIGSTOP: alive, silent, deaf to
    SIGTERM): with the demo's own limits the stage fails and every process is gone within
    30 s of the hang, the hung one by SIGKILL after the short failure grace."""
    import demo.procs as procs

    port = free_port()
    pm = ProcessManager(tmp_path)
    pm.stage = "Aggregated deployment under load"
    code = ("import http.server; http.server.ThreadingHTTPServer(('127.0.0.1', "
            f"{port}), http.server.SimpleHTTPRequestHandler).serve_forever()")
    server = pm.start("vllm-agg", [sys.executable, "-c", code], cwd=tmp_path)
    load = pm.start("aiperf-c1", [sys.executable, "-c", "import time; time.sleep(600)"])
    url = f"http://127.0.0.1:{port}/"
    pm.wait_http_ok(server, url, timeout_s=30)
    pm.watch(server, url)
    pm.watch(load)
    time.sleep(2 * procs.WATCH_INTERVAL_S)  # answered at least once while watched
    hung_at = time.monotonic()
    os.kill(server.pid, signal.SIGSTOP)
    try:
        with pytest.raises(DemoProcessError) as err:
            pm.wait_exit(load, timeout_s=120)
        detected = time.monotonic() - hung_at
        pm.stop_all()
        down = time.monotonic() - hung_at
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGKILL)
    head = err.value.message.splitlines()[0]
    assert head.startswith(f"vllm-agg (pid {server.pid}) stopped answering {url} for 16 s "
                           "during 'Aggregated deployment under load'"), head
    # Counted from the last answer, which came up to one watch interval before the hang.
    grace, interval = procs.HEALTH_GRACE_S, procs.WATCH_INTERVAL_S
    assert grace - 2 * interval <= detected <= grace + procs.HEALTH_TIMEOUT_S + 2 * interval
    assert down < 30, f"everything down {down:.1f} s after the hang"
    assert pm.running() == [] and server.popen.returncode == -signal.SIGKILL


def test_a_death_while_another_process_starts_fails_the_wait_at_once(tmp_path: Path) -> None:
    """Two engines starting: the second dies (SIGILL) while the wait is on the first, which
    never answers. The wait ends within seconds naming the dead one, not after a timeout."""
    pm = ProcessManager(tmp_path)
    pm.stage = "Disaggregated deployment under the same load"
    slow = pm.start("vllm-prefill", [sys.executable, "-c", "import time; time.sleep(600)"])
    dies = pm.start("vllm-decode", [sys.executable, "-c",
                                    "import os, signal, time; time.sleep(1); "
                                    "os.kill(os.getpid(), signal.SIGILL)"])
    pm.watch(slow)
    pm.watch(dies)
    started = time.monotonic()
    try:
        with pytest.raises(DemoProcessError) as err:
            pm.wait_http_ok(slow, f"http://127.0.0.1:{free_port()}/health", timeout_s=300)
    finally:
        pm.stop_all()
    assert time.monotonic() - started < 10
    assert err.value.message.startswith(f"vllm-decode (pid {dies.pid}) died from SIGILL during "
                                        "'Disaggregated deployment under the same load'")
    assert pm.running() == []


def test_exit_descriptions() -> None:
    from demo.procs import exit_description

    assert exit_description(-4) == "died from SIGILL"
    assert exit_description(132) == "died from SIGILL"  # a launcher's 128 + n
    assert exit_description(1) == "exited with code 1"
    assert exit_description(0) == "exited with code 0"


def test_fatal_lines_pick_what_says_why_not_every_warning(tmp_path: Path) -> None:
    from demo.procs import fatal_lines

    log = tmp_path / "x.log"
    log.write_text("\n".join([
        "WARNING Found ulimit ... This can cause fd limit errors like `OSError: ...`",
        "WARNING Initializing KVConnectorBase_V1. This API is experimental ... the design.",
        "ERROR [async_llm.py:906] AsyncLLM output_handler failed.",
        "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.",
        "Fatal Python error: Illegal instruction",
        "kvprof: VLLM::Worker (pid 9, vllm-decode, decode) died from SIGILL",
    ]) + "\n")
    lines = fatal_lines(log)
    assert lines[0].startswith("kvprof: VLLM::Worker (pid 9")
    assert not any("ulimit" in ln or "design" in ln for ln in lines)
    assert any("EngineDeadError" in ln for ln in lines)
    assert any("Fatal Python error" in ln for ln in lines)


def test_await_failure_names_a_server_that_dies_after_its_requests_failed(tmp_path: Path) -> None:
    """aiperf can finish (its requests failing fast) before the watchdog has seen the server
    die; the demo then waits for the watchdog, so the error names the death, not the symptom."""
    pm = ProcessManager(tmp_path)
    proc = pm.start("server", [sys.executable, "-c",
                               "import os, signal, time; time.sleep(1.5); "
                               "os.kill(os.getpid(), signal.SIGILL)"])
    pm.watch(proc)
    try:
        started = time.monotonic()
        with pytest.raises(DemoProcessError) as err:
            pm.await_failure(timeout_s=30)
        assert time.monotonic() - started < 10  # the death, not the timeout, ended the wait
        assert "died from SIGILL" in err.value.message
    finally:
        pm.stop_all()


def test_await_failure_returns_when_nothing_failed(tmp_path: Path) -> None:
    pm = ProcessManager(tmp_path)
    proc = pm.start("server", [sys.executable, "-c", "import time; time.sleep(60)"])
    pm.watch(proc)
    try:
        started = time.monotonic()
        pm.await_failure(timeout_s=1.0)
        assert time.monotonic() - started >= 1.0
    finally:
        pm.stop_all()


def test_failed_requests_reads_aiperfs_error_summary() -> None:
    import json

    from demo import load

    fixtures = REPO / "tests" / "fixtures" / "analysis"
    errors = json.loads((fixtures / "aiperf_v0_1_1_run1" / "profile_export_aiperf.json")
                        .read_text())
    clean = json.loads((fixtures / "aiperf_c2" / "profile_export_aiperf.json").read_text())
    assert load.failed_requests(errors) == 11
    assert load.failed_requests(clean) == 0
    assert load.failed_requests({}) == 0
