"""Load the collectors' Parquet samples (long format) of a directory into one DataFrame.

Sample table schema (one row per sample):

==========  ========  ===================================================================
column      dtype     meaning
==========  ========  ===================================================================
ts          float64   seconds since the epoch, on the sampling node's clock
node        category  node that took the sample
collector   category  nvml | nvlink | infiniband | host | placement | ...
entity      category  "gpu0", "mlx5_0/1", "eth0", "gpu0/link3", a pod for placement
metric      category  semconv metric name without _total; counters are cumulative
value       float64
labels      object    JSON object text (placement rows: pod, namespace, node, gpu_uuid, role)
==========  ========  ===================================================================
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kvprof.errors import BadInputError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

SAMPLE_COLUMNS = ("ts", "node", "collector", "entity", "metric", "value", "labels")
_CATEGORIES = ("node", "collector", "entity", "metric")


@dataclass
class SampleLoad:
    """The samples read, the files they came from and the files skipped (with why)."""

    samples: pd.DataFrame
    files: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def sample_files(path: Path) -> list[Path]:
    """Parquet files of a directory, leaving out the ones still being written (temp names)."""
    return sorted(
        p for p in path.rglob("*.parquet")
        if p.is_file() and not p.name.startswith(".") and ".tmp" not in p.name
    )


def _read_one(path: Path) -> pd.DataFrame:
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise ValueError(
            f"not a readable Parquet file ({str(exc).splitlines()[0][:120]})") from None
    missing = [c for c in SAMPLE_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"missing columns {', '.join(missing)}; expected "
                         + ", ".join(SAMPLE_COLUMNS))
    wrong = [f"{c} is {table.schema.field(c).type}, expected {_EXPECTED[c][0]}"
             for c in SAMPLE_COLUMNS if not _EXPECTED[c][1](table.schema.field(c).type)]
    if wrong:
        raise ValueError("wrong column type: " + "; ".join(wrong))
    df = table.select(list(SAMPLE_COLUMNS)).to_pandas()
    if pd.api.types.is_datetime64_any_dtype(df["ts"]):
        ts = df["ts"]
        if ts.dt.tz is None:
            ts = ts.dt.tz_localize("UTC")
        df["ts"] = (ts - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    df["ts"] = pd.to_numeric(df["ts"], errors="coerce").astype("float64")
    df["value"] = pd.to_numeric(df["value"], errors="coerce").astype("float64")
    df["labels"] = df["labels"].fillna("{}").astype(str)
    bad = ~np.isfinite(df["ts"]) | np.isinf(df["value"])
    if bad.any():
        log.warning("%s: left out %d sample row(s) with a timestamp that is not a number or an "
                    "infinite value", path, int(bad.sum()))
        df = df[~bad]
    return df


def _is_text(t) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def _is_number(t) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _is_time(t) -> bool:
    import pyarrow as pa

    return pa.types.is_timestamp(t) or _is_number(t)


# What each column of the collectors' Parquet must hold (kvprof/collectors/parquet_schema.py).
_EXPECTED = {"ts": ("a timestamp or seconds", _is_time), "node": ("text", _is_text),
             "collector": ("text", _is_text), "entity": ("text", _is_text),
             "metric": ("text", _is_text), "value": ("a number", _is_number),
             "labels": ("JSON text", _is_text)}


def load_samples(source: str | Path) -> SampleLoad:
    """Every readable sample under a directory (or one file); unreadable files are listed."""
    import pandas as pd

    from kvprof.inputs import path_problem

    path = Path(source)
    why = path_problem(path, "any")
    if why == "not found":
        raise BadInputError(f"samples path not found: {path}",
                            hint="Pass the collectors' --output directory of *.parquet files.")
    if why:
        raise BadInputError(f"samples path {path}: {why}",
                            hint="Pass the collectors' --output directory of *.parquet files.")
    paths = sample_files(path) if path.is_dir() else [path]
    if not paths:
        raise BadInputError(f"no *.parquet files in {path}",
                            hint="Run `kvprof collect --output DIR` on each GPU node.")
    frames, files, skipped = [], [], []
    for p in paths:
        try:
            frames.append(_read_one(p))
            files.append(str(p))
        except ValueError as exc:
            skipped.append((str(p), str(exc)))
            log.warning("skipped %s: %s", p, exc)
    if not frames:
        detail = "; ".join(f"{Path(f).name}: {why}" for f, why in skipped[:3])
        raise BadInputError(f"no samples could be read from {path} ({detail})",
                            hint="Expected Parquet with columns " + ", ".join(SAMPLE_COLUMNS))
    df = pd.concat(frames, ignore_index=True)
    for col in _CATEGORIES:
        df[col] = df[col].astype("category")
    return SampleLoad(samples=df.sort_values("ts", kind="stable").reset_index(drop=True),
                      files=files, skipped=skipped)


def placement_records(samples: pd.DataFrame) -> pd.DataFrame:
    """The collectors' placement rows as pod, namespace, node, gpu_uuid, role, numa columns."""
    import pandas as pd

    rows = samples[samples["collector"].astype(str) == "placement"]
    out = []
    for labels_text, node in zip(rows["labels"], rows["node"].astype(str), strict=True):
        try:
            labels = json.loads(labels_text)
        except json.JSONDecodeError:
            continue
        if isinstance(labels, dict) and labels.get("pod"):
            out.append({"pod": labels.get("pod"), "namespace": labels.get("namespace", ""),
                        "node": labels.get("node") or node,
                        "gpu_uuid": labels.get("gpu_uuid", ""), "role": labels.get("role", ""),
                        "numa": str(labels.get("numa_node", labels.get("numa", "")))})
    cols = ["pod", "namespace", "node", "gpu_uuid", "role", "numa"]
    return pd.DataFrame(out, columns=cols).drop_duplicates().reset_index(drop=True)
