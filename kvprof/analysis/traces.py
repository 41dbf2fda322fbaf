"""Load spans from OTLP/JSON or Jaeger JSON (file, directory or Jaeger URL) into a DataFrame.

The table's columns are documented in kvprof.analysis.span_schema.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvprof import semconv as sc
from kvprof.analysis.jaeger import fetch_jaeger, is_jaeger_document, jaeger_to_records
from kvprof.analysis.otlp import is_otlp_document, otlp_to_records
from kvprof.analysis.span_schema import ATTR_COLUMNS, NUMERIC_COLUMNS, finalize_spans
from kvprof.errors import BadInputError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

TRACE_SUFFIXES = (".json", ".jsonl", ".ndjson")

@dataclass
class SpanLoad:
    """What a trace source gave: the span table, the files read and the files skipped."""

    spans: pd.DataFrame
    files: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    formats: set[str] = field(default_factory=set)


class _Columns:
    """Column lists filled span by span; attributes are sparse (index, value) pairs."""

    def __init__(self) -> None:
        self.trace_id: list[str] = []
        self.span_id: list[str] = []
        self.parent: list[str] = []
        self.name: list[str] = []
        self.start: list[int] = []
        self.end: list[int] = []
        self.attr_idx: dict[str, list[int]] = {c: [] for c in ATTR_COLUMNS.values()}
        self.attr_val: dict[str, list[Any]] = {c: [] for c in ATTR_COLUMNS.values()}
        # Resource attributes apply to a contiguous run of spans: (first, stop, column, value).
        self.ranges: list[tuple[int, int, str, Any]] = []
        self.sources: list[tuple[int, int, str]] = []
        self._cache: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.span_id)

    def add_otlp(self, doc: dict) -> None:
        """The hot path: one ExportTraceServiceRequest without per-span dicts of our own."""
        amap = ATTR_COLUMNS.get
        cache = self._cache.setdefault
        t_app, s_app, p_app = self.trace_id.append, self.span_id.append, self.parent.append
        n_app, b_app, e_app = self.name.append, self.start.append, self.end.append
        idx, val = self.attr_idx, self.attr_val
        for rs in doc.get("resourceSpans") or ():
            first = len(self.span_id)
            for ss in rs.get("scopeSpans") or rs.get("instrumentationLibrarySpans") or ():
                for sp in ss.get("spans") or ():
                    i = len(self.span_id)
                    tid = sp.get("traceId") or ""
                    if not tid.islower():
                        tid = tid.lower()
                    t_app(cache(tid, tid))
                    s_app((sp.get("spanId") or "").lower())
                    p_app((sp.get("parentSpanId") or "").lower())
                    nm = sp.get("name", "")
                    n_app(cache(nm, nm))
                    b_app(int(sp.get("startTimeUnixNano") or 0))
                    e_app(int(sp.get("endTimeUnixNano") or 0))
                    for a in sp.get("attributes") or ():
                        col = amap(a["key"])
                        if col is not None:
                            v = a.get("value")
                            if v:
                                idx[col].append(i)
                                val[col].append(v.popitem()[1])
            stop = len(self.span_id)
            if stop > first:
                for a in (rs.get("resource") or {}).get("attributes") or ():
                    col = amap(a["key"])
                    if col is not None and a.get("value"):
                        self.ranges.append((first, stop, col, a["value"].popitem()[1]))

    def add_records(self, records) -> None:
        """The general path (Jaeger): span records as kvprof.analysis.otlp documents them."""
        for rec in records:
            i = len(self.span_id)
            self.trace_id.append(rec["trace_id"])
            self.span_id.append(rec["span_id"])
            self.parent.append(rec.get("parent_span_id") or "")
            self.name.append(rec["name"])
            self.start.append(int(rec["start_ns"]))
            self.end.append(int(rec["end_ns"]))
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
        for col in ATTR_COLUMNS.values():
            numeric = col in NUMERIC_COLUMNS
            arr = np.full(n, np.nan if numeric else None, dtype=float if numeric else object)
            for first, stop, value in by_col.get(col, ()):
                # Resource values are defaults: a span's own attribute (set below) wins.
                arr[first:stop] = float(value) if numeric else value
            if self.attr_idx[col]:
                values = self.attr_val[col]
                if numeric:
                    values = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce")
                    values = values.to_numpy(dtype=float)
                arr[np.asarray(self.attr_idx[col], dtype=np.int64)] = values
            data[col] = arr
        src = np.empty(n, dtype=object)
        for first, stop, name in self.sources:
            src[first:stop] = name
        data["source"] = src
        return pd.DataFrame(data)


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


def _load_file(path: Path, cols: _Columns, formats: set[str]) -> list[str]:
    """Add one file's spans; return the problems met (an unreadable file raises BadInputError)."""
    problems: list[str] = []
    first = len(cols)
    try:
        for doc, error in _iter_documents(path):
            if error:
                problems.append(error)
            elif is_otlp_document(doc):
                cols.add_otlp(doc)
                formats.add("otlp")
            elif is_jaeger_document(doc):
                cols.add_records(jaeger_to_records(doc))
                formats.add("jaeger")
            else:
                kind = type(doc).__name__ if not isinstance(doc, dict) else (
                    "object with keys " + ", ".join(list(doc)[:5]))
                problems.append(f"JSON of another kind ({kind}); expected {EXPECTED}")
    except UnicodeDecodeError:
        problems.append("not text (binary file?)")
    except OSError as exc:
        problems.append(f"cannot read: {exc.strerror}")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        problems.append(f"malformed span data ({type(exc).__name__}: {exc})")
    cols.mark_source(first, path.name)
    return problems


def load_spans(source: str | Path, service: str | None = None, lookback: str = "1h") -> SpanLoad:
    """Load every span of a file, a directory or a Jaeger query URL into the span table."""
    import pandas as pd

    cols, formats = _Columns(), set()
    tables = []
    skipped: list[tuple[str, str]] = []
    files: list[str] = []
    text = str(source)
    if text.startswith(("http://", "https://")):
        doc = fetch_jaeger(text, service, lookback)
        cols.add_records(jaeger_to_records(doc))
        cols.mark_source(0, text)
        files.append(text)
        formats.add("jaeger")
    else:
        path = Path(source)
        if not path.exists():
            raise BadInputError(f"trace path not found: {path}",
                                hint="Pass a trace file, a directory of *.jsonl/*.json, or a "
                                "Jaeger URL (http://HOST:16686 --service NAME).")
        paths = trace_files(path) if path.is_dir() else [path]
        if not paths:
            raise BadInputError(f"no trace files (*.json, *.jsonl) in {path}",
                                hint="Point --traces at the probes' output directory.")
        for p, table in zip(paths, _read_arrow_all(paths), strict=True):
            if table is not None and table.num_rows:
                tables.append(table)
                files.append(str(p))
                formats.add("otlp")
                continue
            before = len(cols)
            problems = _load_file(p, cols, formats)
            if problems and len(cols) == before:
                skipped.append((str(p), problems[0]))
            elif problems:
                skipped.append((str(p), f"partly read: {problems[0]}"
                                + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")))
            if len(cols) > before:
                files.append(str(p))
        if not len(cols) and not tables:
            detail = "; ".join(f"{Path(f).name}: {why}" for f, why in skipped[:5])
            raise BadInputError(
                f"no spans could be read from {path}" + (f" ({detail})" if detail else ""),
                hint=f"Expected {EXPECTED}.",
            )
    for f, why in skipped:
        log.warning("skipped %s: %s", f, why)
    frames = []
    if tables:
        import pyarrow as pa

        frames.append(pa.concat_tables(tables).to_pandas())
    if len(cols):
        frames.append(cols.frame())
    spans = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    return SpanLoad(spans=finalize_spans(spans), files=files, skipped=skipped, formats=formats)


def _read_arrow_all(paths: list[Path]) -> list:
    """The Arrow fast path on every file, several files at once.

    Arrow parses and flattens without holding the GIL, and one file at a time leaves cores idle
    (a file is only a block or two), so threads overlap the files.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    from kvprof.analysis.otlp_arrow import read_otlp_jsonl

    def one(p: Path):
        return read_otlp_jsonl(p) if _readable(p) else None

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
    """Full-fidelity span records of a file or directory (for conversion), plus skipped files."""
    from kvprof.analysis.perfetto import is_perfetto_document, perfetto_to_records

    path = Path(source)
    if not path.exists():
        raise BadInputError(f"trace path not found: {path}", hint="Pass a trace file or directory.")
    paths = trace_files(path) if path.is_dir() else [path]
    records: list[dict] = []
    skipped: list[tuple[str, str]] = []
    for p in paths:
        before = len(records)
        try:
            for doc, error in _iter_documents(p):
                if error:
                    skipped.append((str(p), error))
                elif is_otlp_document(doc):
                    records.extend(otlp_to_records(doc))
                elif is_jaeger_document(doc):
                    records.extend(jaeger_to_records(doc))
                elif is_perfetto_document(doc):
                    records.extend(perfetto_to_records(doc))
                else:
                    skipped.append((str(p), f"JSON of another kind; expected {EXPECTED}"))
        except (UnicodeDecodeError, OSError, KeyError, TypeError, ValueError) as exc:
            del records[before:]
            skipped.append((str(p), f"unreadable ({type(exc).__name__}: {exc})"))
    if not records:
        detail = "; ".join(f"{Path(f).name}: {why}" for f, why in skipped[:5])
        raise BadInputError(f"no spans could be read from {path}" + (f" ({detail})" if detail
                                                                       else ""),
                            hint=f"Expected {EXPECTED}.")
    return records, skipped


def require_kvprof_spans(load: SpanLoad, source: str | Path) -> None:
    """Fail clearly when the traces hold no span kvprof's probes write."""
    names = set(load.spans["name"].astype(str).unique())
    if not names & set(sc.ALL_SPANS):
        shown = ", ".join(sorted(names)[:6])
        raise BadInputError(
            f"{source}: {len(load.spans)} spans but none that kvprof's probes write "
            f"(found: {shown})",
            hint="Expected spans named " + ", ".join(sc.ALL_SPANS[:4]) + ", ... with "
            f"{sc.ATTR_REQUEST_ID} attributes; run vLLM under `kvprof attach`.",
        )
