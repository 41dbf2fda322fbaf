"""Load spans from OTLP/JSON or Jaeger JSON (file, directory or Jaeger URL) into a DataFrame.

The table's columns are documented in kvprof.analysis.loaders.span_schema.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvprof import semconv as sc
from kvprof.analysis.loaders.dedup import drop_duplicate_spans
from kvprof.analysis.loaders.jaeger import fetch_jaeger, is_jaeger_document, jaeger_to_records
from kvprof.analysis.loaders.otlp import (
    MAX_UNIX_NANOS,
    MalformedSpan,
    SpanProblems,
    check_otlp_span,
    is_otlp_document,
    otlp_to_records,
    span_label,
    status_number,
)
from kvprof.analysis.loaders.span_schema import (
    ATTR_COLUMN_NAMES,
    ATTR_COLUMNS,
    NUMERIC_COLUMNS,
    finalize_spans,
)
from kvprof.errors import BadInputError
from kvprof.inputs import path_problem

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

TRACE_SUFFIXES = (".json", ".jsonl", ".ndjson")
_HEX = "0123456789abcdef"
_ZERO16 = "0" * 16

@dataclass
class SpanLoad:
    """What a trace source gave: the span table, the files read and the files skipped."""

    spans: pd.DataFrame
    files: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    formats: set[str] = field(default_factory=set)
    # Malformed spans (rules: kvprof.analysis.loaders.otlp): skipped, or kept as roots when only the
    # parent id was bad; `notes` says so in sentences the report shows.
    spans_skipped: int = 0
    parents_dropped: int = 0
    notes: list[str] = field(default_factory=list)


class _Columns:
    """Column lists filled span by span; attributes are sparse (index, value) pairs."""

    def __init__(self) -> None:
        self.trace_id: list[str] = []
        self.span_id: list[str] = []
        self.parent: list[str] = []
        self.name: list[str] = []
        self.start: list[int] = []
        self.end: list[int] = []
        self.attr_idx: dict[str, list[int]] = {c: [] for c in ATTR_COLUMN_NAMES}
        self.attr_val: dict[str, list[Any]] = {c: [] for c in ATTR_COLUMN_NAMES}
        # Spans with a status set: (index, code, message); most spans have none.
        self.status: list[tuple[int, int, str]] = []
        # Resource attributes apply to a contiguous run of spans: (first, stop, column, value).
        self.ranges: list[tuple[int, int, str, Any]] = []
        self.sources: list[tuple[int, int, str]] = []
        self._cache: dict[str, str] = {}
        self._trace_ok: dict[str, str] = {}  # trace ids as written -> checked and normalised

    def __len__(self) -> int:
        return len(self.span_id)

    def add_otlp(self, doc: dict, problems: SpanProblems) -> None:
        """The hot path: one ExportTraceServiceRequest without per-span dicts of our own.

        A span is checked whole before anything of it is appended, so a malformed one is
        skipped (and counted in `problems`) without leaving the columns uneven.
        """
        amap = ATTR_COLUMNS.get
        cache = self._cache.setdefault
        t_app, s_app, p_app = self.trace_id.append, self.span_id.append, self.parent.append
        n_app, b_app, e_app = self.name.append, self.start.append, self.end.append
        idx, val = self.attr_idx, self.attr_val
        trace_ok = self._trace_ok
        known = trace_ok.get
        for rs in doc.get("resourceSpans") or ():
            first = len(self.span_id)
            for ss in rs.get("scopeSpans") or rs.get("instrumentationLibrarySpans") or ():
                for sp in ss.get("spans") or ():
                    if not isinstance(sp, dict):
                        problems.skip(f"span {sp!r:.40}: is a {type(sp).__name__}, not an object")
                        continue
                    nm = sp.get("name", "")
                    t, sid, pid = sp.get("traceId"), sp.get("spanId"), sp.get("parentSpanId")
                    b, e = sp.get("startTimeUnixNano"), sp.get("endTimeUnixNano")
                    tid = known(t) if type(t) is str else None
                    parent_why = None
                    # The usual span, tested inline: lowercase hex ids, decimal-string times;
                    # anything else (or any doubt) goes through check_otlp_span.
                    try:
                        usual = (tid is not None and len(sid) == 16 and not sid.strip(_HEX)
                                 and sid != _ZERO16 and type(b) is str and type(e) is str
                                 and (not pid or (len(pid) == 16 and not pid.strip(_HEX)
                                                  and pid != _ZERO16)))
                        if usual:
                            start, end = int(b), int(e)
                            usual = 0 < start <= end <= MAX_UNIX_NANOS
                    except (AttributeError, TypeError, ValueError):
                        usual = False
                    if usual:
                        pid = pid or ""
                    else:
                        try:
                            tid, sid, pid, start, end, parent_why = check_otlp_span(
                                t, sid, pid, b, e)
                        except MalformedSpan as exc:
                            problems.skip(f"{span_label(nm, t)}: {exc}")
                            continue
                        if type(t) is str:
                            trace_ok[t] = tid
                    if not isinstance(nm, str):
                        nm = "" if nm is None else str(nm)
                    if parent_why:
                        problems.drop_parent(f"{span_label(nm, tid)}: {parent_why}")
                    i = len(self.span_id)
                    t_app(cache(tid, tid))
                    s_app(sid)
                    p_app(pid)
                    n_app(cache(nm, nm))
                    b_app(start)
                    e_app(end)
                    st = sp.get("status")
                    if st and type(st) is dict:
                        self.status.append((i, status_number(st.get("code", 0)),
                                            str(st.get("message") or "")))
                    attrs = sp.get("attributes")
                    if type(attrs) is list:
                        for a in attrs:
                            # An entry of another shape holds nothing readable: ignored, as
                            # the Arrow path ignores it.
                            try:
                                col = amap(a["key"])
                                if col is not None:
                                    v = a.get("value")
                                    if v:
                                        v = v.popitem()[1]
                                        idx[col].append(i)
                                        val[col].append(v)
                            except (TypeError, KeyError, AttributeError):
                                continue
            stop = len(self.span_id)
            if stop > first:
                for col, v in _scalar_attributes((rs.get("resource") or {}).get("attributes"),
                                                 amap):
                    self.ranges.append((first, stop, col, v))

    def add_records(self, records) -> None:
        """The general path (Jaeger): span records, already checked, as otlp documents them."""
        for rec in records:
            i = len(self.span_id)
            self.trace_id.append(rec["trace_id"])
            self.span_id.append(rec["span_id"])
            self.parent.append(rec.get("parent_span_id") or "")
            self.name.append(rec["name"] if isinstance(rec["name"], str) else str(rec["name"]))
            self.start.append(int(rec["start_ns"]))
            self.end.append(int(rec["end_ns"]))
            st = rec.get("status") or {}
            if st.get("code") or st.get("message"):
                self.status.append((i, status_number(st.get("code", 0)),
                                    str(st.get("message") or "")))
            for key, value in (rec.get("resource") or {}).items():
                col = ATTR_COLUMNS.get(key)
                if col is not None:
                    self.ranges.append((i, i + 1, col, value))
            for key, value in (rec.get("attributes") or {}).items():
                col = ATTR_COLUMNS.get(key)
                if col is not None:
                    self.attr_idx[col].append(i)
                    self.attr_val[col].append(value)

    def mark_source(self, first: int, name: str) -> None:
        if len(self) > first:
            self.sources.append((first, len(self), name))

    def frame(self) -> pd.DataFrame:
        import numpy as np
        import pandas as pd

        n = len(self)
        data: dict[str, Any] = {
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent,
            "name": self.name,
            "start_ns": np.asarray(self.start, dtype=np.int64),
            "end_ns": np.asarray(self.end, dtype=np.int64),
        }
        by_col: dict[str, list[tuple[int, int, Any]]] = {}
        for first, stop, col, value in self.ranges:
            by_col.setdefault(col, []).append((first, stop, value))
        for col in ATTR_COLUMN_NAMES:
            numeric = col in NUMERIC_COLUMNS
            arr = np.full(n, np.nan if numeric else None, dtype=float if numeric else object)
            for first, stop, value in by_col.get(col, ()):
                # Resource values are defaults: a span's own attribute (set below) wins.
                arr[first:stop] = _number(value) if numeric else value
            if self.attr_idx[col]:
                values = self.attr_val[col]
                if numeric:
                    values = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce")
                    values = values.to_numpy(dtype=float)
                arr[np.asarray(self.attr_idx[col], dtype=np.int64)] = values
            data[col] = arr
        code = np.full(n, np.nan)
        message = np.full(n, None, dtype=object)
        for i, c, m in self.status:
            code[i], message[i] = c, m or None
        data["status_code"], data["status_message"] = code, message
        src = np.empty(n, dtype=object)
        for first, stop, name in self.sources:
            src[first:stop] = name
        data["source"] = src
        return pd.DataFrame(data)


def _number(value: Any) -> float:
    """A numeric attribute's value, NaN when it is not a number (as the Arrow path casts)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _scalar_attributes(attrs, amap):
    """(column, value) of the wanted OTLP KeyValues; entries of another shape are ignored, as
    the Arrow path ignores them (they hold no value it can read)."""
    for a in attrs or ():
        if not isinstance(a, dict):
            continue
        key, v = a.get("key"), a.get("value")
        if isinstance(key, str) and isinstance(v, dict) and v:
            col = amap(key)
            if col is not None:
                yield col, v.popitem()[1]


def _iter_documents(path: Path):
    """Yield (doc, error) for a JSON file or a JSON-lines file; truncated lines yield errors."""
    with path.open("r", encoding="utf-8") as fh:
        first = fh.readline()
        try:
            doc = json.loads(first) if first.strip() else None
        except json.JSONDecodeError:
            doc = None
        if doc is None:
            # Not one document per line: a pretty-printed (or empty) single document.
            fh.seek(0)
            text = fh.read()
            if not text.strip():
                yield None, "the file is empty"
                return
            try:
                yield json.loads(text), None
            except json.JSONDecodeError as exc:
                yield None, f"not JSON (line {exc.lineno}: {exc.msg})"
            return
        yield doc, None
        for lineno, line in enumerate(fh, start=2):
            if not line.strip():
                continue
            try:
                yield json.loads(line), None
            except json.JSONDecodeError as exc:
                yield None, f"line {lineno} is not JSON ({exc.msg}; truncated while written?)"


def trace_files(path: Path) -> list[Path]:
    """The trace files of a directory (recursively), skipping temp files being written."""
    return sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.suffix in TRACE_SUFFIXES
        and not p.name.startswith(".") and not p.name.endswith(".tmp")
    )


EXPECTED = ("an OTLP/JSON ExportTraceServiceRequest ({\"resourceSpans\": [...]}, one per line "
            "or one per file) or Jaeger JSON ({\"data\": [traces]})")


SPAN_HINT = ("Each span needs a traceId of 32 hex digits, a spanId of 16, and "
             "startTimeUnixNano <= endTimeUnixNano in nanoseconds since the epoch (the rules "
             "are in kvprof/analysis/loaders/otlp.py).")


def _load_file(path: Path, cols: _Columns, formats: set[str],
               spans: SpanProblems | None = None) -> list[str]:
    """Add one file's spans; return the problems met with the file itself.

    Malformed spans are skipped and counted in `spans` (the file's other spans are kept).
    """
    spans = spans if spans is not None else SpanProblems()
    problems: list[str] = []
    first = len(cols)
    try:
        for doc, error in _iter_documents(path):
            if error:
                problems.append(error)
            elif is_otlp_document(doc):
                cols.add_otlp(doc, spans)
                formats.add("otlp")
            elif is_jaeger_document(doc):
                cols.add_records(jaeger_to_records(doc, spans))
                formats.add("jaeger")
            else:
                kind = type(doc).__name__ if not isinstance(doc, dict) else (
                    "object with keys " + ", ".join(list(doc)[:5]))
                problems.append(f"JSON of another kind ({kind}); expected {EXPECTED}")
    except UnicodeDecodeError:
        problems.append("not text (binary file?)")
    except OSError as exc:
        problems.append(f"cannot read: {exc.strerror}")
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        problems.append(f"malformed span data ({type(exc).__name__}: {exc})")
    cols.mark_source(first, path.name)
    return problems


def _file_verdict(problems: list[str], spans: SpanProblems, read: int) -> str | None:
    """Why a file is listed as skipped (None: read whole), from its problems and bad spans."""
    whys = problems + ([spans.skip_text()] if spans.skipped else [])
    if not whys:
        return None
    more = f" (+{len(whys) - 1} more)" if len(whys) > 1 else ""
    if read:
        return f"partly read: {whys[0]}{more}"
    return (whys[0] if problems else f"no usable span: {whys[0]}") + more


def _span_notes(per_file: list[tuple[str, SpanProblems]]) -> list[str]:
    """The report's sentences about malformed spans (skipped, or kept without their parent)."""
    notes = []
    bad = [(f, p) for f, p in per_file if p.skipped]
    if bad:
        total = sum(p.skipped for _, p in bad)
        notes.append(f"Skipped {total} malformed span(s) in {len(bad)} trace file(s); first, "
                     f"in {Path(bad[0][0]).name}: {bad[0][1].first_skip}. The other spans "
                     "were used.")
    orphans = [(f, p) for f, p in per_file if p.parents_dropped]
    if orphans:
        total = sum(p.parents_dropped for _, p in orphans)
        notes.append(f"Kept {total} span(s) whose parent span id was malformed as roots (no "
                     f"parent); first, in {Path(orphans[0][0]).name}: "
                     f"{orphans[0][1].first_parent}.")
    return notes


def no_spans_error(path: Path, skipped: list[tuple[str, str]],
                   per_file: list[tuple[str, SpanProblems]]) -> BadInputError:
    """The error for traces of which no span could be read: the first files' reasons, and a
    hint on the span shape when some spans were there but malformed."""
    detail = "; ".join(f"{Path(f).name}: {why}" for f, why in skipped[:5])
    return BadInputError(
        f"no spans could be read from {path}" + (f" ({detail})" if detail else ""),
        hint=SPAN_HINT if any(sp.skipped for _, sp in per_file) else f"Expected {EXPECTED}.")


def load_spans(source: str | Path, service: str | None = None, lookback: str = "1h") -> SpanLoad:
    """Load every span of a file, a directory or a Jaeger query URL into the span table.

    Malformed spans are skipped and counted (SpanLoad.spans_skipped, .skipped, .notes); a
    source without one usable span is a BadInputError naming each file and what was wrong.
    """
    import pandas as pd

    cols, formats = _Columns(), set()
    tables = []
    skipped: list[tuple[str, str]] = []
    files: list[str] = []
    per_file: list[tuple[str, SpanProblems]] = []
    text = str(source)
    if text.startswith(("http://", "https://")):
        doc = fetch_jaeger(text, service, lookback)
        spans = SpanProblems()
        cols.add_records(jaeger_to_records(doc, spans))
        cols.mark_source(0, text)
        per_file.append((text, spans))
        formats.add("jaeger")
        why = _file_verdict([], spans, len(cols))
        if why:
            skipped.append((text, why))
        if not len(cols):
            raise BadInputError(f"no usable spans from {text}" + (f" ({why})" if why else ""),
                                hint=SPAN_HINT if spans.skipped else
                                "Check --service and --lookback (e.g. 1h, 30m).")
        files.append(text)
    else:
        path = Path(source)
        why_path = path_problem(path, "any")
        if why_path:
            raise BadInputError(f"trace path {path}: {why_path}",
                                hint="Pass a trace file, a directory of *.jsonl/*.json, or a "
                                "Jaeger URL (http://HOST:16686 --service NAME).")
        paths = trace_files(path) if path.is_dir() else [path]
        if not paths:
            raise BadInputError(f"no trace files (*.json, *.jsonl) in {path}",
                                hint="Point --traces at the probes' output directory.")
        paths, too_deep = _without_deep(paths)  # before Arrow, which crashes on them
        skipped += too_deep
        for p, fast in zip(paths, _read_arrow_all(paths), strict=True):
            if fast is not None:
                # Arrow read the file: its table (maybe empty) and bad spans are the answer.
                table, spans = fast
                problems: list[str] = []
                read = table.num_rows
                if read:
                    tables.append(table)
                    formats.add("otlp")
            else:
                spans = SpanProblems()
                before = len(cols)
                problems = _load_file(p, cols, formats, spans)
                read = len(cols) - before
            per_file.append((str(p), spans))
            why = _file_verdict(problems, spans, read)
            if why:
                skipped.append((str(p), why))
            if read:
                files.append(str(p))
        if not len(cols) and not tables:
            raise no_spans_error(path, skipped, per_file)
    from kvprof.analysis.loaders.dynamo_records import holds_records

    for f, why in skipped:
        if holds_records(f):  # NVIDIA Dynamo's request_end records: the report reads them
            log.info("%s: NVIDIA Dynamo request_end records, not spans", f)
        else:
            log.warning("skipped %s: %s", f, why)
    for f, spans in per_file:
        if spans.parents_dropped:
            log.warning("%s: %s", f, spans.parent_text())
    frames = []
    if tables:
        import pyarrow as pa

        frames.append(pa.concat_tables(tables).to_pandas())
    if len(cols):
        frames.append(cols.frame())
    spans_df = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    spans_df, dup_note = drop_duplicate_spans(finalize_spans(spans_df))
    return SpanLoad(spans=spans_df, files=files, skipped=skipped,
                    formats=formats, spans_skipped=sum(sp.skipped for _, sp in per_file),
                    parents_dropped=sum(sp.parents_dropped for _, sp in per_file),
                    notes=_span_notes(per_file) + ([dup_note] if dup_note else []))


def _without_deep(paths: list[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The files a JSON parser can read safely, and (file, why) for those nested too deeply."""
    from kvprof.inputs import nesting_problem

    keep, deep = [], []
    for p in paths:
        why = nesting_problem(p)
        if why:
            deep.append((str(p), why))
        else:
            keep.append(p)
    return keep, deep


def _read_arrow_all(paths: list[Path]) -> list:
    """The Arrow fast path on every file, several files at once: (table, bad spans) or None.

    Arrow parses and flattens without holding the GIL, and one file at a time leaves cores idle
    (a file is only a block or two), so threads overlap the files.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    from kvprof.analysis.loaders.otlp_arrow import read_otlp_jsonl

    def one(p: Path):
        if not _readable(p):
            return None
        spans = SpanProblems()
        table = read_otlp_jsonl(p, spans)
        return None if table is None else (table, spans)

    workers = min(len(paths), os.cpu_count() or 1)
    if workers <= 1:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, paths))


def _readable(path: Path) -> bool:
    """Worth a try on the Arrow path: JSON lines starting with an OTLP object."""
    try:
        with path.open("rb") as fh:
            head = fh.read(64)
    except OSError:
        return False
    return head.lstrip().startswith(b'{"resourceSpans"')


def load_records(source: str | Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """Full-fidelity span records of a file or directory (for conversion), plus skipped files.

    Malformed spans are skipped and counted per file: ``(file, "partly read: N malformed
    span(s) skipped (first: ...)")``; spans kept without their malformed parent id are listed
    the same way.
    """
    from kvprof.analysis.loaders.perfetto import is_perfetto_document, perfetto_to_records

    path = Path(source)
    why_path = path_problem(path, "any")
    if why_path:
        raise BadInputError(f"trace path {path}: {why_path}",
                            hint="Pass a trace file or directory.")
    paths, skipped = _without_deep(trace_files(path) if path.is_dir() else [path])
    records: list[dict] = []
    any_spans = False
    for p in paths:
        before = len(records)
        spans = SpanProblems()
        try:
            for doc, error in _iter_documents(p):
                if error:
                    skipped.append((str(p), error))
                elif is_otlp_document(doc):
                    records.extend(otlp_to_records(doc, spans))
                elif is_jaeger_document(doc):
                    records.extend(jaeger_to_records(doc, spans))
                elif is_perfetto_document(doc):
                    records.extend(perfetto_to_records(doc))
                else:
                    skipped.append((str(p), f"JSON of another kind; expected {EXPECTED}"))
        except (UnicodeDecodeError, OSError, KeyError, TypeError, ValueError,
                AttributeError, RecursionError) as exc:
            del records[before:]
            skipped.append((str(p), f"unreadable ({type(exc).__name__}: {exc})"))
            continue
        if spans.skipped:
            any_spans = True
            read = len(records) > before
            skipped.append((str(p), ("partly read: " if read else "no usable span: ")
                            + spans.skip_text()))
        if spans.parents_dropped:
            skipped.append((str(p), spans.parent_text()))
    if not records:
        detail = "; ".join(f"{Path(f).name}: {why}" for f, why in skipped[:5])
        raise BadInputError(f"no spans could be read from {path}" + (f" ({detail})" if detail
                                                                       else ""),
                            hint=SPAN_HINT if any_spans else f"Expected {EXPECTED}.")
    return records, skipped


def require_kvprof_spans(load: SpanLoad, source: str | Path) -> list[str]:
    """Fail clearly when the traces hold no span the analysis reads; the notes to add when
    they hold only spans of others (NVIDIA Dynamo's, vLLM's own): the legs those show are
    reported, the engine's inside is not seen."""
    names = set(load.spans["name"].astype(str).unique())
    if names & set(sc.ALL_SPANS):
        return []
    if names & set(sc.FOREIGN_SPANS):
        return [f"No kvprof probe spans in {source}, only " + ", ".join(sorted(
            names & set(sc.FOREIGN_SPANS))) + ": the legs between those spans are reported, "
            "the engines' own (API server, scheduler, KV transfer) are not seen. Run the "
            "workers under `kvprof attach` to see them."]
    shown = ", ".join(sorted(names)[:6])
    raise BadInputError(
        f"{source}: {len(load.spans)} spans but none that kvprof's probes write "
        f"(found: {shown})",
        hint="Expected spans named " + ", ".join(sc.ALL_SPANS[:4]) + ", ... with "
        f"{sc.ATTR_REQUEST_ID} attributes, or NVIDIA Dynamo's "
        f"{sc.DYNAMO_HTTP_REQUEST} / {sc.DYNAMO_HANDLE}; run vLLM under `kvprof attach`.",
    )
