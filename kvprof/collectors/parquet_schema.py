"""The stable Parquet schema of collector samples, and a small loader for it.

Files
    ``<output>/kvprof-samples-<node>-<YYYYmmddTHHMMSSZ>.parquet``, one per ``--rotate`` window
    (60 s by default, windows aligned to multiples of the rotation period, UTC start time in
    the name). A file is written as ``<name>.parquet.tmp`` and renamed when complete, so every
    ``*.parquet`` file is whole; ignore ``*.tmp``.

Columns (long format: one row per value)
    ==========  =========================  ====================================================
    column      Arrow type                 meaning
    ==========  =========================  ====================================================
    ts          timestamp[ns, tz=UTC]      when the sampler read the value (wall clock)
    node        string                     Kubernetes node name (``NODE_NAME``) or hostname
    collector   string                     nvml, gpu_processes, nvlink, nvlink_state,
                                           infiniband, infiniband_state, nic, host,
                                           placement
    entity      string                     what was measured: ``gpu0``, ``gpu0/link3``,
                                           ``mlx5_0/1`` (device/port), ``eth0``, ``host``,
                                           a GPU UUID (placement), ``0000:01:00.0`` (topology),
                                           ``*`` (the whole collector)
    metric      string                     a Prometheus metric name from kvprof/semconv.py,
                                           WITHOUT ``_total`` (e.g. ``kvprof_ib_port_xmit_bytes``)
    value       double, nullable           the value in the unit the name ends with (``_bytes``,
                                           ``_watts``, ``_joules``, ``_celsius``, ``_ratio`` 0..1,
                                           ``_seconds``, ``_bytes_per_second``); counters are raw
                                           running totals (diff them; a decrease = reset/wrap);
                                           ``*_info`` rows are 1. NULL = no data (see labels.reason)
    labels      string                     a JSON object of string labels, keys sorted, e.g.
                                           ``{"device":"mlx5_0","port":"1"}``; no-data rows carry
                                           ``{"reason": "..."}``
    ==========  =========================  ====================================================

Rows with special meaning
    * ``metric = kvprof_collector_duration_seconds`` / ``kvprof_collector_success``: one per
      collector per sample (entity ``*``).
    * ``value IS NULL``: an explicit "no data"; ``metric`` is the affected metric or ``*``
      (all of the entity's metrics), ``labels.reason`` says why (e.g. NVML library absent).
    * ``collector = placement`` rows (``kvprof_placement_info`` with labels pod, namespace,
      node, gpu_uuid, role, container, pod_uid, source, pid; ``kvprof_gpu_topology_info`` with
      pci_bus_id, gpu_uuid, numa_node, closest_ib, ib_affinity) are written at start, at the
      start of every file, and whenever placement changes: a placement holds from its ``ts``
      until the next placement ``ts`` for that node.

Units: NVLink bytes are NVML KiB x 1024; InfiniBand data bytes are sysfs 4-octet words x 4.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvprof.errors import BadInputError

SCHEMA_VERSION = "1"
FILE_PREFIX = "kvprof-samples-"
FILE_SUFFIX = ".parquet"
TEMP_SUFFIX = ".tmp"
COLUMNS = ("ts", "node", "collector", "entity", "metric", "value", "labels")


def arrow_schema() -> Any:
    """The pyarrow schema every sample file has (pyarrow imported on demand)."""
    import pyarrow as pa

    # Plain strings in Arrow; Parquet dictionary-encodes the pages itself. (Arrow-side
    # dictionary encoding cost 6x more CPU per flush: bench/collector_cost.py.)
    dict_str = pa.string()
    return pa.schema(
        [
            pa.field("ts", pa.timestamp("ns", tz="UTC"), nullable=False),
            pa.field("node", dict_str, nullable=False),
            pa.field("collector", dict_str, nullable=False),
            pa.field("entity", dict_str, nullable=False),
            pa.field("metric", dict_str, nullable=False),
            pa.field("value", pa.float64(), nullable=True),
            pa.field("labels", dict_str, nullable=False),
        ],
        metadata={"kvprof.schema": "collector-samples", "kvprof.schema_version": SCHEMA_VERSION},
    )


def sample_files(path: Path | str) -> list[Path]:
    """The complete sample files at ``path`` (a file, or a directory searched recursively)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise BadInputError(f"no such file or directory: {p}",
                            hint="pass the --output directory of 'kvprof collect'")
    return sorted(f for f in p.rglob(f"*{FILE_SUFFIX}") if f.is_file())


def read_samples(path: Path | str, *, parse_labels: bool = True) -> Any:
    """Load sample files into one pandas DataFrame with the documented columns.

    ``labels`` becomes a dict per row when ``parse_labels`` (else the JSON text). String
    columns are plain strings (not categoricals). Raises BadInputError for a file that is
    not a kvprof sample file (truncated, garbage, other schema).
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    frames = []
    for file in sample_files(path):
        try:
            table = pq.read_table(file)
        except (pa.ArrowInvalid, OSError) as err:
            raise BadInputError(
                f"cannot read Parquet file {file}: {err}",
                hint="the file is truncated or not Parquet; files still being written end "
                "in .tmp and are skipped",
            ) from err
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise BadInputError(f"{file} is not a kvprof sample file (missing {missing})",
                                hint="expected columns: " + ", ".join(COLUMNS))
        frame = table.select(list(COLUMNS)).to_pandas()
        for col in ("node", "collector", "entity", "metric", "labels"):
            frame[col] = frame[col].astype(str)
        frames.append(frame)
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in COLUMNS})
    out = pd.concat(frames, ignore_index=True)
    if parse_labels:
        cache: dict[str, dict[str, str]] = {}
        parsed = []
        for text in out["labels"]:
            labels = cache.get(text)
            if labels is None:
                labels = cache[text] = json.loads(text)
            parsed.append(labels)
        out["labels"] = parsed
    return out
