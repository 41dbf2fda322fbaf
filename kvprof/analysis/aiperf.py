"""Load aiperf exports (per-request records and aggregate JSON/CSV) with times in ms.

Record table schema: x_request_id (str), request_start_ns (int64, client clock),
ttft_ms, itl_ms, request_latency_ms, isl, osl (float64), source (str).

Summary (``load_aiperf_summary``): {metric: {stat: value}} with metric names of aiperf's
schema 1.x (time_to_first_token, inter_token_latency, request_latency,
output_token_throughput, ...), stats avg/p50/p90/p99/..., time metrics in ms.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvprof.errors import BadInputError

if TYPE_CHECKING:
    import pandas as pd

RECORDS_FILE = "profile_export.jsonl"
SUMMARY_JSON = "profile_export_aiperf.json"
SUMMARY_CSV = "profile_export_aiperf.csv"

# aiperf 0.x records/summaries used short keys; 1.x (schema_version 1.x) the long ones.
METRIC_ALIASES = {
    "time_to_first_token": ("time_to_first_token", "ttft"),
    "inter_token_latency": ("inter_token_latency", "itl"),
    "request_latency": ("request_latency", "latency", "e2e_latency"),
    "output_token_throughput": ("output_token_throughput", "output_throughput"),
    "request_throughput": ("request_throughput",),
    "output_sequence_length": ("output_sequence_length", "osl"),
    "input_sequence_length": ("input_sequence_length", "isl"),
}
_UNIT_TO_MS = {"ns": 1e-6, "us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3, "sec": 1e3,
               "seconds": 1e3}
HINT = ("Pass an aiperf --output-artifact-dir holding profile_export.jsonl and/or "
        "profile_export_aiperf.json (aiperf 0.x `ttft`/`itl` keys or 1.x `time_to_first_token`).")


def _to_ms(value: Any, unit: str | None, key: str) -> float:
    v = float(value)
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


def _metric(metrics: dict, name: str, found: dict[str, str] | None = None) -> float:
    """A record's metric value in ms (time) or its own unit, by any known alias.

    ``found`` remembers which key matched per metric: one file's records share their schema,
    so the alias search runs once per file rather than once per record.
    """
    key = found.get(name) if found is not None else None
    if key is None or key not in metrics:
        key = next((k for alias in METRIC_ALIASES.get(name, (name,))
                    for k in (alias, alias + "_ms", alias + "_ns") if k in metrics), None)
        if key is None:
            return math.nan
        if found is not None:
            found[name] = key
    m = metrics[key]
    if isinstance(m, dict):
        if isinstance(m.get("value"), list):
            return math.nan
        return _to_ms(m.get("value", math.nan), m.get("unit"), key)
    return _to_ms(m, None, key)


def _json_loads():
    """orjson's loads (several times faster on 100k-record exports), else the stdlib's."""
    try:
        import orjson
    except ImportError:  # pragma: no cover - orjson is a dependency; stay usable without it
        return json.loads
    return orjson.loads


def _is_record(doc: Any) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("metrics"), dict)


def load_aiperf_records(source: str | Path) -> pd.DataFrame:
    """Per-request records of profile_export.jsonl (a file or the artifact directory)."""
    import numpy as np
    import pandas as pd

    path = Path(source)
    if path.is_dir():
        found = sorted(path.rglob(RECORDS_FILE))
        if not found:
            raise BadInputError(f"no {RECORDS_FILE} under {path}", hint=HINT)
        if len(found) > 1:  # an artifact tree, one folder per concurrency: every run counts
            return pd.concat([load_aiperf_records(f) for f in found], ignore_index=True)
        path = found[0]
    if not path.exists():
        raise BadInputError(f"aiperf path not found: {path}", hint=HINT)
    # Column-wise: one tuple per record, no per-record dict for pandas to take apart.
    rows: list[tuple] = []
    seen: dict[str, str] = {}
    loads = _json_loads()
    with path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                doc = loads(line)
            except ValueError:
                try:  # orjson refuses what the stdlib takes (NaN, huge ints): ask it too
                    doc = json.loads(line)
                except json.JSONDecodeError:
                    raise BadInputError(f"{path} line {lineno} is not JSON",
                                        hint=HINT) from None
            if not _is_record(doc):
                raise BadInputError(f"{path} line {lineno} is not an aiperf record "
                                    "(no \"metrics\" object)", hint=HINT)
            meta = doc.get("metadata") or {}
            metrics = doc["metrics"]
            ttft = _metric(metrics, "time_to_first_token", seen)
            if math.isnan(ttft) and "error" not in doc:
                keys = ", ".join(list(metrics)[:8])
                raise BadInputError(
                    f"{path} line {lineno}: unknown aiperf record schema (metrics: {keys})",
                    hint="Expected time_to_first_token (aiperf 1.x) or ttft (0.x). " + HINT)
            rows.append((
                str(meta.get("x_request_id") or meta.get("request_id") or ""),
                int(meta.get("request_start_ns") or meta.get("timestamp_ns") or 0),
                ttft,
                _metric(metrics, "inter_token_latency", seen),
                _metric(metrics, "request_latency", seen),
                _metric(metrics, "input_sequence_length", seen),
                _metric(metrics, "output_sequence_length", seen),
            ))
    if not rows:
        raise BadInputError(f"{path} holds no aiperf records", hint=HINT)
    columns = list(zip(*rows, strict=True))
    frame = pd.DataFrame({
        "x_request_id": pd.Series(columns[0], dtype="str"),
        "request_start_ns": np.asarray(columns[1], dtype=np.int64),
        **{name: np.asarray(columns[i], dtype=np.float64) for i, name in enumerate(
            ("ttft_ms", "itl_ms", "request_latency_ms", "isl", "osl"), start=2)},
    })
    frame["source"] = str(path)
    return frame


def _normalise_summary(doc: dict, where: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, aliases in METRIC_ALIASES.items():
        for alias in aliases:
            m = doc.get(alias)
            if isinstance(m, dict):
                unit = m.get("unit")
                timed = unit is not None and unit.strip().lower() in _UNIT_TO_MS
                out[name] = {
                    ("avg" if k == "mean" else k): (_to_ms(v, unit, alias) if timed else float(v))
                    for k, v in m.items()
                    if k != "unit" and isinstance(v, (int, float)) and not isinstance(v, bool)
                }
                break
    if "time_to_first_token" not in out and "request_latency" not in out:
        keys = ", ".join(list(doc)[:8])
        raise BadInputError(f"{where}: unknown aiperf summary schema (keys: {keys})",
                            hint="Expected time_to_first_token/ttft and request_latency. " + HINT)
    return out


def _csv_key(label: str) -> tuple[str, str | None]:
    match = re.match(r"^(.*?)\s*\(([^)]*)\)\s*$", label)
    name, unit = (match.group(1), match.group(2)) if match else (label, None)
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_"), unit


def _summary_from_csv(path: Path) -> dict[str, dict[str, float]]:
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
            stats: dict[str, Any] = {"unit": unit} if unit else {}
            for col, cell in zip(header[1:], row[1:], strict=False):
                try:
                    stats["avg" if col == "Value" else col] = float(cell)
                except ValueError:
                    continue
            doc[key] = stats
    return _normalise_summary(doc, str(path))


def load_aiperf_summary(source: str | Path) -> dict[str, dict[str, float]]:
    """The aggregate metrics of one aiperf run (profile_export_aiperf.json, else .csv)."""
    path = Path(source)
    if path.is_dir():
        if (path / SUMMARY_JSON).exists():
            path = path / SUMMARY_JSON
        elif (path / SUMMARY_CSV).exists():
            path = path / SUMMARY_CSV
        else:
            raise BadInputError(f"no {SUMMARY_JSON} or {SUMMARY_CSV} in {path}", hint=HINT)
    if not path.exists():
        raise BadInputError(f"aiperf summary not found: {path}", hint=HINT)
    if path.suffix == ".csv":
        return _summary_from_csv(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{path} is not JSON (line {exc.lineno}: {exc.msg})",
                            hint=HINT) from None
    if not isinstance(doc, dict):
        raise BadInputError(f"{path} is JSON but not an aiperf summary object", hint=HINT)
    # genai-perf-style exports nest the metrics one level down.
    if "time_to_first_token" not in doc and isinstance(doc.get("metrics"), dict):
        doc = doc["metrics"]
    return _normalise_summary(doc, str(path))


def concurrency_of(run_dir: Path, summary_path: Path | None = None) -> int | None:
    """The concurrency of one run folder: c100 / concurrency_100 / its input_config."""
    match = re.search(r"(?:^|[_-])?c(?:oncurrency)?[_-]?(\d+)$", run_dir.name)
    if match:
        return int(match.group(1))
    if summary_path and summary_path.suffix == ".json":
        try:
            doc = json.loads(summary_path.read_text())
            cfg = doc.get("input_config") or {}
            # schema 1.x keeps it per phase; older releases under loadgen.
            for phase in cfg.get("phases") or ():
                if phase.get("kind", "profiling") == "profiling" and phase.get("concurrency"):
                    return int(phase["concurrency"])
            loadgen = cfg.get("loadgen") or {}
            if loadgen.get("concurrency"):
                return int(loadgen["concurrency"])
        except (json.JSONDecodeError, OSError, ValueError, AttributeError):
            return None
    return None
