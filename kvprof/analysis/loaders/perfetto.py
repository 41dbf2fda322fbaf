"""Perfetto / Chrome trace-event JSON: one track per process and phase, readable back."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

# Keys of a complete ("X") event's args that carry what the trace-event format has no field
# for, so a converted file reads back to the same span records.
_META = "kvprof"


def is_perfetto_document(doc: Any) -> bool:
    """True for a Chrome trace-event JSON object ({"traceEvents": [...]})."""
    return isinstance(doc, dict) and isinstance(doc.get("traceEvents"), list)


def _process_label(rec: dict) -> str:
    res = rec.get("resource") or {}
    service = res.get("service.name", "unknown_service")
    host = res.get("k8s.pod.name") or res.get("host.name") or ""
    pid = res.get("process.pid")
    label = f"{service} {host}".strip()
    return f"{label} pid {pid}" if pid is not None else label


def records_to_perfetto(records: Iterable[dict]) -> dict:
    """Span records -> trace-event JSON that ui.perfetto.dev and chrome://tracing open."""
    events: list[dict] = []
    pids: dict[str, int] = {}
    tids: dict[tuple[int, str], int] = {}
    for rec in records:
        label = _process_label(rec)
        if label not in pids:
            pids[label] = len(pids) + 1
            events.append({"ph": "M", "name": "process_name", "pid": pids[label], "tid": 0,
                           "args": {"name": label}})
        pid = pids[label]
        # One track (thread) per phase inside each process, so overlapping phases stay visible.
        key = (pid, rec["name"])
        if key not in tids:
            tids[key] = len([k for k in tids if k[0] == pid]) + 1
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tids[key],
                           "args": {"name": rec["name"]}})
        args = dict(rec.get("attributes") or {})
        args[_META] = {
            "trace_id": rec["trace_id"],
            "span_id": rec["span_id"],
            "parent_span_id": rec.get("parent_span_id") or "",
            "start_ns": int(rec["start_ns"]),
            "end_ns": int(rec["end_ns"]),
            "kind": rec.get("kind", 0),
            "resource": rec.get("resource") or {},
            "scope": rec.get("scope") or {},
            "status": rec.get("status") or {},
            "events": rec.get("events") or [],
        }
        events.append({
            "ph": "X",
            "name": rec["name"],
            "cat": rec["name"].split(".")[0],
            "pid": pid,
            "tid": tids[key],
            "ts": int(rec["start_ns"]) / 1000.0,
            "dur": (int(rec["end_ns"]) - int(rec["start_ns"])) / 1000.0,
            "args": args,
        })
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def perfetto_to_records(doc: dict) -> Iterator[dict]:
    """Read back the complete events kvprof wrote (events without kvprof args get fresh ids)."""
    for n, ev in enumerate(doc.get("traceEvents") or ()):
        if ev.get("ph") != "X":
            continue
        args = dict(ev.get("args") or {})
        meta = args.pop(_META, None) or {}
        start_ns = int(meta.get("start_ns", round(float(ev.get("ts", 0)) * 1000)))
        end_ns = int(meta.get("end_ns", start_ns + round(float(ev.get("dur", 0)) * 1000)))
        yield {
            "trace_id": meta.get("trace_id") or f"{ev.get('pid', 0):032x}",
            "span_id": meta.get("span_id") or f"{n + 1:016x}",
            "parent_span_id": meta.get("parent_span_id", ""),
            "name": ev.get("name", ""),
            "kind": meta.get("kind", 0),
            "start_ns": start_ns,
            "end_ns": end_ns,
            "attributes": args,
            "resource": meta.get("resource") or {},
            "scope": meta.get("scope") or {"name": "", "version": ""},
            "status": meta.get("status") or {"code": 0, "message": ""},
            "events": meta.get("events") or [],
        }
