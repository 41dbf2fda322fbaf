"""The span table from SQL: ``clickhouse://`` (the collector's otel_traces on a server) or
local trace files through chDB (``--engine chdb``); both end in the loader's SpanLoad, so the
report downstream is the pandas path's, unchanged."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from kvprof.analysis.clickhouse.engines import (
    SCHEME,
    ChdbEngine,
    HttpEngine,
    SqlError,
    explain,
    parse_url,
)
from kvprof.analysis.clickhouse.query import ident, otlp_files_relation, quote, spans_sql
from kvprof.analysis.clickhouse.schema import variant_of
from kvprof.errors import BadInputError, UsageError

if TYPE_CHECKING:
    import pyarrow as pa

    from kvprof.analysis.loaders.traces import SpanLoad

log = logging.getLogger(__name__)

ENGINES = ("pandas", "chdb")
# chDB reads OTLP/JSON lines; unknown fields (flags, events, links) are skipped.
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
          "d": 86400.0, "w": 604800.0}


def is_clickhouse(source: str | Path) -> bool:
    return str(source).startswith(SCHEME)


def lookback_seconds(text: str) -> float:
    """``1h``, ``30m``, ``1h30m`` -> seconds (the units Jaeger's lookback takes)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d|w)", text.strip())
    if not parts or "".join(a + b for a, b in parts) != text.strip():
        raise UsageError(f"--lookback {text!r} is not a duration",
                         hint="e.g. --lookback 1h, 30m or 2d (a number and a unit).")
    return sum(float(a) * _UNITS[b] for a, b in parts)


def load_trace_source(source: str | Path, service: str | None = None, lookback: str = "1h",
                      engine: str = "pandas") -> SpanLoad:
    """Spans from any source: clickhouse:// through SQL on the server; files through pandas
    (kvprof.analysis.loaders.traces) or chDB; a Jaeger URL through Jaeger's API."""
    from kvprof.analysis.loaders.traces import load_spans

    if engine not in ENGINES:
        raise UsageError(f"--engine {engine!r}: not one of {', '.join(ENGINES)}",
                         hint="--engine pandas (default) or --engine chdb (local files).")
    if is_clickhouse(source):
        return load_clickhouse(parse_url(str(source)), service, lookback_seconds(lookback))
    if engine == "chdb":
        if str(source).startswith(("http://", "https://")):
            raise UsageError("--engine chdb reads local trace files, not a Jaeger URL",
                             hint="Drop --engine, or pass a folder of OTLP/JSON-lines files.")
        return load_files_chdb(Path(source))
    return load_spans(source, service, lookback)


def _span_load(table: pa.Table, source_of_rows, files: list[str], fmt: str | None,
               skipped: list[tuple[str, str]]) -> SpanLoad:
    """The engine's Arrow table -> the loader's span table (same dtypes, clocks, dedup)."""
    import pandas as pd

    from kvprof.analysis.loaders.dedup import drop_duplicate_spans
    from kvprof.analysis.loaders.span_schema import CATEGORY_COLUMNS, finalize_spans
    from kvprof.analysis.loaders.traces import SpanLoad

    df = table.to_pandas()
    if "source" not in df:
        df["source"] = pd.Categorical([source_of_rows] * len(df))
    for col in CATEGORY_COLUMNS:
        if col in df:
            df[col] = _as_loaded(df[col], sort=col == "name")
    spans, note = drop_duplicate_spans(finalize_spans(df))
    return SpanLoad(spans=spans, files=files, skipped=skipped, formats={fmt} if fmt else set(),
                    notes=[note] if note else [])


def load_clickhouse(engine: HttpEngine, service: str | None, lookback_s: float) -> SpanLoad:
    """The kvprof spans of ``engine``'s table (within ``lookback_s`` of its newest span)."""
    where = engine.where
    table = f"{ident(engine.database)}.{ident(engine.table)}"
    what = f"table {engine.database}.{engine.table}"
    try:
        desc = engine.query(
            "SELECT name, type FROM system.columns WHERE database = "
            f"{quote(engine.database)} AND table = {quote(engine.table)}")
        if not desc.num_rows:
            # system.columns is empty for an absent table: ask for it, for the server's words.
            engine.query(f"SELECT 1 FROM {table} LIMIT 0")
        columns = dict(zip(desc.column("name").to_pylist(), desc.column("type").to_pylist(),
                           strict=True))
        variant = variant_of(columns, f"{what} on {where}")
        log.info("%s: %s attributes; querying", what, variant)
        # A fixed order (a server returns parts in any order): the same report every run.
        result = engine.query(spans_sql(table, variant, service, lookback_s,
                                        order="end_ns, TraceId, SpanId"))
    except SqlError as err:
        raise explain(err, where, what) from err
    if not result.num_rows:
        raise BadInputError(
            f"{what} on {where} holds no span kvprof reads in the last "
            f"{lookback_s:g} s of its newest span" + (f" of service {service}" if service else ""),
            hint="Widen --lookback (e.g. 24h), check --service, or check that the probes' "
            "collector exports to this table.")
    return _span_load(result, engine.url_text, [engine.url_text], "clickhouse", [])


def load_files_chdb(path: Path) -> SpanLoad:
    """Local OTLP/JSON-lines files read and flattened by chDB; a file it finds no span in
    (Jaeger JSON, Dynamo's request_end records, a non-OTLP file) is read by the pandas
    loader as it would be without --engine, so both engines see the same files."""
    import pandas as pd
    import pyarrow as pa

    from kvprof.analysis.loaders.traces import load_spans, trace_files
    from kvprof.inputs import path_problem

    why = path_problem(path, "any")
    if why:
        raise BadInputError(f"trace path {path}: {why}",
                            hint="Pass a trace file or a directory of *.jsonl/*.json.")
    paths = trace_files(path) if path.is_dir() else [path]
    if not paths:
        raise BadInputError(f"no trace files (*.json, *.jsonl) in {path}",
                            hint="Point --traces at the probes' output directory.")
    # One file() per file, numbered: spans keep the pandas loader's order (files in
    # trace_files order, spans in file order), which its "first span" lookups rely on.
    relation = " UNION ALL ".join(
        f"SELECT *, {i} AS _file FROM {otlp_files_relation(str(p.resolve()))}"
        for i, p in enumerate(paths))
    # Every span, as the pandas loader keeps them (the clocks a span inherits from another
    # of its trace and service must find the same donors); the breakdown filters by name.
    sql = spans_sql(f"({relation})", "map", order="_file, _pos", names=None).replace(
        "SELECT ", "SELECT toLowCardinality(_path) AS source, _ok, ", 1)
    try:
        table = ChdbEngine().query(sql)
    except SqlError as err:
        # A file chDB cannot parse: the pandas loader skips what is malformed and says so.
        log.warning("chDB could not read %s (%s); reading it with the pandas loader",
                    path, str(err).strip().splitlines()[0][:200] if str(err).strip() else "")
        load = load_spans(path)
        load.notes.append(f"chDB could not parse {path}; it was read by the pandas loader.")
        return load
    import pyarrow.compute as pc

    # Files with a malformed span go whole to the pandas reader, which skips or mends it.
    source = table.column("source").cast("string")
    bad = set(pc.filter(source, pc.invert(table.column("_ok"))).unique()
              .to_pylist()) if not pc.all(table.column("_ok")).as_py() else set()
    if bad:
        table = table.filter(pc.invert(pc.is_in(source, pa.array(list(bad)))))
    table = table.drop_columns(["_ok"])
    found = (set(table.column("source").cast("string").unique().to_pylist()) if table.num_rows
             else set())
    rest = [p for p in paths if str(p.resolve()) not in found]
    load = _span_load(table, None, [str(p) for p in paths if str(p.resolve()) in found],
                      "otlp" if table.num_rows else None, [])
    # Named by file name, as the pandas loader names them (two folders may share one).
    names = load.spans["source"].astype(object).map({str(p.resolve()): p.name for p in paths})
    load.spans["source"] = pd.Categorical(names, categories=pd.unique(names.dropna()))
    if rest:
        _read_rest(rest, paths, load)
    if not len(load.spans):
        return load_spans(path)  # raises the pandas loader's error, naming each file
    return load


def _read_rest(rest: list[Path], paths: list[Path], load: SpanLoad) -> None:
    """The files chDB found no span in, read by the pandas loader's own per-file reader (its
    stdlib path: Jaeger JSON, pretty-printed OTLP, other records): their spans follow the
    others, and the files it skips are named with its reasons, as without --engine."""
    import pandas as pd

    from kvprof.analysis.loaders.dedup import drop_duplicate_spans
    from kvprof.analysis.loaders.otlp import SpanProblems
    from kvprof.analysis.loaders.span_schema import finalize_spans
    from kvprof.analysis.loaders.traces import _Columns, _file_verdict, _load_file, _span_notes

    cols, per_file = _Columns(), []
    for p in rest:
        spans, before = SpanProblems(), len(cols)
        problems = _load_file(p, cols, load.formats, spans)
        per_file.append((str(p), spans))
        why = _file_verdict(problems, spans, len(cols) - before)
        if why:
            load.skipped.append((str(p), why))
        if len(cols) > before:
            load.files.append(str(p))
    order = {str(p): i for i, p in enumerate(paths)}
    load.files.sort(key=order.__getitem__)
    load.spans_skipped = sum(sp.skipped for _, sp in per_file)
    load.parents_dropped = sum(sp.parents_dropped for _, sp in per_file)
    load.notes = _span_notes(per_file) + load.notes
    if len(cols):
        merged = pd.concat([load.spans.astype({c: object for c in load.spans.columns
                                               if load.spans[c].dtype.name == "category"}),
                            cols.frame()], ignore_index=True)
        load.spans, note = drop_duplicate_spans(finalize_spans(merged))
        load.notes += [note] if note else []


def _as_loaded(col, sort: bool):
    """A category column with the categories the pandas loader gives it: in order of first
    appearance (Arrow's dictionary_encode; groupbys list groups in that order), or sorted
    for span names (read as text, then astype("category")); none unused."""
    import numpy as np
    import pandas as pd

    cat = col if col.dtype.name == "category" else col.astype("category")
    codes = cat.cat.codes.to_numpy()
    n_cats = len(cat.cat.categories)
    first = np.full(n_cats, len(codes), dtype=np.int64)
    seen = codes >= 0
    np.minimum.at(first, codes[seen], np.flatnonzero(seen))
    used = np.flatnonzero(first < len(codes))
    values = np.asarray(cat.cat.categories, dtype=object)[used]
    order = np.argsort(values.astype(str), kind="stable") if sort else np.argsort(
        first[used], kind="stable")
    # Typed as the loader's: strings, or object when the column is all null. Only the
    # categories are reordered and renamed; the million codes are remapped once.
    cat = cat.cat.remove_unused_categories().cat.reorder_categories(list(values[order]))
    return cat.cat.rename_categories(pd.Index(values[order], dtype="str" if len(used)
                                              else object))
