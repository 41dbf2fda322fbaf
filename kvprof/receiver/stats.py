"""What the receiver counted: spans stored, payloads refused, signals ignored; the summary line."""

from __future__ import annotations

import logging
import threading
from typing import Any

from kvprof.receiver.payload import REASONS

log = logging.getLogger(__name__)

# How many refusals of one kind are logged before the rest are only counted: a sender that
# retries a bad payload must not flood stderr. Logs and metrics exports (Dynamo's Rust side
# sends its logs every few seconds) are mentioned once.
LOGGED_PER_KIND = 3
LOGGED_PER_IGNORED = 1


class ReceiverStats:
    """Thread-safe counters shared by both servers and the writer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.payloads = 0
        self.spans = 0
        self.spans_rejected = 0
        self.rejected = dict.fromkeys(REASONS, 0)
        self.grpc_undelivered = 0
        self.ignored: dict[str, int] = {}  # "logs" / "metrics" / "other" -> requests
        self.dropped: dict[str, int] = {}  # "logs" / "metrics" -> log records / data points
        self.spans_written = 0
        self.spans_lost = 0
        self.files = 0
        self.bytes_written = 0
        self._logged: dict[str, int] = {}

    def accepted(self, spans: int, rejected_spans: int) -> None:
        with self._lock:
            self.payloads += 1
            self.spans += spans
            self.spans_rejected += rejected_spans

    def refused(self, reason: str, message: str, peer: str = "") -> None:
        with self._lock:
            self.rejected[reason] += 1
        self._note(f"refused:{reason}", LOGGED_PER_KIND,
                   "kvprof traces receive: refused a payload%s (%s): %s",
                   f" from {peer}" if peer else "", reason.replace("_", " "), message)

    def ignored_signal(self, signal: str, where: str) -> None:
        """A request for something that is not OTLP traces (an unknown path or method)."""
        with self._lock:
            self.ignored[signal] = self.ignored.get(signal, 0) + 1
        self._note(f"ignored:{signal}", LOGGED_PER_IGNORED,
                   "kvprof traces receive: %s export at %s answered 'not implemented' "
                   "(only traces are received)", signal, where)

    def dropped_signal(self, signal: str, items: int, where: str) -> None:
        """A logs or metrics export, taken and thrown away (the sender is told how many)."""
        with self._lock:
            self.ignored[signal] = self.ignored.get(signal, 0) + 1
            self.dropped[signal] = self.dropped.get(signal, 0) + items
        self._note(f"ignored:{signal}", LOGGED_PER_IGNORED,
                   "kvprof traces receive: %s export at %s dropped (only traces are stored; "
                   "the sender is told so in its partial_success answer)", signal, where)

    def written(self, spans: int, nbytes: int) -> None:
        with self._lock:
            self.spans_written += spans
            self.bytes_written += nbytes

    def lost(self, spans: int) -> None:
        with self._lock:
            self.spans_lost += spans

    @property
    def payloads_rejected(self) -> int:
        return sum(self.rejected.values()) + self.grpc_undelivered

    def _note(self, kind: str, most: int, fmt: str, *args: Any) -> None:
        with self._lock:
            n = self._logged[kind] = self._logged.get(kind, 0) + 1
        if n <= most:
            log.warning(fmt + ("; further ones are only counted" if n == most else ""), *args)

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "spans_received": self.spans,
                "spans_written": self.spans_written,
                "spans_rejected": self.spans_rejected,
                "spans_lost": self.spans_lost,
                "payloads_accepted": self.payloads,
                "payloads_rejected": sum(self.rejected.values()) + self.grpc_undelivered,
                "payloads_rejected_by_reason": {
                    **{k: v for k, v in self.rejected.items() if v},
                    **({"grpc_undelivered": self.grpc_undelivered}
                       if self.grpc_undelivered else {}),
                },
                "ignored_requests": dict(self.ignored),
                "dropped_items": dict(self.dropped),
                "files_written": self.files,
                "bytes_written": self.bytes_written,
            }

    def summary_line(self, directory: str, why: str) -> str:
        d = self.as_dict()
        parts = [f"{_n(d['spans_received'], 'span')} received in "
                 f"{_n(d['payloads_accepted'], 'payload')}",
                 f"{_n(d['payloads_rejected'], 'payload')} rejected"]
        if d["payloads_rejected_by_reason"]:
            parts[-1] += " (" + ", ".join(
                f"{k.replace('_', ' ')} {v}" for k, v in d["payloads_rejected_by_reason"].items()
            ) + ")"
        if d["spans_rejected"]:
            parts.append(f"{_n(d['spans_rejected'], 'span')} rejected (bad ids)")
        if d["spans_lost"]:
            parts.append(f"{_n(d['spans_lost'], 'span')} lost to write errors")
        if d["ignored_requests"]:
            parts.append(", ".join(
                f"{_n(v, k + ' request')} ignored" + (
                    f" ({_n(d['dropped_items'][k], _ITEM[k])} dropped)"
                    if k in d["dropped_items"] else "")
                for k, v in sorted(d["ignored_requests"].items())))
        parts.append(f"{_n(d['files_written'], 'file')} written under {directory}")
        return f"kvprof traces receive: stopped ({why}): " + "; ".join(parts)


_ITEM = {"logs": "log record", "metrics": "data point"}


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")
