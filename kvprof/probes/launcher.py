"""`kvprof attach -- COMMAND`: run a command with probes in every Python process it starts."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kvprof import semconv
from kvprof.errors import EXIT_RESOURCE_ABSENT, KvprofError, UsageError
from kvprof.probes import drain
from kvprof.probes.config import ENV_STATS_DIR, EXPORTERS

log = logging.getLogger(__name__)

BOOTSTRAP_DIR = Path(__file__).resolve().parent / "bootstrap"


class ProbesNotLoadedError(KvprofError):
    """The command ran, but kvprof's probes could not load in it (no kvprof in its Python)."""

    exit_code = EXIT_RESOURCE_ABSENT
ROLES = ("prefill", "decode", "auto")


def probe_environment(base: dict[str, str], exporter: str, endpoint: str | None, output: Path,
                      service_name: str | None, role: str, stats_dir: str) -> dict[str, str]:
    """The environment that turns the probes on in COMMAND and every Python child of it."""
    env = dict(base)
    env[semconv.ENV_ENABLED] = "1"
    env[semconv.ENV_EXPORTER] = exporter
    env[semconv.ENV_OUTPUT] = str(output.resolve())
    env[semconv.ENV_ROLE] = role
    env[ENV_STATS_DIR] = stats_dir
    if service_name:
        env[semconv.ENV_SERVICE_NAME] = service_name
    if endpoint:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    # The bootstrap goes first on PYTHONPATH and chains any sitecustomize already there.
    paths = [str(BOOTSTRAP_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def summarize(stats_dir: str, exporter: str, output: Path, endpoint: str | None) -> str:
    """One line: how many spans went where, and how to look at them."""
    exported = dropped = procs = 0
    destinations: set[str] = set()
    for path in Path(stats_dir).glob("*.json"):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        procs += 1
        exported += int(doc.get("exported", 0))
        dropped += int(doc.get("dropped", 0))
        if doc.get("destination"):
            destinations.add(str(doc["destination"]))
    where = ", ".join(sorted(destinations)) or exporter
    line = f"kvprof: {exported} spans from {procs} probed processes -> {where}"
    if dropped:
        line += f" ({dropped} dropped: exporter unreachable or failing)"
    if exporter == "file":
        line += f"; view: kvprof report --traces {output}"
    elif exporter == "otlp":
        line += "; view: Jaeger UI (e.g. http://127.0.0.1:16686), service vllm-prefill/decode"
    elif exporter == "console":
        line += "; spans were printed to stderr"
    return line


def run_with_probes(command: list[str], exporter: str, endpoint: str | None, output: Path,
                    service_name: str | None, role: str) -> int:
    """Run COMMAND with probes; pass stdio, exit code and signals through."""
    # A late engine process may still write its counts while the directory goes away.
    with tempfile.TemporaryDirectory(prefix="kvprof-attach-",
                                     ignore_cleanup_errors=True) as stats_dir:
        env = probe_environment(dict(os.environ), exporter, endpoint, output, service_name,
                                role, stats_dir)
        if exporter == "file":
            output.mkdir(parents=True, exist_ok=True)
        from kvprof.cpu_quirks import warning_for_command

        quirk = warning_for_command(command)
        if quirk:
            sys.stderr.write(f"kvprof: warning: {quirk}\n")
        try:
            # Own process group: a signal to kvprof reaches every engine process it started.
            child = subprocess.Popen(command, env=env, start_new_session=True)
        except FileNotFoundError:
            raise UsageError(f"command not found: {command[0]}",
                             hint="Give the full command after --, e.g. "
                             "kvprof attach -- python -m vllm.entrypoints.openai.api_server "
                             "--model M") from None
        except PermissionError:
            raise UsageError(f"command not executable: {command[0]}") from None

        stopping: list[float] = []

        def forward(signum, _frame):
            stopping.append(time.time())
            if len(stopping) == 1:
                # The first stop signal waits for the spans (a second one goes at once,
                # and the drain it interrupts then sends nothing more).
                drain_before_stop(stats_dir, child, lambda: len(stopping) > 1)
                if len(stopping) > 1:
                    return
            try:
                os.killpg(child.pid, signum)
            except ProcessLookupError:
                pass

        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM,
                                                      signal.SIGHUP)}
        try:
            rc = child.wait()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
        probes_not_loaded(stats_dir)
        sys.stderr.write(summarize(stats_dir, exporter, output, endpoint) + "\n")
        for line in crash_lines(stats_dir, child.pid, rc, stopping[0] if stopping else None):
            sys.stderr.write(line + "\n")
    # A child killed by a signal exits like a shell reports it: 128 + signal number.
    return 128 - rc if rc < 0 else rc


def probes_not_loaded(stats_dir: str) -> None:
    """Fail loudly when the probes could not load in the command's Python and no process was
    probed (its spans would silently be missing); warn when only some processes missed them."""
    failed = []
    for path in sorted(Path(stats_dir).glob("load-failed-*.txt")):
        try:
            exe, why = (path.read_text(encoding="utf-8").splitlines() + ["", ""])[:2]
        except OSError:
            continue
        failed.append((path.stem.removeprefix("load-failed-"), exe, why))
    if not failed:
        return
    probed = list(Path(stats_dir).glob("[0-9]*.json"))
    pid, exe, why = failed[0]
    if probed:
        for pid, exe, why in failed:
            sys.stderr.write(f"kvprof: warning: no probes in pid {pid} ({exe}): {why}\n")
        return
    raise ProbesNotLoadedError(
        f"the probes could not load in {exe or 'the command'} ({why}): nothing was probed",
        hint=f"Run the command with the Python kvprof is installed in: "
        f"kvprof attach -- {sys.executable} ... (or activate that venv first).")


def drain_before_stop(stats_dir: str, child: subprocess.Popen,
                      interrupted: Callable[[], bool],
                      timeout_s: float = drain.DEFAULT_TIMEOUT_S) -> None:
    """Have every probed process write out its spans before the stop signal goes on."""
    try:
        token = drain.request(stats_dir)
    except OSError as exc:
        sys.stderr.write(f"kvprof: cannot ask the probed processes to flush ({exc.strerror}); "
                         "stopping at once\n")
        return
    asked, left, seconds = drain.wait(stats_dir, token, timeout_s,
                                      lambda: interrupted() or child.poll() is not None)
    if not asked:
        return
    line = (f"kvprof: stopping: {asked - len(left)} of {asked} probed processes wrote out "
            f"their spans in {seconds:.1f} s")
    if left:
        who, its = ((f"pid {left[0]}", "its") if len(left) == 1
                    else (f"pids {', '.join(map(str, left))}", "their"))
        line += f"; {who} did not answer: {its} latest spans may be lost"
    sys.stderr.write(line + "\n")


def crash_lines(stats_dir: str, child_pid: int, rc: int, stopping_since: float | None
                ) -> list[str]:
    """What `kvprof attach` says when a process it watched died from a signal."""
    from kvprof.probes.lifecycle import STOP_SIGNALS, death_report, signal_name

    deaths, inflight, exact = death_report(stats_dir, stopping_since)
    lines = []
    if rc < 0 and -rc not in STOP_SIGNALS and all(d.pid != child_pid for d in deaths):
        lines.append(f"kvprof: the command (pid {child_pid}) died from {signal_name(-rc)}")
    for d in deaths:
        lines.append("kvprof: " + d.describe())
    if lines:
        shown = ", ".join(inflight[:10]) + (f" (+{len(inflight) - 10} more)"
                                            if len(inflight) > 10 else "")
        when = "" if exact else " (as of the last flush before the crash)"
        lines.append(f"kvprof: requests in flight{when}: " + (shown or "none recorded")
                     + "; their spans were ended with an error status where a process "
                     "survived to close them, and every span exported before is kept.")
    return lines


def run_attach_command(command: list[str], exporter: str, endpoint: str | None, output: Path,
                       service_name: str | None, role: str, pid: int | None, duration: float,
                       rate: int) -> int:
    """Body of `kvprof attach`: validate the options, then launch or sample."""
    exporter = exporter.lower()
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter {exporter!r}",
                         hint="Use one of: " + ", ".join(EXPORTERS) + ".")
    if role not in ROLES:
        raise UsageError(f"unknown role {role!r}", hint="Use prefill, decode or auto.")
    if pid is not None:
        if command:
            raise UsageError("--pid and a command after -- exclude each other",
                             hint="Sample a running process with --pid, or launch one after --.")
        from kvprof.inputs import option_number

        option_number(pid, "--pid", minimum=1, strict=False)
        option_number(duration, "--duration", maximum=86400)  # nan would pass `<= 0`
        option_number(rate, "--rate", maximum=10_000)
        from kvprof.outputs import make_dir
        from kvprof.probes.pyspy import sample_process

        make_dir(output, "--output")

        return sample_process(pid, duration=duration, rate=rate, output=output)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("no command to run",
                         hint="kvprof attach [OPTIONS] -- python -m vllm.entrypoints.openai."
                         "api_server --model M   (or --pid PID to sample a running worker)")
    if exporter == "file":
        from kvprof.outputs import make_dir

        make_dir(output, "--output")  # the probes in the children could only log it
    return run_with_probes(command, exporter, endpoint, output, service_name, role)
