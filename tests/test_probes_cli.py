"""`kvprof attach` through the real entry point: launcher, bootstrap, --pid with py-spy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from otlp_files import file_spans

KVPROF = [sys.executable, "-m", "kvprof"]


def run(args, **kw):
    return subprocess.run(KVPROF + args, capture_output=True, text=True, timeout=120, **kw)


def test_attach_passes_exit_code_and_stdout_and_enables_probes(tmp_path):
    script = ("import os, sys; print(os.environ['KVPROF_ENABLED'], "
              "'kvprof.probes.activation' in sys.modules); sys.exit(7)")
    r = run(["attach", "--exporter", "file", "--output", str(tmp_path / "t"), "--",
             sys.executable, "-c", script])
    assert r.returncode == 7
    assert r.stdout.strip() == "1 True"
    assert "kvprof: 0 spans from" in r.stderr and "kvprof report --traces" in r.stderr


def test_bootstrap_chains_an_existing_sitecustomize(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os\nos.environ['OTHER_SITE'] = 'ran'\n")
    env = dict(os.environ, PYTHONPATH=str(other))
    r = run(["attach", "--exporter", "none", "--", sys.executable, "-c",
             "import os; print(os.environ.get('OTHER_SITE'))"], env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ran"


def test_plain_process_is_not_instrumented():
    r = subprocess.run([sys.executable, "-c", "from kvprof.probes.activation import activate;"
                        "print(activate())"], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "KVPROF_ENABLED"})
    assert r.stdout.strip() == "False"


@pytest.mark.parametrize("args,needle", [
    (["attach", "--exporter", "zipkin", "--", "true"], "unknown exporter"),
    (["attach", "--role", "router", "--", "true"], "unknown role"),
    (["attach"], "no command to run"),
    (["attach", "--", "/nonexistent/cmd"], "command not found"),
])
def test_bad_usage_exits_2_with_hint(args, needle):
    r = run(args)
    assert r.returncode == 2, r.stderr
    assert f"Error: {needle}" in r.stderr and "Hint:" in r.stderr
    assert "Traceback" not in r.stderr



KILLED_AT_ONCE = textwrap.dedent("""
    import os, signal, time
    from kvprof.probes import events as ev
    from kvprof.probes.recorder import get_recorder
    rec = get_recorder()  # configured by kvprof attach's environment
    now = time.time_ns()
    rec.emit((ev.ARRIVE, "r-7-abcdef07", now, now, 40, {"do_remote_decode": True}))
    rec.emit((ev.SCHEDULED, "r-7-abcdef07", now + 1000))  # in flight when the stop comes
    # Like vLLM's EngineCore under its process manager (SIGTERM, then SIGKILL at once):
    # a stop ends this process with no exit flush.
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))
    print("ready", flush=True)
    time.sleep(60)
""")


def test_attach_has_spans_written_out_before_a_stop_reaches_the_command(tmp_path):
    traces = tmp_path / "t"
    proc = subprocess.Popen(KVPROF + ["attach", "--exporter", "file", "--output", str(traces),
                                      "--", sys.executable, "-c", KILLED_AT_ONCE],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.0)  # ordinary flushes ran: the request is still open, nothing written
        assert not [f for f in traces.glob("*.jsonl") if f.stat().st_size]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    assert "kvprof: stopping: 1 of 1 probed processes wrote out their spans" in err, err
    names = [s["name"] for s in file_spans(traces)]
    assert names == ["vllm.prefill"], names  # closed as cut short, not lost


WORK = textwrap.dedent("""
    import sys, time
    def execute_model(n):          # stands in for a forward pass
        s = 0
        for i in range(n):
            s += i * i
        return s
    def idle_wait():
        time.sleep(0.05)
    print("ready", flush=True)
    end = time.time() + float(sys.argv[1])
    while time.time() < end:
        execute_model(200000)
        idle_wait()
""")


@pytest.fixture
def busy_process(tmp_path):
    script = tmp_path / "work.py"
    script.write_text(WORK)
    proc = subprocess.Popen([sys.executable, str(script), "30"], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    proc.kill()
    proc.wait()


def test_attach_pid_samples_and_classifies_phases(busy_process, tmp_path):
    out = tmp_path / "spy"
    r = run(["attach", "--pid", str(busy_process.pid), "--duration", "2", "--rate", "50",
             "--output", str(out)])
    assert r.returncode == 0, r.stderr
    assert "model forward" in r.stdout and "idle / waiting" in r.stdout
    summary = json.loads(next(out.glob("*.phases.json")).read_text())
    (main,) = summary["threads"]
    # The script never imports threading, so py-spy finds no thread name: the main thread
    # is known by its OS thread id, which is the pid.
    assert main["tid"] == str(busy_process.pid) and main["main"] and main["runs_model"]
    assert main["samples"] == summary["sampling"]["instants"] > 0
    samples = {phase: v["samples"] for phase, v in main["phases"].items()}
    assert samples["model forward"] > 0 and samples["idle / waiting"] > 0
    assert samples["model forward"] + samples["idle / waiting"] >= 0.8 * main["samples"]
    assert main["waits"][0]["site"] == "idle_wait <- <module>"
    speedscope = json.loads(next(out.glob("*.speedscope.json")).read_text())
    assert speedscope["$schema"].startswith("https://www.speedscope.app")
    assert "execute_model" in next(out.glob("*.collapsed.txt")).read_text()


def test_attach_pid_permission_denied_exits_4_with_ptrace_hint(busy_process):
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged user")
    try:
        r = subprocess.run(KVPROF + ["attach", "--pid", str(busy_process.pid), "--duration",
                                     "1"], capture_output=True, text=True, timeout=60,
                           user=65534, group=65534, env=dict(os.environ, HOME="/tmp"),
                           cwd="/tmp")
    except PermissionError:
        pytest.skip("the unprivileged user cannot run this venv's python")
    assert r.returncode == 4, r.stderr
    assert "SYS_PTRACE" in r.stderr and "ptrace_scope" in r.stderr
    assert "Traceback" not in r.stderr


def test_attach_pid_of_a_missing_process_is_bad_input():
    r = run(["attach", "--pid", "99999999", "--duration", "1"])
    assert r.returncode in (3, 4) and "Error:" in r.stderr and "Traceback" not in r.stderr


def test_kvprof_help_stays_light():
    t = time.perf_counter()
    r = run(["attach", "--help"])
    assert r.returncode == 0 and "--exporter" in r.stdout
    assert time.perf_counter() - t < 10
    r = subprocess.run([sys.executable, "-c", "import kvprof.cli, sys;"
                        "print(any(m in sys.modules for m in ('torch','vllm','opentelemetry')))"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "False"
    assert Path(__file__).exists()


def test_pyspy_permission_message_maps_to_exit_4():
    from kvprof.errors import ResourceAbsentError
    from kvprof.probes.pyspy import _classify_error

    # py-spy 0.4's own wording when ptrace is refused
    err = _classify_error("Permission Denied: Try running again with elevated permissions by "
                          "going 'sudo env \"PATH=$PATH\" !!'", 1234)
    assert isinstance(err, ResourceAbsentError) and err.exit_code == 4
    assert "SYS_PTRACE" in err.hint and "ptrace_scope" in err.hint
