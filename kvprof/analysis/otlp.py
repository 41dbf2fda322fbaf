"""OTLP/JSON (ExportTraceServiceRequest) reading and writing, to and from span records.

A *span record* is the one full-fidelity, format-neutral shape conversion goes through:
``{"trace_id", "span_id", "parent_span_id", "name", "kind", "start_ns", "end_ns",
"attributes": {key: value}, "resource": {key: value}, "scope": {"name", "version"},
"status": {"code", "message"}, "events": [{"name", "time_ns", "attributes"}]}``; ids are
lowercase hex, times integer nanoseconds since the epoch, attribute values plain Python
(str, bool, int, float, list).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

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


def _hex(value: Any) -> str:
    # The proto example uses uppercase hex; base64 ids come from some exporters' bytes fields.
    return str(value or "").lower()


def otlp_to_records(doc: dict) -> Iterator[dict]:
    """Yield span records from one ExportTraceServiceRequest JSON object."""
    for rs in doc.get("resourceSpans") or ():
        resource = decode_attributes((rs.get("resource") or {}).get("attributes"))
        # Old collector versions wrote instrumentationLibrarySpans instead of scopeSpans.
        for ss in (rs.get("scopeSpans") or rs.get("instrumentationLibrarySpans") or ()):
            scope = ss.get("scope") or ss.get("instrumentationLibrary") or {}
            scope_rec = {"name": scope.get("name", ""), "version": scope.get("version", "")}
            for sp in ss.get("spans") or ():
                status = sp.get("status") or {}
                yield {
                    "trace_id": _hex(sp.get("traceId")),
                    "span_id": _hex(sp.get("spanId")),
                    "parent_span_id": _hex(sp.get("parentSpanId")),
                    "name": sp.get("name", ""),
                    "kind": kind_number(sp.get("kind", 0)),
                    "start_ns": int(sp.get("startTimeUnixNano") or 0),
                    "end_ns": int(sp.get("endTimeUnixNano") or 0),
                    "attributes": decode_attributes(sp.get("attributes")),
                    "resource": resource,
                    "scope": scope_rec,
                    "status": {
                        "code": kind_number(status.get("code", 0)) if status else 0,
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
