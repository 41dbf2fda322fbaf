"""Decode one OTLP trace export (protobuf or OTLP/JSON, maybe gzip) and screen its spans."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

# Why a payload was refused; each server maps these to its status codes.
INVALID = "invalid"  # HTTP 400, gRPC INVALID_ARGUMENT
TOO_LARGE = "too_large"  # HTTP 413, gRPC RESOURCE_EXHAUSTED
UNSUPPORTED = "unsupported"  # HTTP 415 (content type or encoding)
UNAVAILABLE = "unavailable"  # HTTP 503, gRPC UNAVAILABLE: retry later
REASONS = (INVALID, TOO_LARGE, UNSUPPORTED, UNAVAILABLE)

PROTOBUF = "protobuf"
JSON = "json"

_ZERO_TRACE = bytes(16)
_ZERO_SPAN = bytes(8)
SCREEN_RULE = "trace_id must be 16 bytes and span_id 8 bytes, neither all zero"


class Rejection(Exception):
    """A payload refused as a whole, with the reason class and a message for the sender."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class Screened:
    """A request ready to queue: its wire bytes (only valid spans) and its span counts."""

    data: bytes
    spans: int
    rejected: int

    @property
    def error_message(self) -> str:
        if not self.rejected:
            return ""
        return f"{self.rejected} span(s) rejected: {SCREEN_RULE}"


def gunzip(body: bytes, limit: int) -> bytes:
    """The gzip body decompressed, refusing more than ``limit`` bytes (no gzip bombs)."""
    out = bytearray()
    data = body
    try:
        while True:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out += d.decompress(data, limit + 1 - len(out))
            if len(out) > limit:
                raise Rejection(TOO_LARGE, f"gzip body inflates past {limit} bytes")
            if d.unconsumed_tail:
                raise Rejection(TOO_LARGE, f"gzip body inflates past {limit} bytes")
            if not d.eof:
                raise Rejection(INVALID, "gzip body is truncated")
            data = d.unused_data
            if not data:  # concatenated gzip members are one stream (RFC 1952)
                return bytes(out)
    except zlib.error as exc:
        raise Rejection(INVALID, f"body is not valid gzip ({exc})") from None


def decode_protobuf(body: bytes) -> ExportTraceServiceRequest:
    """Wire bytes -> ExportTraceServiceRequest, or Rejection(INVALID)."""
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except (DecodeError, RecursionError, ValueError) as exc:
        raise Rejection(INVALID, "body is not a protobuf ExportTraceServiceRequest "
                        f"({exc or type(exc).__name__})") from None
    return request


def decode_json(body: bytes) -> ExportTraceServiceRequest:
    """OTLP/JSON bytes -> ExportTraceServiceRequest, or Rejection(INVALID)."""
    from kvprof.otlp_json import json_to_request

    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise Rejection(INVALID, f"body is not JSON ({exc})") from None
    try:
        return json_to_request(doc)
    except ValueError as exc:
        raise Rejection(INVALID, f"body is not an OTLP/JSON ExportTraceServiceRequest ({exc})"
                        ) from None


def screen(request: ExportTraceServiceRequest, wire: bytes | None) -> Screened:
    """Drop spans no trace file should hold (ids of the wrong size or all zero).

    ``wire`` is the request's own wire bytes when it came as protobuf: kept as they are when
    every span passes, so a clean export is never re-serialized.
    """
    spans = rejected = 0
    changed = False
    for rs in request.resource_spans:
        for ss in rs.scope_spans:
            bad = []
            for i, sp in enumerate(ss.spans):
                if not _valid_ids(sp):
                    bad.append(i)
                elif sp.parent_span_id == _ZERO_SPAN:
                    # An all-zero parent is no parent (W3C): a root, not a child of "000...".
                    sp.parent_span_id = b""
                    changed = True
            for i in reversed(bad):
                del ss.spans[i]
            rejected += len(bad)
            spans += len(ss.spans)
    keep = wire is not None and not rejected and not changed
    data = wire if keep else request.SerializeToString()
    return Screened(data=data, spans=spans, rejected=rejected)


def _valid_ids(sp) -> bool:
    t, s, p = sp.trace_id, sp.span_id, sp.parent_span_id
    return (len(t) == 16 and t != _ZERO_TRACE and len(s) == 8 and s != _ZERO_SPAN
            and len(p) in (0, 8))
