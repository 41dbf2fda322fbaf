"""Processes the tests start: marked, run in their own session, never left behind.

Every process a test session starts inherits KVPROF_TEST_RUN (set by conftest.py), and each
isolated run adds a marker of its own; a sweep finds what is left by that marker (through
/proc/<pid>/environ) wherever it was reparented, so a timeout, a failure or Ctrl-C stops the
whole tree, not only the direct child.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence

import psutil

MARKER = "KVPROF_TEST_RUN"


def marked(marker: str) -> list[psutil.Process]:
    """Live processes (not this one) whose environment carries ``marker``."""
    out = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            value = proc.environ().get(MARKER, "")
            # A run's marker extends the session's: sweeping the session finds both.
            mine = value == marker or value.startswith(marker + "/")
            if mine and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (psutil.Error, OSError):
            continue
    return out


def sweep(marker: str, grace_s: float = 5.0) -> list[str]:
    """SIGTERM, then SIGKILL, every process left with ``marker``; returns what was found."""
    found = marked(marker)
    names = [f"{p.pid} {_name(p)}" for p in found]
    for proc in found:
        _signal(proc, signal.SIGTERM)
    _, alive = psutil.wait_procs(found, timeout=grace_s)
    for proc in alive:
        _signal(proc, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5)
    return names


def _name(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()[:4]) or proc.name()
    except psutil.Error:
        return "?"


def _signal(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass


class IsolatedRun:
    """A command in its own session with its own marker; ``wait`` never leaves orphans."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
                 cwd: str | os.PathLike | None = None):
        self.marker = f"{os.environ.get(MARKER, 'run')}/{uuid.uuid4().hex[:8]}"
        full = dict(os.environ if env is None else env)
        full[MARKER] = self.marker
        self.started = time.monotonic()
        self.popen = subprocess.Popen(list(argv), env=full, cwd=cwd, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      start_new_session=True)
        self.leftovers: list[str] = []

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        """Output of the command; on timeout or any exception its whole tree is killed."""
        try:
            out, err = self.popen.communicate(timeout=timeout)
        except BaseException:
            self.kill()
            raise
        # Whatever the command left behind is a bug it must be blamed for.
        self.leftovers = sweep(self.marker)
        return subprocess.CompletedProcess(self.popen.args, self.popen.returncode, out, err)

    def kill(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.leftovers = sweep(self.marker, grace_s=2.0)
        try:
            self.popen.communicate(timeout=10)
        except (subprocess.TimeoutExpired, ValueError):
            pass
