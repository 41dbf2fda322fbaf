"""Received spans on disk: OTLP/JSON-lines files rotated by size, written by one thread.

The files are what kvprof's probes write (kvprof.otlp_json), named
``received-<pid>-NNNN.jsonl``. Every line is one ExportTraceServiceRequest put down with one
write() on an O_APPEND descriptor, and a file is only closed (and the next one opened) between
lines, so a finished file never ends in half a line; a reader of the file being written may
see its last line still growing, which kvprof's loader reports and skips.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path

from kvprof.otlp_json import dumps_line, iter_request_json
from kvprof.receiver.queue import PayloadQueue
from kvprof.receiver.stats import ReceiverStats

log = logging.getLogger(__name__)

# Spans per line: a 5,000-span export becomes five lines, so neither a line nor the encoder's
# Python objects grow with the sender's batch size.
SPANS_PER_LINE = 1024
# After a write error, senders are told to retry for this long before the next attempt.
WRITE_BACKOFF_S = 5.0


class JsonlFileSeries:
    """``<prefix>-NNNN.jsonl`` files in one directory; a new one when max_bytes would pass."""

    def __init__(self, directory: str | os.PathLike, prefix: str, max_bytes: int):
        self.directory = Path(directory)
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.files: list[Path] = []
        self._fd: int | None = None
        self._size = 0
        self._index = self._first_free_index()

    def _first_free_index(self) -> int:
        # A restarted receiver with the same pid (pid 1 in a container) starts a new file
        # instead of appending to the previous run's.
        pattern = re.compile(re.escape(self.prefix) + r"-(\d+)\.jsonl$")
        taken = [int(m.group(1)) for p in self.directory.glob(f"{self.prefix}-*.jsonl")
                 if (m := pattern.match(p.name))]
        return max(taken) + 1 if taken else 0

    def write(self, line: bytes) -> None:
        """Append one whole line (raises OSError)."""
        if self._fd is None or (self._size and self._size + len(line) > self.max_bytes):
            self._open_next()
        start = self._size
        view = memoryview(line)
        try:
            while view:
                # One write for the whole line on regular files; the loop only covers a short
                # write (a signal), after which the rest of the line follows.
                n = os.write(self._fd, view)
                view = view[n:]
                self._size += n
        except OSError:
            # A full disk mid-line: cut the file back to its last whole line.
            try:
                os.ftruncate(self._fd, start)
                self._size = start
            except OSError:
                self.close()  # the next line starts a new file
            raise

    def _open_next(self) -> None:
        self.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.prefix}-{self._index:04d}.jsonl"
        self._index += 1
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._size = os.fstat(self._fd).st_size
        self.files.append(path)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            except OSError as exc:
                log.warning("kvprof traces receive: cannot sync %s: %s", self.files[-1],
                            exc.strerror)
            finally:
                os.close(fd)


class StoreWriter(threading.Thread):
    """The one thread that turns queued requests into lines of the file series."""

    def __init__(self, queue: PayloadQueue, series: JsonlFileSeries, stats: ReceiverStats,
                 spans_per_line: int = SPANS_PER_LINE):
        super().__init__(name="kvprof-receiver-writer", daemon=True)
        self.queue = queue
        self.series = series
        self.stats = stats
        self.spans_per_line = spans_per_line
        self._failing_until = 0.0
        self._done = 0  # spans of the current payload already on disk
        self.last_error = ""

    def failing(self) -> str:
        """Why the store cannot take spans right now ('' when it can)."""
        return self.last_error if time.monotonic() < self._failing_until else ""

    def run(self) -> None:
        while True:
            got = self.queue.get()
            if got is None:
                break
            (data, spans), nbytes = got
            self._done = 0
            try:
                self._write(data)
            except OSError as exc:
                self._fail(spans - self._done, f"cannot write to {self.series.directory}: "
                           f"{exc.strerror or exc}")
            except Exception as exc:  # a bug must cost this payload, not the receiver
                log.exception("kvprof traces receive: cannot encode a payload")
                self._fail(spans - self._done,
                           f"cannot encode a payload: {type(exc).__name__}: {exc}")
            finally:
                self.queue.release(nbytes)
        self.series.close()
        self.stats.files = len(self.series.files)

    def _write(self, data: bytes) -> None:
        from kvprof.receiver.payload import decode_protobuf

        request = decode_protobuf(data)
        for doc in iter_request_json(request, self.spans_per_line):
            n = sum(len(ss.get("spans", ())) for rs in doc["resourceSpans"]
                    for ss in rs.get("scopeSpans", ()))
            if not n:
                continue
            line = dumps_line(doc)
            self.series.write(line)
            self._done += n
            self.stats.written(n, len(line))
            self.stats.files = len(self.series.files)

    def _fail(self, spans: int, why: str) -> None:
        if not self.failing():
            log.warning("kvprof traces receive: %s; senders are told to retry for %g s",
                        why, WRITE_BACKOFF_S)
        self.last_error = why
        self._failing_until = time.monotonic() + WRITE_BACKOFF_S
        self.stats.lost(spans)
