"""Load aiperf exports of every schema aiperf has shipped: per-request records and summaries.

Files of one aiperf run folder (``--output-artifact-dir``) and the schemas read
-------------------------------------------------------------------------------
``profile_export.jsonl``, one record per line: ``{"metadata", "metrics", "error"}``, each metric
``{"value": number | [numbers], "unit": "ms" | "tokens" | ...}`` in aiperf's display unit.

* aiperf after 0.1.x (the record export of Oct 2025 through 0.13.0): ``request_start_ns``,
  ``request_ack_ns`` (streaming: the server's first bytes), ``request_end_ns``,
  ``x_request_id``, ``benchmark_phase``; metric tags ``time_to_first_token``,
  ``inter_token_latency``, ``request_latency``, ...; 0.13 adds aiohttp's client HTTP timings
  ``http_req_blocked|dns_lookup|connecting|sending|waiting|receiving|duration|...`` (k6 names).
* aiperf 0.1.x (2025): ``metadata.timestamp_ns`` (the request start), ``credit_phase``, short
  tags ``ttft`` / ``ttst``, and per-record copies of the run counters ``request_count``,
  ``min_request_timestamp``, ``max_response_timestamp``, ``error_request_count``.
* Error records (both): a non-null ``error`` ``{code, type, message}`` and only ``error_*``
  metrics; aiperf computes no latency metric for them.

``profile_export_aiperf.json``, the run summary: ``{tag: {unit, avg, p1..p99, min, max, std
[, count, sum]}}`` at the top level (schema_version "1.0" as aiperf 0.8.0 writes it, "1.4" as
0.13.0 does, and the unversioned one of late 2025); aiperf 0.1.x nests the same objects under
``"records"``, genai-perf-style files under ``"metrics"``. ``profile_export_aiperf.csv``: a
``Metric,avg,...`` table of distributions, then ``Metric,Value`` for run totals, labels such as
``Time to First Token (ms)``.

Record table (``load_aiperf_records``), one row per record, in file order
------------------------------------------------------------------------
=============================  ========  ====================================================
x_request_id                   str       the X-Request-Id aiperf sent ("" when absent)
request_start_ns               int64     client send, client wall clock (request_start_ns,
                                         0.1.x timestamp_ns)
first_response_ns              Int64     client first response = request_start_ns + TTFT;
                                         <NA> without TTFT or for error records
request_ack_ns                 Int64     server acknowledged (response headers); <NA> if absent
request_end_ns                 Int64     last response received; <NA> if absent (0.1.x)
ttft_ms, itl_ms                float64   NaN for error records (never used as TTFT)
request_latency_ms             float64   NaN for error records
isl, osl                       float64   input / output sequence length (tokens)
http_req_<part>_ms             float64   client HTTP timing, <part> in blocked, dns_lookup,
                                         connecting, sending, waiting (send end -> first
                                         byte), receiving, duration, connection_overhead,
                                         total; NaN where aiperf did not record it
http_req_connection_reused     float64   1 when the connection came from the pool, else 0
error                          bool      the record is an error record
error_detail                   str       "<code> <type>: <message>" ("" when no error)
benchmark_phase                str       "profiling" / "warmup" ("" when absent)
concurrency                    Int64     from the folder name (c8, concurrency_8) or the
                                         summary's input_config; <NA> when unknown
source                         str       the records file
=============================  ========  ====================================================

``frame.attrs``: ``files``, ``records``, ``error_records``, ``bad_lines``, ``schemas`` and
``notes`` (lines for the report). A folder holding only summaries gives an empty table whose
notes say so.

Summary (``load_aiperf_summary``): an ``AiperfSummary``, a dict {metric: {stat: value}} with
aiperf 1.x metric names (``ttft`` read as time_to_first_token ...), stats avg/min/max/p1../p99/
std[/count/sum], time metrics in ms; ``.kind``, ``.recomputed``, ``.units``, ``.notes`` say where
the numbers came from. A folder with records only gets its aggregates recomputed exactly as
aiperf computes them (``summarise_records``, rules in its docstring).
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvprof.errors import BadInputError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

log = logging.getLogger(__name__)

RECORDS_FILE = "profile_export.jsonl"
SUMMARY_JSON = "profile_export_aiperf.json"
SUMMARY_CSV = "profile_export_aiperf.csv"

# aiperf 0.1.x tagged some metrics short; 1.x (Oct 2025 on) the long way.
METRIC_ALIASES = {
    "time_to_first_token": ("time_to_first_token", "ttft"),
    "time_to_second_token": ("time_to_second_token", "ttst"),
    "inter_token_latency": ("inter_token_latency", "itl"),
    "request_latency": ("request_latency", "latency", "e2e_latency"),
    "output_token_throughput": ("output_token_throughput", "output_throughput"),
    "request_throughput": ("request_throughput",),
    "output_sequence_length": ("output_sequence_length", "osl"),
    "input_sequence_length": ("input_sequence_length", "isl"),
}
_CANONICAL = {alias: name for name, aliases in METRIC_ALIASES.items() for alias in aliases}
_UNIT_TO_MS = {"ns": 1e-6, "us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3, "sec": 1e3,
               "seconds": 1e3}
HINT = ("Pass an aiperf --output-artifact-dir holding profile_export.jsonl and/or "
        "profile_export_aiperf.json / .csv (any aiperf release: 0.1.x `ttft` records and "
        "`records` summaries, 1.x `time_to_first_token`).")

# Client HTTP timings aiperf 0.13 records per request (metrics/types/http_trace_metrics.py).
HTTP_TIMINGS = ("http_req_blocked", "http_req_dns_lookup", "http_req_connecting",
                "http_req_sending", "http_req_waiting", "http_req_receiving",
                "http_req_duration", "http_req_connection_overhead", "http_req_total")
# (column, metric) of the float columns, in table order.
_FLOAT_COLUMNS = (
    ("ttft_ms", "time_to_first_token"), ("itl_ms", "inter_token_latency"),
    ("request_latency_ms", "request_latency"), ("isl", "input_sequence_length"),
    ("osl", "output_sequence_length"), *((f"{t}_ms", t) for t in HTTP_TIMINGS),
    ("http_req_connection_reused", "http_req_connection_reused"),
)
_COLUMN_METRICS = tuple(name for _, name in _FLOAT_COLUMNS)
_LATENCY_COLUMNS = 3  # ttft, itl, request latency: blanked on error records
RECORD_COLUMNS = ("x_request_id", "request_start_ns", "first_response_ns", "request_ack_ns",
                  "request_end_ns", *(c for c, _ in _FLOAT_COLUMNS), "error", "error_detail",
                  "benchmark_phase", "concurrency", "source")

# Run counters aiperf 0.1.x also wrote into every record, and how aiperf folds them
# (aggregation_kind of its BaseAggregateMetric subclasses); not distributions.
_AGGREGATE_TAGS = {"request_count": "sum", "error_request_count": "sum",
                   "good_request_count": "sum", "min_request_timestamp": "min",
                   "max_response_timestamp": "max"}
# aiperf's DerivedSumMetric totals: total tag -> the record metric it sums.
_DERIVED_SUMS = {"total_osl": "output_sequence_length", "total_isl": "input_sequence_length",
                 "total_output_tokens": "output_token_count",
                 "total_reasoning_tokens": "reasoning_token_count",
                 "total_error_isl": "error_isl"}
PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
_BAD_LINES_SHOWN = 3


class AiperfSummary(dict):
    """{metric: {stat: value}} of one run (time metrics in ms), and where it came from.

    ``kind`` names the file and schema read; ``recomputed`` is True when no aiperf summary
    was there and the numbers were computed from the per-request records; ``units`` maps each
    metric to its unit after normalising (time: "ms"); ``notes`` are lines for a report.
    """

    def __init__(self, metrics: dict[str, dict[str, float]], *, source: str, kind: str,
                 units: dict[str, str] | None = None, notes: list[str] | None = None,
                 recomputed: bool = False):
        super().__init__(metrics)
        self.source = source
        self.kind = kind
        self.units = dict(units or {})
        self.notes = list(notes or ())
        self.recomputed = recomputed


class _BadMetric(ValueError):
    """A record's metric value that is not a number (a string, an object)."""

    def __init__(self, key: str, value: Any):
        super().__init__(f"{key} is {json.dumps(value, default=str)[:40]}, expected a number")


def _to_ms(value: Any, unit: str | None, key: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise _BadMetric(key, value) from None
    if isinstance(value, str) and not math.isfinite(v):  # "NaN", "inf": text, not a time
        raise _BadMetric(key, value)
    if unit:
        factor = _unit_factor(unit)
        return v * factor if factor is not None else v
    for suffix, factor in (("_ns", 1e-6), ("_us", 1e-3), ("_s", 1e3)):
        if key.endswith(suffix):
            return v * factor
    return v


@functools.lru_cache(maxsize=64)
def _unit_factor(unit: str) -> float | None:
    return _UNIT_TO_MS.get(unit.strip().lower())


def _find_key(metrics: dict, name: str) -> str | None:
    return next((k for alias in METRIC_ALIASES.get(name, (name,))
                 for k in (alias, alias + "_ms", alias + "_ns") if k in metrics), None)


def _metric(metrics: dict, name: str, found: dict[str, str] | None = None) -> float:
    """A record's metric value in ms (time) or its own unit, by any known alias.

    ``found`` remembers which key matched per metric: one file's records share their schema,
    so the alias search runs once per file rather than once per record.
    """
    key = found.get(name) if found is not None else None
    if key is None or key not in metrics:
        key = _find_key(metrics, name)
        if key is None:
            return math.nan
        if found is not None:
            found[name] = key
    m = metrics[key]
    if isinstance(m, dict):
        value = m.get("value")
        if value is None or isinstance(value, (list, bool)):
            return math.nan
        return _to_ms(value, m.get("unit"), key)
    if m is None or isinstance(m, (list, bool, str)):
        return math.nan
    return _to_ms(m, None, key)


def _is_stat_value(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_MISSING = object()


def _column_values(metrics: dict, found: dict[str, str]) -> list[float]:
    """The table's metric columns of one record (``_FLOAT_COLUMNS`` order), time in ms.

    The hot loop of a 100k-record load: the key of each metric is looked up once per file
    (``found``) and each unit's factor once per process (``_FACTORS``).
    """
    out = []
    # The metrics a record lacks depend only on its keys (the alias search finds nothing
    # whatever ``found`` holds): looked up once per key set, not once per record.
    sig = tuple(metrics)
    absent = _ABSENT.get(sig)
    if absent is None:
        absent = frozenset(n for n in _COLUMN_METRICS if _find_key(metrics, n) is None)
        if len(_ABSENT) < 4096:  # bounded: records of odd, varying schemas stay correct
            _ABSENT[sig] = absent
    for name in _COLUMN_METRICS:
        if name in absent:
            out.append(math.nan)
            continue
        key = found.get(name)
        m = metrics.get(key, _MISSING) if key is not None else _MISSING
        if m is _MISSING:
            out.append(_metric(metrics, name, found))
            continue
        if type(m) is dict:
            value = m.get("value")
            if type(value) is float or type(value) is int:
                unit = m.get("unit")
                factor = _FACTORS.get(unit, _MISSING)
                if factor is _MISSING:
                    factor = _FACTORS[unit] = (_unit_factor(unit) if isinstance(unit, str)
                                               else None)
                out.append(value * factor if factor is not None else float(value))
                continue
        out.append(_metric(metrics, name, found))
    return out


_FACTORS: dict[Any, float | None] = {}
_ABSENT: dict[tuple, frozenset] = {}  # a record's metric keys -> column metrics it lacks


def _json_loads():
    """orjson's loads (several times faster on 100k-record exports), else the stdlib's."""
    try:
        import orjson
    except ImportError:  # pragma: no cover - orjson is a dependency; stay usable without it
        return json.loads
    return orjson.loads


def _as_ns(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        ns = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return ns if 0 <= ns < 2**63 else None  # an epoch-ns that fits int64, else "no data"


def _error_detail(err: Any) -> str:
    if isinstance(err, dict):
        head = " ".join(str(err[k]) for k in ("code", "type") if err.get(k) is not None)
        msg = str(err.get("message") or "")
        return f"{head}: {msg}" if head and msg else (head or msg or "error")
    return str(err)


# --- records ----------------------------------------------------------------------------------

class _Collected:
    """Every metric of a records file, kept raw per tag until ``finish`` aggregates it.

    The per-record work is one dict lookup and one append per metric: a 100k-record file
    holds ~3.5M metric values.
    """

    def __init__(self) -> None:
        self.raw: dict[str, list] = {}           # tag -> values (error-free records)
        self.raw_errors: dict[str, list] = {}    # error_* tag -> values (error records)
        self.raw_units: dict[str, str | None] = {}
        self.aggregates: dict[str, list] = {}    # 0.1.x per-record run counters

    def add(self, metrics: dict, is_error: bool) -> None:
        raw, units = (self.raw_errors, self.raw_units) if is_error else (self.raw, self.raw_units)
        for tag, m in metrics.items():
            if tag in _AGGREGATE_TAGS:
                value = m.get("value") if isinstance(m, dict) else m
                self.aggregates.setdefault(tag, []).append(value)
                continue
            if is_error and not tag.startswith("error_"):
                continue  # aiperf computes only its ERROR_ONLY metrics for error records
            if type(m) is dict:
                value, unit = m.get("value"), m.get("unit")
            else:
                value, unit = m, None
            bucket = raw.get(tag)
            if bucket is None:
                raw[tag] = bucket = []
                units.setdefault(tag, unit)
            elif unit != units[tag]:
                value = _convert(value, unit, units[tag])
            bucket.append(value)

    def finish(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, str]]:
        """(error-free metrics, error metrics, units): canonical names, time values in ms."""
        units: dict[str, str] = {}
        out: list[dict[str, np.ndarray]] = []
        for raw in (self.raw, self.raw_errors):
            done: dict[str, np.ndarray] = {}
            for tag, values in raw.items():
                unit = self.raw_units.get(tag)
                factor = _unit_factor(unit) if isinstance(unit, str) else None
                name = _CANONICAL.get(tag, tag)
                arr = _numbers(values)
                if factor is not None:
                    arr = arr * factor
                done[name] = arr
                units.setdefault(name, "ms" if factor is not None else (unit or ""))
            out.append(done)
        return out[0], out[1], units


def _numbers(values: list) -> np.ndarray:
    """The numbers of one metric's values, list values (inter_chunk_latency) flattened."""
    import itertools

    import numpy as np

    if values and type(values[0]) is list:  # a list metric: every record holds a list
        values = list(itertools.chain.from_iterable(
            v if type(v) is list else (v,) for v in values))
    try:
        return np.asarray(values, dtype=np.float64).ravel()
    except (TypeError, ValueError):  # None, strings or ragged lists among the values
        flat = itertools.chain.from_iterable(v if type(v) is list else (v,) for v in values)
        return np.asarray([float(v) for v in flat if _is_stat_value(v)], dtype=np.float64)


def _convert(value: Any, unit: str | None, into: str | None) -> Any:
    """A value whose unit differs from the file's first one for its tag, in that unit."""
    src = _unit_factor(unit) if isinstance(unit, str) else None
    dst = _unit_factor(into) if isinstance(into, str) else None
    if src is None or dst is None:
        return value
    if type(value) is list:
        return [v * src / dst for v in value if _is_stat_value(v)]
    return value * src / dst if _is_stat_value(value) else value


@dataclass
class _RecordsFile:
    frame: pd.DataFrame
    lines: int
    bad: int
    bad_shown: list[str]
    errors: int
    schema: str
    collected: _Collected | None
    range_notes: list[str] = field(default_factory=list)


def _read_records(path: Path, collect: bool = False) -> _RecordsFile:
    """Parse one profile_export.jsonl; bad lines are counted, not fatal, unless all are bad."""
    import numpy as np
    import pandas as pd

    # Column-wise: one tuple per record, no per-record dict for pandas to take apart.
    rows: list[tuple] = []
    seen: dict[str, str] = {}
    bad_shown: list[str] = []
    n_bad = n_lines = n_errors = 0
    short_schema = long_schema = False
    collected = _Collected() if collect else None
    nonstandard: list[tuple[int, list[str]]] = []  # lines with NaN / Infinity, and where
    loads = _json_loads()
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            n_lines += 1
            why = None
            try:
                doc = loads(line)
            except ValueError:
                try:  # orjson refuses what the stdlib takes (NaN, huge ints): ask it too
                    doc = json.loads(line)
                    if b"NaN" in line or b"Infinity" in line:
                        nonstandard.append((lineno, _non_finite_metrics(doc)))
                except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError
                    doc = None
                    why = (f"{path} line {lineno} is truncated (the file ends mid-record)"
                           if not line.endswith(b"\n") else f"{path} line {lineno} is not JSON")
            if why is None:
                if not isinstance(doc, dict) or not isinstance(doc.get("metrics"), dict):
                    why = (f"{path} line {lineno} is not an aiperf record "
                           "(no \"metrics\" object)")
            if why is None:
                meta = doc.get("metadata")
                meta = meta if isinstance(meta, dict) else {}
                metrics = doc["metrics"]
                err = doc.get("error")
                if err is None:
                    err = meta.get("error")  # how aiperf's 0.1 docs drew it
                is_error = bool(err)
                try:
                    values = _column_values(metrics, seen)
                except _BadMetric as exc:
                    values = [math.nan] * len(_COLUMN_METRICS)
                    why = f"{path} line {lineno}: {exc}"
                if why is None and not is_error and math.isnan(values[0]) and math.isnan(values[2]):
                    keys = ", ".join(list(metrics)[:8])
                    why = (f"{path} line {lineno}: unknown aiperf record schema (metrics: "
                           f"{keys}); expected time_to_first_token (aiperf 1.x) or ttft (0.x)")
                start = _as_ns(meta.get("request_start_ns"))
                if start is not None:
                    long_schema = True
                else:
                    start = _as_ns(meta.get("timestamp_ns"))
                    short_schema = short_schema or start is not None
                if why is None and start is None:
                    why = (f"{path} line {lineno}: no request_start_ns (aiperf 1.x) or "
                           "timestamp_ns (0.x) in its metadata")
            if why is not None:
                n_bad += 1
                if len(bad_shown) < _BAD_LINES_SHOWN:
                    bad_shown.append(why)
                continue
            if is_error:
                n_errors += 1
                values[:_LATENCY_COLUMNS] = [math.nan] * _LATENCY_COLUMNS
            phase = meta.get("benchmark_phase") or meta.get("credit_phase") or ""
            if collected is not None and phase != "warmup":
                collected.add(metrics, is_error)
            rows.append((
                str(meta.get("x_request_id") or meta.get("request_id") or ""),
                start, _as_ns(meta.get("request_ack_ns")), _as_ns(meta.get("request_end_ns")),
                is_error, _error_detail(err) if is_error else "", str(phase), *values,
            ))
    if not rows:
        if bad_shown:
            more = f" (and {n_bad - 1} more bad lines)" if n_bad > 1 else ""
            raise BadInputError(bad_shown[0] + more, hint=HINT)
        raise BadInputError(f"{path} holds no aiperf records", hint=HINT)
    columns = list(zip(*rows, strict=True))
    start_ns = np.asarray(columns[1], dtype=np.int64)
    floats = {name: np.asarray(columns[i], dtype=np.float64)
              for i, (name, _) in enumerate(_FLOAT_COLUMNS, start=7)}
    range_notes = _blank_out_of_range(floats, path, nonstandard)
    ttft = floats["ttft_ms"]
    has_ttft = np.isfinite(ttft)
    first = start_ns + np.rint(np.where(has_ttft, ttft, 0.0) * 1e6).astype(np.int64)
    summary_json = path.parent / SUMMARY_JSON
    conc = concurrency_of(path.parent, summary_json if summary_json.exists() else None)
    frame = pd.DataFrame({
        "x_request_id": pd.Series(columns[0], dtype="str"),
        "request_start_ns": start_ns,
        "first_response_ns": pd.arrays.IntegerArray(first, ~has_ttft),
        "request_ack_ns": _nullable_ns(columns[2]),
        "request_end_ns": _nullable_ns(columns[3]),
        **floats,
        "error": np.asarray(columns[4], dtype=bool),
        "error_detail": pd.Series(columns[5], dtype="str"),
        "benchmark_phase": pd.Series(columns[6], dtype="str"),
        "concurrency": pd.array([conc] * len(rows), dtype="Int64"),
    })
    frame["source"] = str(path)
    schema = ("aiperf 0.1.x (timestamp_ns, ttft)" if short_schema and not long_schema
              else "aiperf 1.x (request_start_ns, time_to_first_token)")
    return _RecordsFile(frame=frame, lines=n_lines, bad=n_bad, bad_shown=bad_shown,
                        errors=n_errors, schema=schema, collected=collected,
                        range_notes=range_notes)


# A time above this is no request's (11.6 days); 1e300 ms would be printed as a result.
_MAX_MS = 1e9


def _non_finite_metrics(doc: Any) -> list[str]:
    """The metrics of a record whose value is NaN or infinite (for the warning)."""
    metrics = doc.get("metrics") if isinstance(doc, dict) else None
    out = []
    for key, m in (metrics.items() if isinstance(metrics, dict) else ()):
        v = m.get("value") if isinstance(m, dict) else m
        if isinstance(v, float) and not math.isfinite(v):
            out.append(key)
    return out


def _blank_out_of_range(floats: dict[str, np.ndarray], path: Path,
                        nonstandard: list[tuple[int, list[str]]]) -> list[str]:
    """Blank (NaN) the times that are infinite, negative or absurd; a note per metric."""
    import numpy as np

    notes = []
    names = dict(_FLOAT_COLUMNS)
    for col, arr in floats.items():
        if col == "http_req_connection_reused":
            continue
        limit = _MAX_MS if col.endswith("_ms") else 1e12
        with np.errstate(invalid="ignore"):
            bad = np.isinf(arr) | (arr < 0) | (arr > limit)
        if bad.any():
            notes.append(f"{path}: {int(bad.sum())} {names.get(col, col)} value(s) out of range "
                         f"(first: {arr[bad][0]:g}; expected 0 to {limit:g}) were left out")
            arr[bad] = np.nan
    if nonstandard:
        line, where = nonstandard[0]
        notes.append(f"{path} line {line}" + (f" ({', '.join(where[:3])})" if where else "")
                     + (f" and {len(nonstandard) - 1} more line(s)" if len(nonstandard) > 1
                        else "")
                     + ": NaN or Infinity is not a JSON number; those values were left out")
    return notes


def _nullable_ns(values: tuple) -> pd.api.extensions.ExtensionArray:
    import numpy as np
    import pandas as pd

    mask = np.fromiter((v is None for v in values), dtype=bool, count=len(values))
    data = np.fromiter((0 if v is None else v for v in values), dtype=np.int64,
                       count=len(values))
    return pd.arrays.IntegerArray(data, mask)


def _empty_records() -> pd.DataFrame:
    import pandas as pd

    dtypes = {"x_request_id": "str", "request_start_ns": "int64", "first_response_ns": "Int64",
              "request_ack_ns": "Int64", "request_end_ns": "Int64", "error": "bool",
              "error_detail": "str", "benchmark_phase": "str", "concurrency": "Int64",
              "source": "str"}
    return pd.DataFrame({c: pd.Series([], dtype=dtypes.get(c, "float64"))
                         for c in RECORD_COLUMNS})


def _file_notes(f: _RecordsFile, path: Path) -> list[str]:
    notes = []
    if f.bad:
        notes.append(f"{path}: {f.bad} of {f.lines} lines skipped (not aiperf records); "
                     f"first: {f.bad_shown[0]}")
    if f.errors:
        notes.append(f"{path}: {f.errors} error records flagged (error=True); their TTFT is "
                     "not used.")
    return notes + f.range_notes


def load_aiperf_records(source: str | Path) -> pd.DataFrame:
    """Per-request records of profile_export.jsonl: a file, a run folder or a tree of runs.

    The columns are documented in this module's docstring. A folder that holds only aiperf
    summaries (JSON or CSV, no records) gives an empty table whose ``attrs["notes"]`` say so.
    """
    import pandas as pd

    path = Path(source)
    if path.is_dir():
        found = sorted(path.rglob(RECORDS_FILE))
        if not found:
            return _summary_only(path)
    elif not path.exists():
        raise BadInputError(f"aiperf path not found: {path}", hint=HINT)
    elif path.name != RECORDS_FILE and path.suffix in (".json", ".csv"):
        return _summary_only(path)
    else:
        found = [path]
    files = [(f, _read_records(f)) for f in found]
    frame = (files[0][1].frame if len(files) == 1
             else pd.concat([r.frame for _, r in files], ignore_index=True))
    notes = [n for f, r in files for n in _file_notes(r, f)]
    for f, r in files:
        if r.bad:  # error records are normal (cancellation runs); skipped lines are not
            log.warning("%s: %d of %d lines skipped; first: %s", f, r.bad, r.lines,
                        r.bad_shown[0])
        for note in r.range_notes:
            log.warning("%s", note)
    frame.attrs = {"files": [str(f) for f, _ in files], "records": int(len(frame)),
                   "error_records": sum(r.errors for _, r in files),
                   "bad_lines": sum(r.bad for _, r in files),
                   "schemas": sorted({r.schema for _, r in files}), "notes": notes}
    return frame


def _summary_only(path: Path) -> pd.DataFrame:
    if path.is_dir():
        summaries = sorted(p for name in (SUMMARY_JSON, SUMMARY_CSV) for p in path.rglob(name))
        if not summaries:
            raise BadInputError(
                f"no aiperf files under {path} (looked for {RECORDS_FILE}, {SUMMARY_JSON}, "
                f"{SUMMARY_CSV})", hint=HINT)
    else:
        summaries = [path]
    for s in summaries:
        load_aiperf_summary(s)  # a summary that is not aiperf's is an error, not "no records"
    frame = _empty_records()
    note = (f"{path} holds only aiperf summaries ({', '.join(sorted({s.name for s in summaries}))})"
            ", no per-request profile_export.jsonl: the client's per-request TTFT and "
            "timestamps are unknown, so TTFT comes from the spans.")
    log.warning("%s", note)
    frame.attrs = {"files": [], "records": 0, "error_records": 0, "bad_lines": 0,
                   "schemas": [], "notes": [note]}
    return frame


# --- summaries --------------------------------------------------------------------------------

def _normalise_summary(doc: dict, where: str, kind: str) -> AiperfSummary:
    out: dict[str, dict[str, float]] = {}
    units: dict[str, str] = {}
    bad: list[str] = []
    for key, m in doc.items():
        if not isinstance(m, dict) and key in _CANONICAL:
            bad.append(f"{key} is {json.dumps(m, default=str)[:30]}, expected an object")
            continue
        if not isinstance(m, dict) or key in ("input_config", "telemetry_data", "run_info"):
            continue
        for k, v in list(m.items()):
            limit = _MAX_TIMESTAMP if key.endswith("_timestamp") else _MAX_SUMMARY
            if _is_stat_value(v) and not (math.isfinite(v) and 0 <= v <= limit):
                bad.append(f"{key}.{k} is {v!r}")
                m = {**m, k: None}  # left out, not printed as a result
        stats = {k: v for k, v in m.items() if k not in ("unit", "tag", "header")}
        if not any(_is_stat_value(v) for v in stats.values()):
            continue
        name = _CANONICAL.get(key, key)
        if name in out and key != name:
            continue  # the long (1.x) name wins over an alias in the same file
        unit = m.get("unit") if isinstance(m.get("unit"), str) else None
        timed = unit is not None and _unit_factor(unit) is not None
        out[name] = {
            ("avg" if k == "mean" else k): (_to_ms(v, unit, key) if timed and k != "count"
                                            else float(v))
            for k, v in stats.items() if _is_stat_value(v)
        }
        units[name] = "ms" if timed else (unit or "")
    notes = []
    if bad:
        notes.append(f"{where}: left out {len(bad)} value(s) of the wrong type or out of range "
                     f"(NaN, infinite, negative or absurd): {'; '.join(bad[:4])}")
        log.warning("%s", notes[-1])
    if "time_to_first_token" not in out and "request_latency" not in out:
        keys = ", ".join(list(doc)[:8])
        raise BadInputError(f"{where}: unknown aiperf summary schema (keys: {keys})",
                            hint="Expected time_to_first_token/ttft and request_latency. " + HINT)
    return AiperfSummary(out, source=where, kind=kind, units=units, notes=notes)


# No summary statistic (ms, tokens, tokens/s, counts) of a real run comes near this.
_MAX_SUMMARY = 1e12
# Wall-clock timestamps (min_request_timestamp, max_response_timestamp) are ns since the epoch,
# ~1.8e18 today; 1e20 is the year 5138.
_MAX_TIMESTAMP = 1e20


def _csv_key(label: str) -> tuple[str, str | None]:
    match = re.match(r"^(.*?)\s*\(([^)]*)\)\s*$", label)
    name, unit = (match.group(1), match.group(2)) if match else (label, None)
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_"), unit


# The CSV labels aiperf's tags by their headers; these headers do not snake-case to the tag.
_CSV_NAMES = {"benchmark_duration": "benchmark_duration",
              "total_input_sequence_length": "total_isl",
              "total_output_sequence_length": "total_osl",
              "error_input_sequence_length": "error_isl",
              "total_error_input_sequence_length": "total_error_isl",
              "minimum_request_timestamp": "min_request_timestamp",
              "maximum_response_timestamp": "max_response_timestamp"}


def _summary_from_csv(path: Path) -> AiperfSummary:
    doc: dict[str, dict] = {}
    header: list[str] = []
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        for row in csv.reader(fh):
            if not row or not any(row):
                header = []
                continue
            if row[0] == "Metric":
                header = row
                continue
            if not header:
                continue
            key, unit = _csv_key(row[0])
            key = _CSV_NAMES.get(key, key)
            stats: dict[str, Any] = {"unit": unit} if unit else {}
            for col, cell in zip(header[1:], row[1:], strict=False):
                try:
                    stats["avg" if col == "Value" else col] = float(cell)
                except ValueError:
                    continue
            doc[key] = stats
    summary = _normalise_summary(doc, str(path), "profile_export_aiperf.csv")
    summary.notes.append(f"{path}: aiperf's CSV summary (values rounded to 2 decimals).")
    return summary


def load_aiperf_summary(source: str | Path) -> AiperfSummary:
    """The aggregate metrics of one aiperf run.

    A folder: its profile_export_aiperf.json, else .csv, else the aggregates recomputed from
    its profile_export.jsonl (``summarise_records``). A file: read by its kind.
    """
    path = Path(source)
    if path.is_dir():
        for name in (SUMMARY_JSON, SUMMARY_CSV, RECORDS_FILE):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise BadInputError(f"no {SUMMARY_JSON}, {SUMMARY_CSV} or {RECORDS_FILE} in {path}",
                                hint=HINT)
    if not path.exists():
        raise BadInputError(f"aiperf summary not found: {path}", hint=HINT)
    if path.suffix == ".csv":
        return _summary_from_csv(path)
    if path.suffix == ".jsonl":
        return summarise_records(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise BadInputError(f"{path} is empty", hint=HINT)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        cut = " - the file ends early (truncated?)" if exc.pos >= len(text.rstrip()) else ""
        raise BadInputError(f"{path} is not JSON (line {exc.lineno}: {exc.msg}){cut}",
                            hint=HINT) from None
    if not isinstance(doc, dict):
        raise BadInputError(f"{path} is JSON but not an aiperf summary object", hint=HINT)
    version = doc.get("schema_version")
    if isinstance(doc.get("records"), dict) and "time_to_first_token" not in doc:
        doc, kind = doc["records"], "profile_export_aiperf.json (aiperf 0.1.x, \"records\")"
    elif "time_to_first_token" not in doc and isinstance(doc.get("metrics"), dict):
        doc, kind = doc["metrics"], "profile_export_aiperf.json (genai-perf style \"metrics\")"
    else:
        made_by = f", aiperf {doc['aiperf_version']}" if doc.get("aiperf_version") else ""
        kind = (f"profile_export_aiperf.json (schema_version {version}{made_by})" if version
                else "profile_export_aiperf.json (unversioned)")
    return _normalise_summary(doc, str(path), kind)


def _distribution(values: np.ndarray) -> dict[str, float]:
    import numpy as np

    arr = np.sort(values)
    n = len(arr)
    total = float(arr.sum())
    pct = np.percentile(arr, PERCENTILES)  # numpy's default method: linear interpolation
    out = {"avg": total / n, "min": float(arr[0]), "max": float(arr[-1]),
           "std": float(np.std(arr)), "count": float(n), "sum": total}
    out.update({f"p{q}": float(v) for q, v in zip(PERCENTILES, pct, strict=True)})
    return out


def summarise_records(source: str | Path) -> AiperfSummary:
    """Recompute a run's aiperf summary from its profile_export.jsonl, as aiperf does.

    Mirrored from aiperf's own code (0.13.0: ``metrics/accumulator.py`` ``_compute_results``
    and ``metrics/metric_dicts.py`` ``metric_result_from_array``; 0.1.1: ``metrics/
    metric_dicts.py`` ``MetricArray.to_result``):

    * records of the profiling phase only (``benchmark_phase`` / ``credit_phase`` != warmup);
    * every metric over the records that carry it: error-free records for all metrics, error
      records only for their ``error_*`` metrics (aiperf's ERROR_ONLY flag), list metrics
      (inter_chunk_latency) flattened;
    * avg = sum / n, min, max, percentiles p1..p99 by linear interpolation (numpy's default,
      aiperf 0.1 calls np.percentile, 0.13 writes the same interpolation out), std = population
      standard deviation (np.std, ddof=0), count, sum;
    * request_count = error-free records, error_request_count = error records;
      benchmark_duration = max(request start + request_latency) - min(request start) over the
      error-free records (MaxResponseTimestampMetric - MinRequestTimestampMetric; 0.1.x
      records carry those two counters themselves; 1.x holds them in float64, so the span is
      taken between the two float64-rounded timestamps, as it does); total_osl / total_isl /
      ... sums;
      request_throughput = request_count / duration, output_token_throughput = total_osl /
      duration.

    aiperf 0.13 divides the two throughputs by its profiling phase's window instead (phase start
    to last response as its controller saw them, kept only in its summary), about 1% longer on
    short runs; the notes say so. Time metrics come out in ms, as ``load_aiperf_summary`` gives
    them.
    """
    import numpy as np

    path = Path(source)
    if path.is_dir():
        path = path / RECORDS_FILE
    if not path.exists():
        raise BadInputError(f"aiperf records not found: {path}", hint=HINT)
    read = _read_records(path, collect=True)
    col = read.collected
    assert col is not None
    frame = read.frame
    prof = frame[(frame["benchmark_phase"] != "warmup").to_numpy()]
    valid = prof[~prof["error"].to_numpy()]
    n_valid, n_error = len(valid), int(prof["error"].sum())
    metrics: dict[str, dict[str, float]] = {}
    valid_metrics, error_metrics, units = col.finish()
    for bucket in (valid_metrics, error_metrics):
        for name, values in bucket.items():
            values = values[~np.isnan(values)]  # aiperf drops NaN before aggregating
            if len(values):
                metrics[name] = _distribution(values)
    metrics["request_count"] = {"avg": float(n_valid)}
    units["request_count"] = "requests"
    if n_error:
        metrics["error_request_count"] = {"avg": float(n_error)}
        units["error_request_count"] = "requests"
    for total, tag in _DERIVED_SUMS.items():
        if tag in metrics:
            metrics[total] = {"avg": metrics[tag]["sum"]}
            units[total] = units.get(tag, "")
    # Run window: aiperf's min request / max response timestamps (ns, wall clock).
    lo = [int(v) for v in col.aggregates.get("min_request_timestamp", ()) if _is_stat_value(v)]
    hi = [int(v) for v in col.aggregates.get("max_response_timestamp", ()) if _is_stat_value(v)]
    if not (lo and hi) and n_valid:
        lat = valid["request_latency_ms"].to_numpy()
        ok = np.isfinite(lat)
        starts = valid["request_start_ns"].to_numpy()
        lo = [int(starts[ok].min())] if ok.any() else None
        hi = ([int((starts[ok] + np.rint(lat[ok] * 1e6).astype(np.int64)).max())]
              if ok.any() else None)
    notes = [f"Aggregates recomputed from {n_valid} error-free records of {path} (no aiperf "
             "summary file in the folder), as aiperf computes them: numpy linear percentiles, "
             "population std" + (f"; {n_error} error records counted, not used" if n_error
                                  else "") + "."]
    if lo and hi:
        t0, t1 = int(min(lo)), int(max(hi))
        metrics["min_request_timestamp"] = {"avg": t0 * 1e-6}
        metrics["max_response_timestamp"] = {"avg": t1 * 1e-6}
        units["min_request_timestamp"] = units["max_response_timestamp"] = "ms"
        # aiperf 0.1 folds these as Python ints; 1.x keeps them in float64 columns
        # (metrics/column_store.py), which rounds each to 256 ns: mirror that too.
        span_ns = (t1 - t0 if read.schema.startswith("aiperf 0.1")
                   else float(np.float64(t1) - np.float64(t0)))
        if span_ns > 0:
            duration_s = span_ns / 1e9
            metrics["benchmark_duration"] = {"avg": duration_s * 1e3}
            units["benchmark_duration"] = "ms"
            metrics["request_throughput"] = {"avg": n_valid / duration_s}
            units["request_throughput"] = "requests/sec"
            if "total_osl" in metrics:
                metrics["output_token_throughput"] = {
                    "avg": metrics["total_osl"]["avg"] / duration_s}
                units["output_token_throughput"] = "tokens/sec"
            if read.schema.startswith("aiperf 1.x"):
                notes.append("Throughputs divide by first request to last response "
                             "(benchmark_duration); aiperf 0.13 divides by its profiling phase "
                             "window, which only its summary holds (about 1% longer on short "
                             "runs).")
    if read.bad:
        notes.append(f"{read.bad} of {read.lines} lines of {path} were not aiperf records and "
                     f"were skipped; first: {read.bad_shown[0]}")
    if not n_valid:
        notes.append(f"{path} holds no error-free records: no latency aggregates.")
    return AiperfSummary(metrics, source=str(path), kind=f"recomputed from {RECORDS_FILE}",
                         units=units, notes=notes, recomputed=True)


def concurrency_of(run_dir: Path, summary_path: Path | None = None) -> int | None:
    """The concurrency of one run folder: c100 / concurrency_100 / its input_config."""
    match = re.search(r"(?:^|[_-])c(?:oncurrency)?[_-]?(\d+)$", run_dir.name)
    if match:
        # c0 or c99999...: no run has that many (or no) requests in flight.
        n = int(match.group(1))
        return n if 0 < n <= MAX_CONCURRENCY else None
    if summary_path and summary_path.suffix == ".json":
        try:
            doc = json.loads(summary_path.read_text())
            cfg = doc.get("input_config") or {}
            # schema 1.x keeps it per phase; 0.1.x under loadgen.
            for phase in cfg.get("phases") or ():
                if phase.get("kind", "profiling") == "profiling" and phase.get("concurrency"):
                    return _concurrency(phase["concurrency"])
            loadgen = cfg.get("loadgen") or {}
            if loadgen.get("concurrency"):
                return _concurrency(loadgen["concurrency"])
        except (json.JSONDecodeError, OSError, ValueError, AttributeError, TypeError,
                OverflowError, RecursionError):
            return None
    return None


MAX_CONCURRENCY = 1_000_000


def _concurrency(value: Any) -> int | None:
    """A concurrency from a config: a whole number from 1 to MAX_CONCURRENCY, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not (math.isfinite(value) and value == int(value) and 0 < value <= MAX_CONCURRENCY):
        return None
    return int(value)
