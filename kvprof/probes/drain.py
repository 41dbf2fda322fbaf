"""Stop drain: every probed process writes out its spans before the stop signal reaches it.

vLLM stops its EngineCore with SIGTERM followed at once by SIGKILL (its default
``shutdown_timeout`` is 0), so an engine's exit flush never runs: whatever its export thread
had not yet written (the last half second of spans, transfers still waiting for their NIXL
stats, requests in flight) would be lost with it. `kvprof attach` therefore holds a stop
signal back: it leaves a marker in the stats directory, each probed process's export thread
sees it on its next wake, writes everything out and answers in its stats file, and only
then (or after a bounded wait) does the signal go on to the command.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

MARKER = "stopping"  # in the stats directory; holds the request's token
STATS_KEY = "drained"  # a process's stats file: the token it has answered
DEFAULT_TIMEOUT_S = 3.0  # a few export intervals; Kubernetes grants 30 s by default


def request(stats_dir: str) -> str:
    """Ask every probed process to drain; returns the token their answers carry."""
    token = f"{os.getpid()}-{time.time_ns()}"
    path = os.path.join(stats_dir, MARKER)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(token)
    os.replace(tmp, path)
    return token


class Watch:
    """A probed process's view of the marker: ``poll()`` gives a new token once."""

    def __init__(self, stats_dir: str | None):
        self.path = os.path.join(stats_dir, MARKER) if stats_dir else None
        self._seen_mtime: int | None = None

    def poll(self) -> str | None:
        if self.path is None:
            return None
        try:
            mtime = os.stat(self.path).st_mtime_ns
            if mtime == self._seen_mtime:
                return None
            with open(self.path) as fh:
                token = fh.read().strip()
        except OSError:
            return None
        self._seen_mtime = mtime
        return token or None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pending(stats_dir: str, token: str) -> list[int]:
    """Live probed processes that have not yet answered ``token``."""
    waiting = []
    for path in Path(stats_dir).glob("[0-9]*.json"):  # <pid>.json, not exit records
        try:
            doc = json.loads(path.read_text())
            pid = int(doc["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if doc.get(STATS_KEY) == token or doc.get("clean_exit") or not _alive(pid):
            continue
        waiting.append(pid)
    return sorted(waiting)


def wait(stats_dir: str, token: str, timeout_s: float,
         give_up: Callable[[], bool] = lambda: False) -> tuple[int, list[int], float]:
    """Wait until every live probed process answered (or timeout, or ``give_up()``).

    Returns (processes asked, processes that did not answer, seconds waited).
    """
    start = time.monotonic()
    left = pending(stats_dir, token)
    asked = len(left)
    while left and time.monotonic() - start < timeout_s and not give_up():
        time.sleep(0.02)
        left = pending(stats_dir, token)
    return asked, left, time.monotonic() - start
