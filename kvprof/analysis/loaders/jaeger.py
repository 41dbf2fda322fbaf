"""Jaeger JSON (UI download / query API response) reading, writing and fetching."""

from __future__ import annotations

import json
import logging
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from typing import Any

from kvprof.analysis.loaders.otlp import (
    MAX_UNIX_NANOS,
    SPAN_KINDS,
    MalformedSpan,
    SpanProblems,
    kind_number,
    parent_id_hex,
    raise_if_strict,
    span_id_hex,
    span_label,
    whole_number,
)
from kvprof.errors import BadInputError, ResourceAbsentError, UsageError

log = logging.getLogger(__name__)

_KIND_TAG = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
_TAG_KIND = {v: k for k, v in _KIND_TAG.items()}
# Jaeger keeps OTLP's status and scope as tags with these names (its OTLP receiver does this).
_STATUS_CODE_TAG = "otel.status_code"
_STATUS_MSG_TAG = "otel.status_description"
_SCOPE_NAME_TAGS = ("otel.scope.name", "otel.library.name")
_SCOPE_VERSION_TAGS = ("otel.scope.version", "otel.library.version")
_STATUS_NAMES = {0: "UNSET", 1: "OK", 2: "ERROR"}
_STATUS_NUMBERS = {v: k for k, v in _STATUS_NAMES.items()}


def is_jaeger_document(doc: Any) -> bool:
    """True for ``{"data": [trace...]}`` or a single Jaeger trace object."""
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        return all(isinstance(t, dict) and "spans" in t for t in doc["data"])
    return isinstance(doc, dict) and "traceID" in doc and isinstance(doc.get("spans"), list)


def _tag_value(tag: dict) -> Any:
    value = tag.get("value")
    kind = str(tag.get("type", "string")).lower()
    if kind == "int64":
        return int(value)
    if kind == "float64":
        return float(value)
    if kind == "bool":
        return value if isinstance(value, bool) else str(value).lower() == "true"
    return value


def _tag(key: str, value: Any) -> dict:
    if isinstance(value, bool):
        return {"key": key, "type": "bool", "value": value}
    if isinstance(value, int):
        return {"key": key, "type": "int64", "value": value}
    if isinstance(value, float):
        return {"key": key, "type": "float64", "value": value}
    if isinstance(value, (list, dict)):
        return {"key": key, "type": "string", "value": json.dumps(value)}
    return {"key": key, "type": "string", "value": "" if value is None else str(value)}


def jaeger_to_records(doc: dict, problems: SpanProblems | None = None) -> Iterator[dict]:
    """Yield span records (see kvprof.analysis.loaders.otlp) from a Jaeger JSON document.

    Malformed spans (rules in kvprof.analysis.loaders.otlp) are skipped and counted in `problems`;
    without it the first one raises BadInputError.
    """
    counted = problems if problems is not None else SpanProblems()
    traces = doc["data"] if "data" in doc else [doc]
    for trace in traces:
        processes = trace.get("processes") or {}
        for sp in trace.get("spans") or ():
            try:
                rec = _jaeger_record(sp, trace, processes, counted)
            except MalformedSpan as exc:
                name = sp.get("operationName") if isinstance(sp, dict) else None
                tid = sp.get("traceID") if isinstance(sp, dict) else None
                counted.skip(f"{span_label(name, tid)}: {exc}")
                raise_if_strict(problems, counted)
                continue
            raise_if_strict(problems, counted)
            yield rec


def _jaeger_times(sp: dict) -> tuple[int, int]:
    """(start_ns, end_ns) from Jaeger's microsecond startTime and duration."""
    start_us = whole_number(sp.get("startTime"), "startTime")
    dur_us = whole_number(sp.get("duration"), "duration", allow_zero=True)
    if (start_us + dur_us) * 1000 > MAX_UNIX_NANOS:
        raise MalformedSpan(f"startTime {start_us} + duration {dur_us} is beyond int64 "
                            "nanoseconds")
    return start_us * 1000, (start_us + dur_us) * 1000


def _jaeger_record(sp: Any, trace: dict, processes: dict, counted: SpanProblems) -> dict:
    if not isinstance(sp, dict):
        raise MalformedSpan(f"is a {type(sp).__name__}, not an object")
    tid = span_id_hex(sp.get("traceID", trace.get("traceID")), 16, "traceID", jaeger=True)
    sid = span_id_hex(sp.get("spanID"), 8, "spanID", jaeger=True)
    start_ns, end_ns = _jaeger_times(sp)
    try:
        proc = sp.get("process") or processes.get(sp.get("processID"), {})
        resource = {t["key"]: _tag_value(t) for t in proc.get("tags") or ()}
        if proc.get("serviceName"):
            resource["service.name"] = proc["serviceName"]
        attrs: dict[str, Any] = {}
        kind, scope, status = 0, {"name": "", "version": ""}, {"code": 0, "message": ""}
        for t in sp.get("tags") or ():
            key, value = t["key"], _tag_value(t)
            if key == "span.kind":
                kind = _TAG_KIND.get(str(value).lower(), 0)
            elif key in _SCOPE_NAME_TAGS:
                scope["name"] = value
            elif key in _SCOPE_VERSION_TAGS:
                scope["version"] = value
            elif key == _STATUS_CODE_TAG:
                status["code"] = _STATUS_NUMBERS.get(str(value).upper(), 0)
            elif key == _STATUS_MSG_TAG:
                status["message"] = value
            else:
                attrs[key] = value
        parent, parent_why = "", None
        for ref in sp.get("references") or ():
            if ref.get("refType", "CHILD_OF") == "CHILD_OF":
                parent, parent_why = parent_id_hex(ref.get("spanID"), "CHILD_OF spanID",
                                                   jaeger=True)
                break
        events = [
            {
                "name": next(
                    (f["value"] for f in lg.get("fields", ()) if f["key"] == "event"), ""
                ),
                "time_ns": int(lg.get("timestamp") or 0) * 1000,
                "attributes": {
                    f["key"]: _tag_value(f)
                    for f in lg.get("fields", ())
                    if f["key"] != "event"
                },
            }
            for lg in sp.get("logs") or ()
        ]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MalformedSpan(f"tags, process or logs malformed ({type(exc).__name__}: "
                            f"{exc})") from None
    name = sp.get("operationName", "")
    if parent_why:
        counted.drop_parent(f"{span_label(name, tid)}: {parent_why}")
    return {
        "trace_id": tid,
        "span_id": sid,
        "parent_span_id": parent,
        "name": name,
        "kind": kind,
        "start_ns": start_ns,
        "end_ns": end_ns,
        "attributes": attrs,
        "resource": resource,
        "scope": scope,
        "status": status,
        "events": events,
    }


def records_to_jaeger(records: Iterable[dict]) -> dict:
    """Span records -> ``{"data": [...]}`` that Jaeger UI's JSON-file upload opens.

    Jaeger keeps microseconds: nanoseconds below a microsecond are dropped (floor).
    """
    traces: dict[str, dict] = {}
    for rec in records:
        trace = traces.setdefault(
            rec["trace_id"],
            {"traceID": rec["trace_id"], "spans": [], "processes": {}, "_proc": {}},
        )
        resource = dict(rec.get("resource") or {})
        service = str(resource.pop("service.name", "unknown_service"))
        proc_key = json.dumps([service, resource], sort_keys=True, default=str)
        if proc_key not in trace["_proc"]:
            pid = f"p{len(trace['_proc']) + 1}"
            trace["_proc"][proc_key] = pid
            trace["processes"][pid] = {
                "serviceName": service,
                "tags": [_tag(k, v) for k, v in resource.items()],
            }
        tags = [_tag(k, v) for k, v in (rec.get("attributes") or {}).items()]
        kind = kind_number(rec.get("kind", 0))
        if kind in _KIND_TAG:
            tags.append(_tag("span.kind", _KIND_TAG[kind]))
        scope = rec.get("scope") or {}
        if scope.get("name"):
            tags.append(_tag("otel.scope.name", scope["name"]))
        if scope.get("version"):
            tags.append(_tag("otel.scope.version", scope["version"]))
        status = rec.get("status") or {}
        if status.get("code"):
            tags.append(_tag(_STATUS_CODE_TAG, _STATUS_NAMES.get(status["code"], "UNSET")))
        if status.get("message"):
            tags.append(_tag(_STATUS_MSG_TAG, status["message"]))
        start_us = int(rec["start_ns"]) // 1000
        span = {
            "traceID": rec["trace_id"],
            "spanID": rec["span_id"],
            "flags": 1,
            "operationName": rec["name"],
            "references": (
                [{"refType": "CHILD_OF", "traceID": rec["trace_id"],
                  "spanID": rec["parent_span_id"]}]
                if rec.get("parent_span_id") else []
            ),
            "startTime": start_us,
            "duration": int(rec["end_ns"]) // 1000 - start_us,
            "tags": tags,
            "logs": [
                {
                    "timestamp": int(ev["time_ns"]) // 1000,
                    "fields": [_tag("event", ev["name"])]
                    + [_tag(k, v) for k, v in (ev.get("attributes") or {}).items()],
                }
                for ev in rec.get("events") or ()
            ],
            "processID": trace["_proc"][proc_key],
            "warnings": None,
        }
        trace["spans"].append(span)
    data = []
    for trace in traces.values():
        trace.pop("_proc")
        trace["warnings"] = None
        data.append(trace)
    return {"data": data, "total": 0, "limit": 0, "offset": 0, "errors": None}


def fetch_jaeger(
    url: str, service: str | None, lookback: str = "1h", limit: int = 10000, timeout: float = 30
) -> dict:
    """GET the traces of one service from a Jaeger query endpoint (``/api/traces``)."""
    base = url.rstrip("/")
    if not re.fullmatch(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h|d|w))+", lookback.strip()):
        raise UsageError(f"--lookback {lookback!r} is not a duration",
                         hint="e.g. --lookback 1h, 30m or 2d (a number and a unit).")
    if not service:
        services = _get_json(f"{base}/api/services", timeout).get("data") or []
        raise UsageError(
            f"--service is required with a Jaeger URL ({base})",
            hint="Services Jaeger knows: " + (", ".join(sorted(services)) or "none"),
        )
    query = urllib.parse.urlencode({"service": service, "lookback": lookback, "limit": limit})
    doc = _get_json(f"{base}/api/traces?{query}", timeout)
    if doc.get("errors"):
        raise BadInputError(
            f"Jaeger at {base} answered with errors: {doc['errors']}",
            hint="Check --service and --lookback (e.g. 1h, 30m).",
        )
    if not is_jaeger_document(doc):
        raise BadInputError(
            f"{base}/api/traces did not return Jaeger trace JSON",
            hint="Point --traces at the Jaeger query service (port 16686), not the collector.",
        )
    log.info("fetched %d traces of %s from %s", len(doc["data"]), service, base)
    return doc


def _get_json(url: str, timeout: float) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (user's URL)
            body = resp.read()
    except urllib.error.HTTPError as exc:
        raise BadInputError(
            f"Jaeger query {url} failed: HTTP {exc.code}",
            hint="Is this the Jaeger query API (http://HOST:16686)?",
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ResourceAbsentError(
            f"cannot reach Jaeger at {url}: {reason}",
            hint="Port-forward the query service: kubectl port-forward svc/jaeger-query 16686",
        ) from None
    try:
        doc = json.loads(body)
    except json.JSONDecodeError:
        raise BadInputError(
            f"Jaeger at {url} did not answer with JSON", hint="Is this the Jaeger query API?"
        ) from None
    if not isinstance(doc, dict):
        raise BadInputError(f"Jaeger at {url} answered with JSON of another kind")
    return doc


__all__ = ["SPAN_KINDS", "fetch_jaeger", "is_jaeger_document", "jaeger_to_records",
           "records_to_jaeger"]
