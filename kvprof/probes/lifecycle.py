"""How a probed process ended: fatal-signal stacks, children's exit codes, crash reports.

A process killed by a signal cannot report itself, so each probed process leaves traces in
the launcher's stats folder that survive it: faulthandler writes the Python stacks of a
fatal signal (SIGSEGV, SIGILL, SIGFPE, SIGABRT, SIGBUS) to ``<pid>.fault``; a parent that
reaps a child through multiprocessing writes ``exit-<pid>.json`` with its exit code (how
SIGKILL and every other signal become known). `kvprof attach` reads them when its command
exits (``death_report``), and a surviving process names the death as the reason when it
closes the spans of requests still in flight.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_FAULT_FILE: Any = None
# faulthandler's first line names the signal: "Fatal Python error: Illegal instruction".
_FAULT_NAMES = {"Segmentation fault": "SIGSEGV", "Illegal instruction": "SIGILL",
                "Floating-point exception": "SIGFPE", "Floating point exception": "SIGFPE",
                "Aborted": "SIGABRT", "Bus error": "SIGBUS"}
# Signals `kvprof attach` itself forwards to stop its command: not a crash.
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def process_name() -> str:
    """The kernel's name of this process (vLLM renames its processes: VLLM::Worker...)."""
    try:
        return Path("/proc/self/comm").read_text().strip()
    except OSError:
        return "python"


def enable_fault_file(stats_dir: str | None) -> None:
    """Send this process's fatal-signal stacks to <stats_dir>/<pid>.fault (once per pid)."""
    global _FAULT_FILE
    if not stats_dir:
        return
    try:
        os.makedirs(stats_dir, exist_ok=True)
        fh = open(os.path.join(stats_dir, f"{os.getpid()}.fault"), "w")  # noqa: SIM115
        faulthandler.enable(file=fh, all_threads=True)
        _FAULT_FILE = fh  # must stay open for faulthandler
    except (OSError, RuntimeError, ValueError):
        log.debug("kvprof: cannot enable faulthandler", exc_info=True)


def drop_empty_fault_file(stats_dir: str | None) -> None:
    """At a clean exit: no fatal signal happened, the empty .fault file goes."""
    if not stats_dir or _FAULT_FILE is None:
        return
    path = os.path.join(stats_dir, f"{os.getpid()}.fault")
    try:
        if os.path.getsize(path) == 0:
            faulthandler.disable()
            os.unlink(path)
    except OSError:
        pass


def record_child_exit(stats_dir: str | None, pid: int, returncode: int) -> None:
    """Leave a reaped child's exit code where the launcher and siblings can read it."""
    if not stats_dir:
        return
    doc = {"pid": pid, "returncode": returncode, "t": time.time(), "parent": os.getpid()}
    try:
        path = os.path.join(stats_dir, f"exit-{pid}.json")
        with open(path + ".tmp", "w") as fh:
            json.dump(doc, fh)
        os.replace(path + ".tmp", path)
    except OSError:
        log.debug("kvprof: cannot record exit of pid %s", pid, exc_info=True)


def popen_poll(stats_dir: str | None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Hook factory for multiprocessing's Popen.poll: note the exit code when it first shows."""
    def factory(wrapped: Callable[..., Any]) -> Callable[..., Any]:
        def poll(self, *args, **kwargs):
            before = self.returncode
            out = wrapped(self, *args, **kwargs)
            if before is None and self.returncode is not None:
                record_child_exit(stats_dir, self.pid, self.returncode)
            return out
        return poll
    return factory


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@dataclass
class Death:
    """One probed process that ended from a signal."""

    pid: int
    name: str
    service: str | None
    role: str | None
    signal: str
    when: float | None  # epoch seconds, when known
    stack: list[str] = field(default_factory=list)  # innermost frames of the faulting thread

    def describe(self) -> str:
        who = ", ".join(x for x in (self.service, self.role) if x)
        line = f"{self.name} (pid {self.pid}{', ' + who if who else ''}) died from {self.signal}"
        if self.stack:
            line += "; faulting Python stack (innermost first): " + " <- ".join(self.stack[:3])
        return line


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _fault(path: Path) -> tuple[str | None, list[str]]:
    """(signal name, innermost frames) from a faulthandler file; (None, []) when empty."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None, []
    if not text.strip():
        return None, []
    sig = None
    for line in text.splitlines():
        if line.startswith("Fatal Python error:"):
            what = line.split(":", 1)[1].strip()
            sig = _FAULT_NAMES.get(what, what)
            break
    # faulthandler marks the thread that got the signal "Current thread ..."; frames are
    # innermost first: 'File "x.py", line 3 in f'.
    blocks: list[tuple[bool, list[str]]] = []
    for line in text.splitlines():
        if line.startswith(("Current thread", "Thread ")):
            blocks.append((line.startswith("Current thread"), []))
        elif line.strip().startswith("File ") and blocks:
            blocks[-1][1].append(line.strip().removeprefix("File "))
    current = [frames for is_current, frames in blocks if is_current]
    frames = current[0] if current else (blocks[0][1] if blocks else [])
    return sig or "a fatal signal", frames


def death_report(stats_dir: str | Path, stopping_since: float | None = None) -> tuple[
        list[Death], list[str], bool]:
    """Processes that died from a signal, the requests in flight in those engines, and
    whether that list is exact: an API server that outlived its EngineCore names the HTTP
    requests open when it saw the death; otherwise each process's last snapshot of its open
    requests (written every flush, so up to a flush interval old) is all there is.

    A stop signal (what `kvprof attach` forwards) or a SIGKILL after the launcher began
    stopping is an ordinary end, not a death.
    """
    root = Path(stats_dir)
    stats = {int(d["pid"]): d for p in root.glob("[0-9]*.json")
             if (d := _read_json(p)) and "pid" in d}
    exits = {int(d["pid"]): d for p in root.glob("exit-*.json")
             if (d := _read_json(p)) and "pid" in d}
    deaths: list[Death] = []
    for pid in sorted(set(stats) | {int(p.stem) for p in root.glob("[0-9]*.fault")}):
        info = stats.get(pid, {})
        if info.get("clean_exit"):
            continue
        sig, stack = _fault(root / f"{pid}.fault")
        when = None
        if sig is None:
            code = exits.get(pid, {}).get("returncode")
            if not isinstance(code, int) or code >= 0:
                continue  # exited normally, or nobody saw how (still running, reparented)
            when = exits[pid].get("t")
            number = -code
            late = stopping_since is not None and when is not None and when >= stopping_since
            if number in STOP_SIGNALS or (number == signal.SIGKILL and late):
                continue
            sig = signal_name(number)
        deaths.append(Death(pid, str(info.get("name") or "python"), info.get("service"),
                            info.get("role"), sig, when, stack))
    at_death = sorted({str(r) for d in stats.values() for r in d.get("inflight_at_death") or []})
    if at_death:
        return deaths, at_death, True
    inflight = sorted({str(r) for d in stats.values()
                       for r in (d.get("inflight") or []) + (d.get("open_at_exit") or [])})
    return deaths, inflight, False


def crash_reason(stats_dir: str | None) -> str | None:
    """What killed a sibling process, for the spans this process closes on its way out."""
    if not stats_dir:
        return None
    try:
        deaths, _, _ = death_report(stats_dir)
    except OSError:  # the launcher removed its folder first: nobody left to tell
        return None
    deaths = [d for d in deaths if d.pid != os.getpid()]
    if not deaths:
        return None
    return "; ".join(d.describe().split(";")[0] for d in deaths[:3])
