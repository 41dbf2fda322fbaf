"""Trace and span ids both sides of a P/D pair can derive alone, and W3C traceparent helpers."""

from __future__ import annotations

import hashlib
import re

# vLLM's frontend makes the engine-internal id "<external id>-<8 hex chars>"; the external id
# is what a router passes to both engines (X-Request-Id), so it is the key both sides share.
_SUFFIX = re.compile(r"^(.+)-[0-9a-f]{8}$")
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def external_request_id(internal_id: str) -> str:
    """The request id the client/router chose, without the engine's random suffix."""
    m = _SUFFIX.match(internal_id)
    return m.group(1) if m else internal_id


def _digest(*parts: str) -> bytes:
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).digest()


def trace_id_for(key: str) -> int:
    """The 128-bit trace id of the request whose prefill-side external id is ``key``."""
    value = int.from_bytes(_digest("kvprof-trace", key), "big")
    return value or 1


def span_id_for(key: str, name: str) -> int:
    """A 64-bit span id any process can recompute from the trace key and the span name."""
    value = int.from_bytes(_digest("kvprof-span", key, name)[:8], "big")
    return value or 1


def format_traceparent(trace_id: int, span_id: int) -> str:
    """W3C trace-context header value for a sampled span."""
    return f"00-{trace_id:032x}-{span_id:016x}-01"


def parse_traceparent(value: object) -> tuple[int, int] | None:
    """(trace_id, parent_span_id) from a traceparent string; None if absent or malformed."""
    if not isinstance(value, str):
        return None
    m = _TRACEPARENT.match(value.strip().lower())
    if not m:
        return None
    trace_id, span_id = int(m.group(1), 16), int(m.group(2), 16)
    if trace_id == 0 or span_id == 0:
        return None
    return trace_id, span_id


def effective_trace(key: str, *traceparents: object) -> tuple[int, int | None]:
    """(trace_id, parent span id) of a request: the first valid traceparent given (the
    caller's trace headers, then the one the prefill side put in kv_transfer_params), else
    the trace derived from ``key`` with no parent. Every process of an engine calls this with
    the same inputs, so their spans land in one trace, the caller's when there is one."""
    for tp in traceparents:
        ctx = parse_traceparent(tp)
        if ctx is not None:
            return ctx
    return trace_id_for(key), None
