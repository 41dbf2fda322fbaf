"""OTLP/JSON (ExportTraceServiceRequest) reading and writing, to and from span records.

A *span record* is the one full-fidelity, format-neutral shape conversion goes through:
``{"trace_id", "span_id", "parent_span_id", "name", "kind", "start_ns", "end_ns",
"attributes": {key: value}, "resource": {key: value}, "scope": {"name", "version"},
"status": {"code", "message"}, "events": [{"name", "time_ns", "attributes"}]}``; ids are
lowercase hex, times integer nanoseconds since the epoch, attribute values plain Python
(str, bool, int, float, list).

What makes a span *malformed* (skipped and counted by every loader, never fatal on its own;
the same rules on the Arrow fast path, the stdlib path, Jaeger JSON and `traces convert`):

- ``traceId`` / ``spanId`` missing, not a string, all zeros (the W3C/OTLP invalid id), or
  neither 32 / 16 hex digits (any case; OTLP/JSON's form) nor the base64 of 16 / 8 bytes
  (what a plain protobuf-JSON encoder writes for ``bytes``), which is decoded to hex.
  Jaeger JSON ids are hex only; it drops leading zeros and allows 64-bit trace ids, so
  1-32 / 1-16 hex digits are left-padded with zeros to the OTLP length.
- ``startTimeUnixNano`` / ``endTimeUnixNano`` (Jaeger: ``startTime`` / ``duration``) missing,
  0 (protobuf's "unset"), not a whole number (a decimal string as Python's int() reads it,
  a JSON integer, or an integral float), negative, beyond int64, or end before start. Equal
  times are fine.

A malformed ``parentSpanId`` (or Jaeger CHILD_OF reference) does not drop the span: its
times and attributes are sound, and the span is kept as a root (no parent) and counted, so
the loss is visible. An absent, empty or all-zero parent id is simply a root.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from kvprof.errors import BadInputError

# OTLP's span kind enum (opentelemetry-proto trace.proto); JSON may carry the number or name.
SPAN_KINDS = {
    0: "SPAN_KIND_UNSPECIFIED",
    1: "SPAN_KIND_INTERNAL",
    2: "SPAN_KIND_SERVER",
    3: "SPAN_KIND_CLIENT",
    4: "SPAN_KIND_PRODUCER",
    5: "SPAN_KIND_CONSUMER",
}
_KIND_NUMBERS = {name: num for num, name in SPAN_KINDS.items()}


def kind_number(kind: Any) -> int:
    """OTLP span kind as its enum number (accepts the number or the SPAN_KIND_* name)."""
    if isinstance(kind, int):
        return kind
    if isinstance(kind, str):
        if kind.isdigit():
            return int(kind)
        return _KIND_NUMBERS.get(kind.upper(), 0)
    return 0


_STATUS_NUMBERS = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2,
                   "UNSET": 0, "OK": 1, "ERROR": 2}


def status_number(code: Any) -> int:
    """OTLP status code as its number (accepts the number or the STATUS_CODE_* name)."""
    if isinstance(code, bool):
        return 0
    if isinstance(code, int):
        return code
    if isinstance(code, str):
        return int(code) if code.isdigit() else _STATUS_NUMBERS.get(code.upper(), 0)
    return 0


def decode_any_value(value: dict) -> Any:
    """One OTLP AnyValue JSON object -> a Python value (intValue arrives as a string)."""
    if not isinstance(value, dict) or not value:
        return None
    key, raw = next(iter(value.items()))
    if key == "stringValue":
        return raw
    if key == "intValue":
        return int(raw)
    if key == "doubleValue":
        return float(raw)
    if key == "boolValue":
        return bool(raw)
    if key == "arrayValue":
        return [decode_any_value(v) for v in (raw or {}).get("values", [])]
    if key == "kvlistValue":
        return {kv["key"]: decode_any_value(kv.get("value", {})) for kv in raw.get("values", [])}
    if key == "bytesValue":
        return raw
    return raw


def encode_any_value(value: Any) -> dict:
    """A Python value -> OTLP AnyValue JSON (ints as strings, as the protobuf JSON mapping says)."""
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, (list, tuple)):
        return {"arrayValue": {"values": [encode_any_value(v) for v in value]}}
    if isinstance(value, dict):
        return {"kvlistValue": {"values": encode_attributes(value)}}
    return {"stringValue": "" if value is None else str(value)}


def decode_attributes(attrs: Iterable[dict] | None) -> dict[str, Any]:
    """OTLP KeyValue list -> dict."""
    return {a["key"]: decode_any_value(a.get("value", {})) for a in attrs or ()}


def encode_attributes(attrs: dict[str, Any]) -> list[dict]:
    """dict -> OTLP KeyValue list."""
    return [{"key": k, "value": encode_any_value(v)} for k, v in attrs.items()]


def is_otlp_document(doc: Any) -> bool:
    """True for an ExportTraceServiceRequest-shaped JSON object."""
    return isinstance(doc, dict) and isinstance(doc.get("resourceSpans"), list)


# --- malformed spans (the rules are in the module docstring) ------------------------------

MAX_UNIX_NANOS = 2**63 - 1  # the span table keeps int64 nanoseconds
_HEX_DIGITS = re.compile(r"[0-9a-f]+")
_SHOWN = 40  # characters of a bad value quoted in a reason


class MalformedSpan(ValueError):
    """One span cannot be used; the message is the reason, as the user will read it."""


@dataclass
class SpanProblems:
    """Malformed spans met while reading one source: how many, and the first reason of each kind.

    Loaders skip a malformed span and count it here; a malformed parent id only turns its
    span into a root, counted apart (``parents_dropped``).
    """

    skipped: int = 0
    first_skip: str | None = None
    parents_dropped: int = 0
    first_parent: str | None = None

    def skip(self, reason: str) -> None:
        self.skipped += 1
        if self.first_skip is None:
            self.first_skip = reason

    def drop_parent(self, reason: str) -> None:
        self.parents_dropped += 1
        if self.first_parent is None:
            self.first_parent = reason

    def merge(self, other: SpanProblems) -> None:
        self.skipped += other.skipped
        self.first_skip = self.first_skip or other.first_skip
        self.parents_dropped += other.parents_dropped
        self.first_parent = self.first_parent or other.first_parent

    def __bool__(self) -> bool:
        return bool(self.skipped or self.parents_dropped)

    def skip_text(self) -> str:
        return f"{self.skipped} malformed span(s) skipped (first: {self.first_skip})"

    def parent_text(self) -> str:
        return (f"{self.parents_dropped} span(s) with a malformed parent id kept as roots "
                f"(first: {self.first_parent})")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def span_label(name: Any, trace_id: Any = None) -> str:
    """How a reason names a span: its name, and its trace id when that is printable."""
    label = f"span {_shown(name if name not in (None, '') else '(no name)')}"
    if isinstance(trace_id, str) and trace_id and len(trace_id) <= 32:
        label += f" of trace {trace_id}"
    return label


def _from_base64(value: str, nbytes: int) -> str | None:
    """Hex of a base64 (standard or URL-safe, padding optional) id of exactly nbytes bytes."""
    text = value.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == nbytes else None


def span_id_hex(value: Any, nbytes: int, field: str, jaeger: bool = False) -> str:
    """An id as 2*nbytes lowercase hex digits, or MalformedSpan saying why it is not one."""
    if value is None or value == "":
        raise MalformedSpan(f"{field} is missing")
    if not isinstance(value, str):
        raise MalformedSpan(f"{field} is not a string ({type(value).__name__} {_shown(value)})")
    digits = 2 * nbytes
    low = value.lower()
    if len(low) == digits and _HEX_DIGITS.fullmatch(low):
        out = low
    elif jaeger and len(low) < digits and _HEX_DIGITS.fullmatch(low):
        out = low.rjust(digits, "0")
    else:
        out = None if jaeger else _from_base64(value, nbytes)
        if out is None:
            form = f"1-{digits}" if jaeger else f"{digits}"
            extra = "" if jaeger else f" nor base64 of {nbytes} bytes"
            raise MalformedSpan(f"{field} {_shown(value)} is not {form} hex digits{extra}")
    if out.count("0") == digits:
        raise MalformedSpan(f"{field} is all zeros (an invalid id)")
    return out


def parent_id_hex(value: Any, field: str, jaeger: bool = False) -> tuple[str, str | None]:
    """(parent id or "" for a root, why a malformed parent id was dropped or None)."""
    if value is None or value == "":
        return "", None
    if isinstance(value, str) and value.strip("0") == "":
        return "", None  # some exporters write zeros for "no parent"
    try:
        return span_id_hex(value, 8, field, jaeger), None
    except MalformedSpan as exc:
        return "", str(exc)


def whole_number(value: Any, field: str, allow_zero: bool = False) -> int:
    """A JSON time (decimal string, integer or integral float) as an int, or MalformedSpan."""
    if value is None or value == "":
        raise MalformedSpan(f"{field} is missing")
    if isinstance(value, bool):
        raise MalformedSpan(f"{field} is a boolean, not a number")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        try:
            number = int(value)
        except ValueError:
            raise MalformedSpan(f"{field} {_shown(value)} is not a whole number") from None
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    else:
        raise MalformedSpan(f"{field} {_shown(value)} is not a whole number")
    if number < 0:
        raise MalformedSpan(f"{field} {number} is negative")
    if number == 0 and not allow_zero:
        raise MalformedSpan(f"{field} is 0 (unset)")
    if number > MAX_UNIX_NANOS:
        raise MalformedSpan(f"{field} {number} is beyond int64 nanoseconds")
    return number


def span_times(start: Any, end: Any) -> tuple[int, int]:
    """(start_ns, end_ns) of an OTLP span, or MalformedSpan."""
    start_ns = whole_number(start, "startTimeUnixNano")
    end_ns = whole_number(end, "endTimeUnixNano")
    if end_ns < start_ns:
        raise MalformedSpan(f"endTimeUnixNano {end_ns} is before startTimeUnixNano {start_ns}")
    return start_ns, end_ns


def check_otlp_span(trace_id: Any, span_id: Any, parent: Any, start: Any, end: Any
                    ) -> tuple[str, str, str, int, int, str | None]:
    """Normalised (trace, span, parent, start_ns, end_ns, parent-dropped reason) of one span.

    Raises MalformedSpan when the span must be skipped.
    """
    tid = span_id_hex(trace_id, 16, "traceId")
    sid = span_id_hex(span_id, 8, "spanId")
    start_ns, end_ns = span_times(start, end)
    pid, why = parent_id_hex(parent, "parentSpanId")
    return tid, sid, pid, start_ns, end_ns, why


def _strict(problems: SpanProblems | None) -> SpanProblems:
    return problems if problems is not None else SpanProblems()


def raise_if_strict(problems: SpanProblems | None, local: SpanProblems) -> None:
    """Without a SpanProblems to count into, a malformed span is an error (no silent loss)."""
    if problems is None and local:
        raise BadInputError(f"malformed span: {local.first_skip or local.first_parent}",
                            hint="Pass a SpanProblems to skip and count malformed spans.")


def otlp_to_records(doc: dict, problems: SpanProblems | None = None) -> Iterator[dict]:
    """Yield span records from one ExportTraceServiceRequest JSON object.

    Malformed spans (see the module docstring) are skipped and counted in `problems`; without
    it the first one raises BadInputError.
    """
    counted = _strict(problems)
    for rs in doc.get("resourceSpans") or ():
        resource = decode_attributes((rs.get("resource") or {}).get("attributes"))
        # Old collector versions wrote instrumentationLibrarySpans instead of scopeSpans.
        for ss in (rs.get("scopeSpans") or rs.get("instrumentationLibrarySpans") or ()):
            scope = ss.get("scope") or ss.get("instrumentationLibrary") or {}
            scope_rec = {"name": scope.get("name", ""), "version": scope.get("version", "")}
            for sp in ss.get("spans") or ():
                try:
                    rec = _otlp_record(sp, resource, scope_rec, counted)
                except MalformedSpan as exc:
                    counted.skip(f"{span_label(_name_of(sp), _trace_of(sp))}: {exc}")
                    raise_if_strict(problems, counted)
                    continue
                raise_if_strict(problems, counted)
                yield rec


def _name_of(sp: Any) -> Any:
    return sp.get("name") if isinstance(sp, dict) else None


def _trace_of(sp: Any) -> Any:
    return sp.get("traceId") if isinstance(sp, dict) else None


def _otlp_record(sp: Any, resource: dict, scope_rec: dict, counted: SpanProblems) -> dict:
    if not isinstance(sp, dict):
        raise MalformedSpan(f"is a {type(sp).__name__}, not an object")
    tid, sid, pid, start_ns, end_ns, parent_why = check_otlp_span(
        sp.get("traceId"), sp.get("spanId"), sp.get("parentSpanId"),
        sp.get("startTimeUnixNano"), sp.get("endTimeUnixNano"))
    try:
        status = sp.get("status") or {}
        rec = {
            "trace_id": tid,
            "span_id": sid,
            "parent_span_id": pid,
            "name": sp.get("name", ""),
            "kind": kind_number(sp.get("kind", 0)),
            "start_ns": start_ns,
            "end_ns": end_ns,
            "attributes": decode_attributes(sp.get("attributes")),
            "resource": resource,
            "scope": scope_rec,
            "status": {
                "code": status_number(status.get("code", 0)) if status else 0,
                "message": status.get("message", ""),
            },
            "events": [
                {
                    "name": ev.get("name", ""),
                    "time_ns": int(ev.get("timeUnixNano") or 0),
                    "attributes": decode_attributes(ev.get("attributes")),
                }
                for ev in sp.get("events") or ()
            ],
        }
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MalformedSpan(f"attributes, status or events malformed ({type(exc).__name__}: "
                            f"{exc})") from None
    if parent_why:
        counted.drop_parent(f"{span_label(rec['name'], tid)}: {parent_why}")
    return rec


def records_to_otlp(records: Iterable[dict]) -> dict:
    """Span records -> one ExportTraceServiceRequest JSON object, grouped by resource and scope."""
    groups: dict[str, dict] = {}
    for rec in records:
        res = rec.get("resource") or {}
        res_key = json.dumps(res, sort_keys=True, default=str)
        group = groups.setdefault(res_key, {"resource": res, "scopes": {}})
        scope = rec.get("scope") or {"name": "", "version": ""}
        scope_key = json.dumps(scope, sort_keys=True)
        group["scopes"].setdefault(scope_key, (scope, []))[1].append(rec)
    out = []
    for group in groups.values():
        scope_spans = []
        for scope, recs in group["scopes"].values():
            spans = []
            for rec in recs:
                span: dict[str, Any] = {
                    "traceId": rec["trace_id"],
                    "spanId": rec["span_id"],
                    "name": rec["name"],
                    "kind": kind_number(rec.get("kind", 0)),
                    "startTimeUnixNano": str(int(rec["start_ns"])),
                    "endTimeUnixNano": str(int(rec["end_ns"])),
                    "attributes": encode_attributes(rec.get("attributes") or {}),
                }
                if rec.get("parent_span_id"):
                    span["parentSpanId"] = rec["parent_span_id"]
                status = rec.get("status") or {}
                if status.get("code") or status.get("message"):
                    span["status"] = {k: v for k, v in status.items() if v}
                if rec.get("events"):
                    span["events"] = [
                        {
                            "name": ev["name"],
                            "timeUnixNano": str(int(ev["time_ns"])),
                            "attributes": encode_attributes(ev.get("attributes") or {}),
                        }
                        for ev in rec["events"]
                    ]
                spans.append(span)
            scope_spans.append({"scope": {k: v for k, v in scope.items() if v}, "spans": spans})
        out.append(
            {
                "resource": {"attributes": encode_attributes(group["resource"])},
                "scopeSpans": scope_spans,
            }
        )
    return {"resourceSpans": out}
