"""OTLP/JSON for trace protobufs: lowercase hex ids, int64 as strings, enums as integers.

The one encoding kvprof writes trace files in (the probes' file exporter, the OTLP receiver):
protobuf's JSON mapping of an ``ExportTraceServiceRequest`` (``MessageToDict`` with integer
enums, default values left out), except that trace and span ids are lowercase hex, as OTLP/JSON
requires, instead of protobuf's base64. Ground floor: imports nothing of kvprof.

Spans take a hand-written path (about five times faster than ``MessageToDict``, which matters to
a receiver under load); it is used only while the installed opentelemetry-proto has exactly the
fields it knows, and gives the same dict as ``MessageToDict`` (tests/receiver/test_otlp_json.py).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.sdk.trace import ReadableSpan

ID_FIELDS = ("traceId", "spanId", "parentSpanId")
# The same ids under their proto names, which protobuf's JSON parser accepts as well.
_ID_KEYS = ID_FIELDS + ("trace_id", "span_id", "parent_span_id")

# Field names (in field-number order, the order MessageToDict writes them) the fast path knows;
# opentelemetry-proto 1.9 added the *_strindex fields (profiles' string table), 1.8 lacks them.
_KNOWN_FIELDS = {
    "Span": ("trace_id", "span_id", "trace_state", "parent_span_id", "name", "kind",
             "start_time_unix_nano", "end_time_unix_nano", "attributes",
             "dropped_attributes_count", "events", "dropped_events_count", "links",
             "dropped_links_count", "status", "flags"),
    "Event": ("time_unix_nano", "name", "attributes", "dropped_attributes_count"),
    "Link": ("trace_id", "span_id", "trace_state", "attributes", "dropped_attributes_count",
             "flags"),
    "Status": ("message", "code"),
    "KeyValue": ("key", "value"),
    "AnyValue": ("string_value", "bool_value", "int_value", "double_value", "array_value",
                 "kvlist_value", "bytes_value"),
    "ArrayValue": ("values",),
    "KeyValueList": ("values",),
}
_NEWER_FIELDS = {
    "KeyValue": ("key", "value", "key_strindex"),
    "AnyValue": ("string_value", "bool_value", "int_value", "double_value", "array_value",
                 "kvlist_value", "bytes_value", "string_value_strindex"),
}
_fast_ok: bool | None = None
_key_strindex = False


def encode_otlp_json(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    """One ExportTraceServiceRequest in OTLP/JSON for SDK spans (what an OTel exporter takes)."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    return request_to_json(encode_spans(spans))


def request_to_json(request: ExportTraceServiceRequest) -> dict[str, Any]:
    """A whole ExportTraceServiceRequest message -> its OTLP/JSON dict."""
    docs = list(iter_request_json(request, max_spans=0))
    return docs[0] if docs else {}


def iter_request_json(request: ExportTraceServiceRequest,
                      max_spans: int = 1024) -> Iterator[dict[str, Any]]:
    """OTLP/JSON ExportTraceServiceRequest dicts holding the request's spans.

    With ``max_spans`` > 0 a large request comes out as several requests of at most that many
    spans each (resource and scope repeated), so no line of a trace file grows without bound
    and the encoder's working memory stays small; 0 keeps the request whole.
    """
    from google.protobuf.json_format import MessageToDict

    span_json = _span_json if _fast_path_ok() else _span_json_generic
    pending: list[dict[str, Any]] = []  # resourceSpans of the document being filled
    count = 0
    for rs in request.resource_spans:
        head: dict[str, Any] = {}
        if rs.HasField("resource"):
            head["resource"] = MessageToDict(rs.resource, use_integers_for_enums=True)
        scopes: list[dict[str, Any]] = []
        for ss in rs.scope_spans:
            scope_head: dict[str, Any] = {}
            if ss.HasField("scope"):
                scope_head["scope"] = MessageToDict(ss.scope, use_integers_for_enums=True)
            spans: list[dict[str, Any]] = []
            for sp in ss.spans:
                if max_spans and count >= max_spans:
                    # Close this document here and carry on in a fresh one.
                    if spans:
                        scopes.append(_scope_doc(scope_head, spans, ss.schema_url))
                    if scopes:
                        pending.append(_resource_doc(head, scopes, rs.schema_url))
                    yield {"resourceSpans": pending}
                    pending, scopes, spans, count = [], [], [], 0
                spans.append(span_json(sp))
                count += 1
            if spans or not ss.spans:
                scopes.append(_scope_doc(scope_head, spans, ss.schema_url))
        if scopes or not rs.scope_spans:
            pending.append(_resource_doc(head, scopes, rs.schema_url))
    if pending:
        yield {"resourceSpans": pending}


def json_to_request(doc: Any) -> ExportTraceServiceRequest:
    """An OTLP/JSON ExportTraceServiceRequest dict -> the protobuf message.

    Hex ids are turned into bytes; unknown fields are ignored (as OTLP/JSON receivers must);
    enums may be numbers or names, int64 strings or numbers. Raises ValueError on anything
    that is not a valid request (the doc is modified in place).
    """
    from google.protobuf.json_format import ParseDict, ParseError
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    if not isinstance(doc, dict):
        raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
    for rs in _list(doc, "resourceSpans", "resource_spans"):
        for ss in _list(rs, "scopeSpans", "scope_spans"):
            for sp in _list(ss, "spans"):
                _hex_ids_to_base64(sp)
                for link in _list(sp, "links"):
                    _hex_ids_to_base64(link)
    try:
        return ParseDict(doc, ExportTraceServiceRequest(), ignore_unknown_fields=True)
    except (ParseError, TypeError, AttributeError, RecursionError) as exc:
        raise ValueError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc


def dumps_line(doc: dict[str, Any]) -> bytes:
    """One JSON line (compact, newline-terminated) as the trace files hold it."""
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


# -- internals ---------------------------------------------------------------------------------

def _resource_doc(head: dict, scopes: list, schema_url: str) -> dict[str, Any]:
    doc = dict(head)
    if scopes:
        doc["scopeSpans"] = scopes
    if schema_url:
        doc["schemaUrl"] = schema_url
    return doc


def _scope_doc(head: dict, spans: list, schema_url: str) -> dict[str, Any]:
    doc = dict(head)
    if spans:
        doc["spans"] = spans
    if schema_url:
        doc["schemaUrl"] = schema_url
    return doc


def _list(obj: Any, *keys: str) -> list:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    for k in keys:
        v = obj.get(k)
        if v is not None:
            if not isinstance(v, list):
                raise ValueError(f"{k!r} must be a list, got {type(v).__name__}")
            return v
    return []


def _hex_ids_to_base64(obj: Any) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a span object, got {type(obj).__name__}")
    for k in _ID_KEYS:
        v = obj.get(k)
        if v is None or v == "":
            continue
        if not isinstance(v, str):
            raise ValueError(f"{k} must be a hex string, got {type(v).__name__}")
        try:
            raw = bytes.fromhex(v)
        except ValueError:
            raise ValueError(f"{k} {v[:40]!r} is not hex (OTLP/JSON ids are hex)") from None
        obj[k] = base64.b64encode(raw).decode()


def _fast_path_ok() -> bool:
    """Whether the installed trace protos have exactly the fields the fast path encodes."""
    global _fast_ok, _key_strindex
    if _fast_ok is None:
        from opentelemetry.proto.common.v1 import common_pb2
        from opentelemetry.proto.trace.v1 import trace_pb2

        descs = {
            "Span": trace_pb2.Span.DESCRIPTOR, "Event": trace_pb2.Span.Event.DESCRIPTOR,
            "Link": trace_pb2.Span.Link.DESCRIPTOR, "Status": trace_pb2.Status.DESCRIPTOR,
            "KeyValue": common_pb2.KeyValue.DESCRIPTOR,
            "AnyValue": common_pb2.AnyValue.DESCRIPTOR,
            "ArrayValue": common_pb2.ArrayValue.DESCRIPTOR,
            "KeyValueList": common_pb2.KeyValueList.DESCRIPTOR,
        }
        _fast_ok = all(
            tuple(f.name for f in sorted(d.fields, key=lambda f: f.number))
            in (_KNOWN_FIELDS[n], _NEWER_FIELDS.get(n))
            for n, d in descs.items()
        )
        _key_strindex = "key_strindex" in common_pb2.KeyValue.DESCRIPTOR.fields_by_name
    return _fast_ok


def _span_json_generic(sp: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    doc = MessageToDict(sp, use_integers_for_enums=True)
    for k in ID_FIELDS:
        if doc.get(k):
            doc[k] = base64.b64decode(doc[k]).hex()
    for link in doc.get("links", ()):
        for k in ID_FIELDS:
            if link.get(k):
                link[k] = base64.b64decode(link[k]).hex()
    return doc


def _double(v: float) -> Any:
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "Infinity" if v > 0 else "-Infinity"
    return v


def _any_value(v: Any) -> dict[str, Any]:
    which = v.WhichOneof("value")
    if which == "string_value":
        return {"stringValue": v.string_value}
    if which == "int_value":
        return {"intValue": str(v.int_value)}
    if which == "double_value":
        return {"doubleValue": _double(v.double_value)}
    if which == "bool_value":
        return {"boolValue": v.bool_value}
    if which == "array_value":
        values = v.array_value.values
        return {"arrayValue": {"values": [_any_value(x) for x in values]} if values else {}}
    if which == "kvlist_value":
        values = v.kvlist_value.values
        return {"kvlistValue": {"values": _attributes(values)} if values else {}}
    if which == "bytes_value":
        return {"bytesValue": base64.b64encode(v.bytes_value).decode()}
    if which == "string_value_strindex":
        return {"stringValueStrindex": v.string_value_strindex}
    return {}


def _attributes(kvs: Any) -> list[dict[str, Any]]:
    out = []
    for kv in kvs:
        d: dict[str, Any] = {}
        if kv.key:
            d["key"] = kv.key
        if kv.HasField("value"):
            d["value"] = _any_value(kv.value)
        if _key_strindex and kv.key_strindex:
            d["keyStrindex"] = kv.key_strindex
        out.append(d)
    return out


def _span_json(sp: Any) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if sp.trace_id:
        d["traceId"] = sp.trace_id.hex()
    if sp.span_id:
        d["spanId"] = sp.span_id.hex()
    if sp.trace_state:
        d["traceState"] = sp.trace_state
    if sp.parent_span_id:
        d["parentSpanId"] = sp.parent_span_id.hex()
    if sp.name:
        d["name"] = sp.name
    if sp.kind:
        d["kind"] = sp.kind
    if sp.start_time_unix_nano:
        d["startTimeUnixNano"] = str(sp.start_time_unix_nano)
    if sp.end_time_unix_nano:
        d["endTimeUnixNano"] = str(sp.end_time_unix_nano)
    if sp.attributes:
        d["attributes"] = _attributes(sp.attributes)
    if sp.dropped_attributes_count:
        d["droppedAttributesCount"] = sp.dropped_attributes_count
    if sp.events:
        events = []
        for ev in sp.events:
            e: dict[str, Any] = {}
            if ev.time_unix_nano:
                e["timeUnixNano"] = str(ev.time_unix_nano)
            if ev.name:
                e["name"] = ev.name
            if ev.attributes:
                e["attributes"] = _attributes(ev.attributes)
            if ev.dropped_attributes_count:
                e["droppedAttributesCount"] = ev.dropped_attributes_count
            events.append(e)
        d["events"] = events
    if sp.dropped_events_count:
        d["droppedEventsCount"] = sp.dropped_events_count
    if sp.links:
        links = []
        for ln in sp.links:
            link: dict[str, Any] = {}
            if ln.trace_id:
                link["traceId"] = ln.trace_id.hex()
            if ln.span_id:
                link["spanId"] = ln.span_id.hex()
            if ln.trace_state:
                link["traceState"] = ln.trace_state
            if ln.attributes:
                link["attributes"] = _attributes(ln.attributes)
            if ln.dropped_attributes_count:
                link["droppedAttributesCount"] = ln.dropped_attributes_count
            if ln.flags:
                link["flags"] = ln.flags
            links.append(link)
        d["links"] = links
    if sp.dropped_links_count:
        d["droppedLinksCount"] = sp.dropped_links_count
    if sp.HasField("status"):
        st: dict[str, Any] = {}
        if sp.status.message:
            st["message"] = sp.status.message
        if sp.status.code:
            st["code"] = sp.status.code
        d["status"] = st
    if sp.flags:
        d["flags"] = sp.flags
    return d
