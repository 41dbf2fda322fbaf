"""Start the demo's background processes in their own process groups and always stop them.

A watchdog thread looks at every process a stage depends on (exited? still answering its
/health?) and turns the first failure into a DemoProcessError the stage's waits raise, so a
crashed engine ends the demo in seconds instead of leaving aiperf waiting on a timeout.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvprof.errors import KvprofError

log = logging.getLogger("kvprof.demo.procs")

# vLLM's API server forwards SIGTERM to its engine core and worker; 30 s covers a slow flush of
# the probes' trace files on two busy cores before we stop asking politely.
STOP_GRACE_S = 30.0
# After a failure everything must be down within 30 s of it. A hang is the slowest case:
# HEALTH_GRACE_S without a 200, one last HEALTH_TIMEOUT_S probe, WATCH_INTERVAL_S until the
# watchdog looks again, then FAILURE_GRACE_S (shared by every process) before SIGKILL:
# 16 + 3 + 1 + 5 = 25 s, which leaves room for a loaded machine. A death is seen within
# WATCH_INTERVAL_S: down within 6 s. 5 s is ample for the probes' last flush (every 0.5 s).
FAILURE_GRACE_S = 5.0
WATCH_INTERVAL_S = 1.0
HEALTH_TIMEOUT_S = 3.0
# A 2-core machine under load has starved an engine's API server for over 15 s without
# anything being wrong; this long without a 200 (and still running) is a hang.
HEALTH_GRACE_S = 16.0
# A listener that is gone stays gone; a few looks rule out a socket being re-created.
LISTEN_GRACE_S = 3.0
# Lines of a log that say why a process died (kvprof attach's crash report first).
_FATAL = re.compile(r"kvprof: .*died from|Fatal Python error|died unexpectedly|"
                    r"\b[A-Z][A-Za-z]*Error\b|ERROR|Traceback|Killed|Segmentation fault|"
                    r"Illegal instruction|\bSIG[A-Z]{2,}\b")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the demo itself dies (even by SIGKILL)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def exit_description(returncode: int | None) -> str:
    """'exited with code 1', 'died from SIGILL' (also for a launcher's 128 + n)."""
    if returncode is None:
        return "is still running"
    number = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    if number:
        try:
            return f"died from {signal.Signals(number).name}"
        except ValueError:
            pass
    return f"exited with code {returncode}"


def fatal_lines(path: Path, limit: int = 6) -> list[str]:
    """The last lines of a log that say why its process died (kvprof's report first)."""
    tail = log_tail(path, 200).splitlines()
    ours = [ln for ln in tail if ln.startswith("kvprof: ") and "died from" in ln]
    # A warning that merely names an error type (vLLM's ulimit advice) says nothing of a death.
    others = [ln for ln in tail if _FATAL.search(ln) and "WARNING" not in ln and ln not in ours]
    return (ours + others[-(limit - len(ours)):] if len(ours) < limit else ours)[:limit]


class DemoProcessError(KvprofError):
    """A process the demo started died or never became ready; the hint points at its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now, outside the ephemeral range, so no outgoing
    connection (a UCX loopback socket, once) can take it before the engine binds it."""
    from kvprof.ports import free_port as outside_ephemeral

    return outside_ephemeral(host)


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, for error messages (empty when there is none)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


@dataclass(eq=False)  # identity: a process is a key of the watchdog's tables
class ManagedProcess:
    """One started command: its Popen, its log file and the session it leads."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def failure(self, stage: str, what: str) -> DemoProcessError:
        """The one-line error (and its fatal log lines) for this process failing a stage;
        without fatal lines, the last lines of its log."""
        lines = fatal_lines(self.log_path) or log_tail(self.log_path, 8).splitlines()
        crash = next((ln.removeprefix("kvprof: ") for ln in lines if "died from" in ln), None)
        head = f"{self.name} (pid {self.pid}) {what} during '{stage}'" + (
            f"; {crash}" if crash else "")
        body = "\n".join("    " + ln for ln in lines if ln.removeprefix("kvprof: ") != crash)
        return DemoProcessError(head + ("\n" + body if body else ""),
                                hint=f"See {self.log_path} (every process's log is in "
                                     f"{self.log_path.parent}/).")


def _descendants(pid: int) -> list[int]:
    """Every process below pid, found before we signal anything (children may re-parent)."""
    try:
        import psutil
    except ImportError:  # psutil is a kvprof dependency; without it the process group must do
        return []
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _signal_pids(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _any_alive(pids: Sequence[int]) -> bool:
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            return True
        # A zombie child of ours still answers kill(0); reap it if it is ours.
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                continue
        return True
    return False


class ProcessManager:
    """Owns every background process of one demo run; stop_all() is safe to call repeatedly.

    Each command leads its own session (start_new_session), so one killpg reaches the vLLM
    API server, its EngineCore and Worker, and the kvprof attach launcher above them; the
    descendant list taken before signalling also catches anything that left the group.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[ManagedProcess] = []
        self._installed = False
        self._previous_handlers: dict[int, object] = {}
        # Watchdog: process -> (health URL or None); the first failure is kept, raised by
        # check() and every wait of the main thread.
        self._watched: dict[ManagedProcess, str | None] = {}
        self._last_ok: dict[ManagedProcess, float] = {}
        self._ports: dict[ManagedProcess, dict[int, float]] = {}  # port -> last seen listening
        self._watch_lock = threading.Lock()
        self._watch_thread: threading.Thread | None = None
        self._failed = threading.Event()
        self.failure_error: DemoProcessError | None = None
        self.stage = "start-up"

    # -- lifecycle ---------------------------------------------------------------------------
    def install_cleanup(self) -> None:
        """Stop everything at interpreter exit and on SIGINT / SIGTERM / SIGHUP."""
        if self._installed:
            return
        atexit.register(self.stop_all)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        self._installed = True

    def _on_signal(self, signum: int, _frame: object) -> None:
        # Ignore further signals while cleaning up: a second Ctrl-C must not orphan engines.
        for sig in self._previous_handlers:
            signal.signal(sig, signal.SIG_IGN)
        log.warning("received %s: stopping %d process(es)", signal.Signals(signum).name,
                    len(self.running()))
        self.stop_all()
        raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str | None] | None = None,
        cwd: Path | None = None,
        log_path: Path | None = None,
    ) -> ManagedProcess:
        """Start argv in a new session, stdout and stderr into log_path (log_dir/<name>.log).

        env entries override the inherited environment; a None value removes the variable.
        """
        log_path = log_path or self.log_dir / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        full_env = dict(os.environ)
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        with open(log_path, "wb") as log_file:
            popen = subprocess.Popen(
                list(argv), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=full_env, cwd=cwd, start_new_session=True, preexec_fn=_die_with_parent,
            )
        proc = ManagedProcess(name=name, argv=list(argv), log_path=log_path, popen=popen)
        self._procs.append(proc)
        log.info("started %s (pid %d): %s", name, popen.pid, " ".join(argv))
        return proc

    def running(self) -> list[ManagedProcess]:
        return [p for p in self._procs if p.alive()]

    def stop(self, proc: ManagedProcess, grace_s: float = STOP_GRACE_S,
             terminate: bool = True, pids: list[int] | None = None) -> int | None:
        """SIGTERM the process group, wait, then SIGKILL whatever is left; returns the code.

        ``terminate=False``: the SIGTERM was already sent and ``pids`` (proc and its
        descendants) listed before it (stop_all signals every group first).
        """
        self.unwatch(proc)
        pids = pids or [proc.pid, *_descendants(proc.pid)]
        if terminate and proc.alive():
            # Only the group we started: `kvprof attach` forwards the signal to the engine's
            # own group, and a second SIGTERM straight to vLLM would cut its flush short.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        orphans_told = False
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                if not _any_alive(pids[1:]):
                    break
                if not orphans_told:
                    # The leader is gone, so nobody forwards to what it left in other
                    # sessions; ask those directly before the deadline forces them.
                    _signal_pids(pids[1:], signal.SIGTERM)
                    orphans_told = True
            time.sleep(0.1)
        else:
            log.warning("%s did not stop within %.0f s: SIGKILL", proc.name, grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        # Descendants only: the leader is in the group just killed, and _any_alive would
        # reap it behind Popen's back (Popen then reports exit 0 for a SIGKILLed process).
        _signal_pids([p for p in pids[1:] if _any_alive([p])], signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=5)
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.popen.returncode

    def stop_all(self, grace_s: float | None = None) -> None:
        """Stop every process still owned: SIGTERM to all groups at once, one shared grace,
        then SIGKILL what is left (a slow engine does not hold up the others)."""
        self.unwatch_all()
        if grace_s is None:
            grace_s = FAILURE_GRACE_S if self._failed.is_set() else STOP_GRACE_S
        procs = list(reversed(self._procs))
        if not procs:
            return
        # Descendants first: once a launcher dies, what it started is reparented out of reach.
        trees = {proc: [proc.pid, *_descendants(proc.pid)] for proc in procs}
        for proc in procs:
            if proc.alive():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                self.stop(proc, grace_s=max(0.5, deadline - time.monotonic()), terminate=False,
                          pids=trees[proc])
            except Exception:  # cleanup must reach every process even if one stop fails
                log.exception("stopping %s failed", proc.name)

    def wait_exit(self, proc: ManagedProcess, timeout_s: float) -> int | None:
        """Wait for proc to end by itself; None when it is still running at the deadline.

        Raises the watchdog's failure as soon as another watched process fails.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            self.check()
            try:
                return proc.popen.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    return None

    # -- watchdog ------------------------------------------------------------------------------
    def watch(self, proc: ManagedProcess, health_url: str | None = None,
              listen_ports: Sequence[int] = ()) -> None:
        """Fail the demo when proc exits, stops answering health_url (200) for a while, or
        no longer listens on one of ``listen_ports`` (e.g. its NIXL side channel: alive but
        unable to hand over any KV cache is as dead as an exit)."""
        with self._watch_lock:
            self._watched[proc] = health_url
            self._last_ok[proc] = time.monotonic()
            self._ports[proc] = {p: time.monotonic() for p in listen_ports}
            if self._watch_thread is None or not self._watch_thread.is_alive():
                self._watch_thread = threading.Thread(target=self._watch_loop, daemon=True,
                                                      name="demo-watchdog")
                self._watch_thread.start()

    def unwatch(self, proc: ManagedProcess) -> None:
        """Stop watching proc (before stopping it on purpose)."""
        with self._watch_lock:
            self._watched.pop(proc, None)

    def unwatch_all(self) -> None:
        with self._watch_lock:
            self._watched.clear()

    def check(self) -> None:
        """Raise the watchdog's failure, if any (the main thread's waits call this)."""
        if self.failure_error is not None:
            raise self.failure_error

    def await_failure(self, timeout_s: float) -> None:
        """Give the watchdog up to timeout_s to name a failed process, and raise its failure
        if it does (e.g. after requests failed: a dead server is the likely reason, and its
        exit is a better error than the symptom)."""
        self._failed.wait(timeout_s)
        self.check()

    def fail(self, proc: ManagedProcess, what: str) -> DemoProcessError:
        """Record proc's failure (the first one wins) and return it: stop_all then gives every
        process the short FAILURE_GRACE_S."""
        with self._watch_lock:
            if self.failure_error is None:
                self.failure_error = proc.failure(self.stage, what)
                self._failed.set()
        return self.failure_error

    def dead(self, procs: Sequence[ManagedProcess], what: str = "") -> None:
        """Raise for the first of procs that has exited (its exit status or signal, and
        ``what`` it was doing, e.g. " before it was ready")."""
        for proc in procs:
            if not proc.alive():
                raise self.fail(proc, exit_description(proc.popen.returncode) + what)

    def _watch_loop(self) -> None:
        while not self._failed.is_set():
            with self._watch_lock:
                watched = list(self._watched.items())
            for proc, url in watched:
                what = None
                if not proc.alive():
                    what = exit_description(proc.popen.returncode)
                elif (port := self._port_gone(proc)) is not None:
                    what = (f"is alive but nothing listens on its port {port} (its NIXL side "
                            f"channel) for {LISTEN_GRACE_S:.0f} s: no KV hand-off can start")
                elif url is not None:
                    if http_ok(url, timeout_s=HEALTH_TIMEOUT_S):
                        self._last_ok[proc] = time.monotonic()
                    elif time.monotonic() - self._last_ok[proc] > HEALTH_GRACE_S:
                        what = f"stopped answering {url} for {HEALTH_GRACE_S:.0f} s"
                if what is not None and proc in self._watched:
                    log.error("%s", self.fail(proc, what).message.splitlines()[0])
                    return
            self._failed.wait(WATCH_INTERVAL_S)

    def _port_gone(self, proc: ManagedProcess) -> int | None:
        """A watched port of proc that has not been listening for LISTEN_GRACE_S, or None."""
        ports = self._ports.get(proc)
        if not ports:
            return None
        from kvprof.ports import listening_ports

        now, listening = time.monotonic(), listening_ports()
        for port in ports:
            if port in listening:
                ports[port] = now
            elif now - ports[port] > LISTEN_GRACE_S:
                return port
        return None

    # -- readiness ---------------------------------------------------------------------------
    def wait_http_ok(
        self,
        proc: ManagedProcess,
        url: str,
        timeout_s: float,
        progress: Callable[[float], None] | None = None,
    ) -> float:
        """Poll url until it answers 200; raise at once if proc dies. Returns seconds waited."""
        start = time.monotonic()
        while True:
            self.check()
            self.dead([proc], " before it was ready")
            if http_ok(url):
                return time.monotonic() - start
            waited = time.monotonic() - start
            if waited > timeout_s:
                raise DemoProcessError(
                    f"{proc.name} did not answer {url} within {timeout_s:.0f} s",
                    hint=f"See {proc.log_path}; on a busy 2-core machine an engine can take "
                         "minutes to start: retry when other vLLM engines have stopped.",
                )
            if progress:
                progress(waited)
            time.sleep(0.5)


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    """Whether GET url answers 200 right now."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (loopback)
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False
