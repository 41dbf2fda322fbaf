"""The hand-off from the servers to the writer thread, bounded in bytes, not in items.

A server reserves a payload's bytes before it reads the body, so bodies being read, payloads
waiting and the one being written all count against the same bound: when it is reached the
sender is told to retry (503 / UNAVAILABLE) and memory stays where it is.
"""

from __future__ import annotations

import collections
import threading
from typing import Any


class PayloadQueue:
    """FIFO of (item, bytes) whose reserved + queued + in-write bytes never pass max_bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: collections.deque[tuple[Any, int]] = collections.deque()
        self._used = 0
        self.peak = 0
        self._closed = False
        self._cond = threading.Condition()

    @property
    def used(self) -> int:
        return self._used

    def room(self) -> int:
        """Bytes that could be reserved now."""
        with self._cond:
            return max(0, self.max_bytes - self._used)

    def reserve(self, n: int) -> bool:
        """Claim n bytes for a payload about to be read; False when full or closed."""
        with self._cond:
            if self._closed or self._used + n > self.max_bytes:
                return False
            self._used += n
            self.peak = max(self.peak, self._used)
            return True

    def resize(self, held: int, n: int) -> bool:
        """Turn a reservation of ``held`` bytes into one of n; shrinking always succeeds."""
        with self._cond:
            if n > held and self._used - held + n > self.max_bytes:
                return False
            self._used += n - held
            self.peak = max(self.peak, self._used)
            return True

    def release(self, n: int) -> None:
        """Give back n reserved bytes (a refused payload, or one the writer has finished)."""
        with self._cond:
            self._used -= n
            self._cond.notify_all()

    def put(self, item: Any, n: int) -> bool:
        """Queue an item that holds a reservation of n bytes; False once closed."""
        with self._cond:
            if self._closed:
                return False
            self._items.append((item, n))
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None) -> tuple[Any, int] | None:
        """The next (item, bytes); None when closed and drained, or on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout):
                return None
            return self._items.popleft() if self._items else None

    def close(self) -> None:
        """Refuse new reservations and items; get() drains what is queued, then gives None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
