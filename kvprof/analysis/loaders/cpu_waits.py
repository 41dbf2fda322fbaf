"""CPU waits per watched process and sampling interval, from the schedstat collector's samples.

One row per process and interval between two consecutive samples of that process:

=====================  ========  ==============================================================
column                 dtype     meaning
=====================  ========  ==============================================================
time_ns                int64     end of the interval (the later sample), wall clock of the node
interval_ns            int64     length of the interval
node                   str       node that sampled it
pid                    int64     process id (in the collector's pid namespace)
process                str       the service name under kvprof attach, else the process name
comm                   str       the kernel's process name
service                str       KVPROF_SERVICE_NAME under kvprof attach ('' otherwise)
role                   str       prefill / decode / auto / client / ... (the collector's label)
runqueue_wait_ms       float64   run-queue wait of all its threads in the interval (summed)
cpu_ms                 float64   CPU time of all its threads in the interval
nonvoluntary_switches  float64   involuntary context switches in the interval
top_thread             str       the thread that waited most in the interval ('' unknown)
top_thread_wait_ms     float64   that thread's run-queue wait (NaN when not sampled)
=====================  ========  ==============================================================
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from kvprof import semconv as sc

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ("time_ns", "interval_ns", "node", "pid", "process", "comm", "service", "role",
           "runqueue_wait_ms", "cpu_ms", "nonvoluntary_switches", "top_thread",
           "top_thread_wait_ms")
_COUNTERS = {sc.METRIC_PROCESS_RUNQUEUE_WAIT: ("runqueue_wait_ms", 1e3),
             sc.METRIC_PROCESS_CPU: ("cpu_ms", 1e3),
             sc.METRIC_PROCESS_NONVOLUNTARY_SWITCHES: ("nonvoluntary_switches", 1.0)}
_METRICS = (*_COUNTERS, sc.METRIC_PROCESS_THREAD_WAIT_MAX)


def empty() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})


def cpu_waits_from_samples(samples: pd.DataFrame) -> pd.DataFrame:
    """The per-interval CPU waits in a samples frame (kvprof.analysis.loaders.samples)."""
    import numpy as np
    import pandas as pd

    if samples is None or not len(samples):
        return empty()
    rows = samples[samples["metric"].astype(str).isin(_METRICS)
                   & samples["value"].notna()]
    if not len(rows):
        return empty()
    labels = [json.loads(x) if isinstance(x, str) else dict(x) for x in rows["labels"]]
    wide = pd.DataFrame({
        "ts": rows["ts"].to_numpy(dtype=float),
        "node": rows["node"].astype(str).to_numpy(),
        "metric": rows["metric"].astype(str).to_numpy(),
        "value": rows["value"].to_numpy(dtype=float),
        "pid": [int(lb.get("pid", -1)) for lb in labels],
        "comm": [lb.get("process", "") for lb in labels],
        "service": [lb.get("service", "") for lb in labels],
        "role": [lb.get("role", "") for lb in labels],
        "thread": [lb.get("thread", "") for lb in labels],
    })
    ident = ["node", "pid", "ts"]
    counters = wide[wide["metric"].isin(list(_COUNTERS))].pivot_table(
        index=ident, columns="metric", values="value", aggfunc="last")
    if not len(counters):
        return empty()
    info = wide.drop_duplicates(["node", "pid", "ts"]).set_index(ident)[
        ["comm", "service", "role"]]
    top = wide[wide["metric"] == sc.METRIC_PROCESS_THREAD_WAIT_MAX].drop_duplicates(
        ident, keep="last").set_index(ident)[["value", "thread"]]
    frame = counters.join(info).join(top).reset_index().sort_values(["node", "pid", "ts"])
    out = []
    for (node, pid), grp in frame.groupby(["node", "pid"], sort=False):
        if len(grp) < 2:
            continue
        ts = grp["ts"].to_numpy()
        part = pd.DataFrame({
            "time_ns": (ts[1:] * 1e9).astype(np.int64),
            "interval_ns": (np.diff(ts) * 1e9).astype(np.int64),
            "node": node, "pid": int(pid),
            "process": [s or c for s, c in zip(grp["service"].iloc[1:], grp["comm"].iloc[1:],
                                                strict=True)],
            "comm": grp["comm"].iloc[1:].to_numpy(),
            "service": grp["service"].iloc[1:].fillna("").to_numpy(),
            "role": grp["role"].iloc[1:].to_numpy()})
        for metric, (col, scale) in _COUNTERS.items():
            values = grp[metric].to_numpy(dtype=float) if metric in grp else np.full(
                len(grp), np.nan)
            # A counter that went down means the collector restarted: no interval there.
            part[col] = np.where(np.diff(values) >= 0, np.diff(values), np.nan) * scale
        part["top_thread"] = grp["thread"].iloc[1:].fillna("").to_numpy()
        part["top_thread_wait_ms"] = grp["value"].iloc[1:].to_numpy(dtype=float) * 1e3
        out.append(part)
    if not out:
        return empty()
    return pd.concat(out, ignore_index=True)[list(COLUMNS)]


def load_cpu_waits(samples_dir: str | Path) -> pd.DataFrame:
    """The CPU waits the collector sampled under ``samples_dir`` (``--output`` of collect)."""
    from kvprof.analysis.loaders.samples import load_samples

    return cpu_waits_from_samples(load_samples(samples_dir).samples)
