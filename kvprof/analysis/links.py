"""Link utilisation per KV transfer window, from the collectors' cumulative byte counters.

Transfer table schema (``transfer_links``): key, pair, kv_path (what the span says), path
(what the counters saw carry it: nvlink | infiniband | tcp | none), node, entity, metric,
kv_bytes, transfer_ms, achieved_gbps (kv.bytes / transfer time), link_bytes (bytes the busiest
link moved in the window), link_gbps, link_rate_gbps (the port's rate; nominal when the
collectors gave none, flagged in rate_source), pct_of_link_rate, path_mismatch.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from kvprof import semconv as sc
from kvprof.model import NOMINAL_LINKS

if TYPE_CHECKING:
    import pandas as pd

    from kvprof.analysis.breakdown import RequestBreakdown

# Counters that carry bytes, the side of a transfer that sees them, and the path they mean.
LINK_COUNTERS: dict[str, tuple[str, str]] = {
    sc.METRIC_NVLINK_TX: ("tx", "nvlink"),
    sc.METRIC_NVLINK_RX: ("rx", "nvlink"),
    sc.METRIC_IB_XMIT: ("tx", "infiniband"),
    sc.METRIC_IB_RCV: ("rx", "infiniband"),
    sc.METRIC_NIC_TX: ("tx", "tcp"),
    sc.METRIC_NIC_RX: ("rx", "tcp"),
}
# Nominal rates used only when no collector reported one (labelled "nominal" in the report).
NOMINAL_RATE = {
    "nvlink": NOMINAL_LINKS["nvlink-h100/h200 (450 GB/s)"],
    "infiniband": NOMINAL_LINKS["ib-ndr-400 (50 GB/s)"],
    "tcp": NOMINAL_LINKS["tcp-100gbe (12.5 GB/s)"],
    "pcie": NOMINAL_LINKS["pcie-gen5-x16 (63 GB/s)"],
}
_NIC_SPEED_LABELS = ("speed_bytes_per_second", "rate_bytes_per_second")


def _counter_series(samples: pd.DataFrame, offsets_ns: dict[str, float]):
    """Yield (node, entity, metric, times on the reference clock, cumulative values)."""
    counters = samples[samples["metric"].astype(str).isin(LINK_COUNTERS)]
    for (node, entity, metric), grp in counters.groupby(
            [counters["node"].astype(str), counters["entity"].astype(str),
             counters["metric"].astype(str)], sort=True):
        grp = grp.sort_values("ts")
        ts = grp["ts"].to_numpy(dtype=float) + offsets_ns.get(node, 0.0) / 1e9
        yield node, entity, metric, ts, grp["value"].to_numpy(dtype=float)


def _rates(samples: pd.DataFrame) -> dict[tuple[str, str], float]:
    """Each port's rate in bytes/s: the IB rate metric, or a NIC speed label."""
    out: dict[tuple[str, str], float] = {}
    rate = samples[samples["metric"].astype(str) == sc.METRIC_IB_RATE]
    for (node, entity), grp in rate.groupby([rate["node"].astype(str),
                                             rate["entity"].astype(str)]):
        out[(node, entity)] = float(grp["value"].iloc[-1])
    nic = samples[samples["metric"].astype(str).isin((sc.METRIC_NIC_TX, sc.METRIC_NIC_RX))]
    for (node, entity), labels in nic.groupby([nic["node"].astype(str),
                                               nic["entity"].astype(str)])["labels"].last().items():
        try:
            parsed = json.loads(labels)
        except (json.JSONDecodeError, TypeError):
            continue
        for key in _NIC_SPEED_LABELS:
            if isinstance(parsed, dict) and parsed.get(key):
                out[(node, entity)] = float(parsed[key])
    return out


def transfer_links(breakdown: RequestBreakdown, spans: pd.DataFrame,
                   samples: pd.DataFrame) -> pd.DataFrame:
    """Per transfer: which link carried it and how fast, from counter deltas in its window."""
    import numpy as np
    import pandas as pd

    req = breakdown.requests
    off = breakdown.skew.offsets_ns
    xfer = spans[spans["name"].astype(str) == sc.SPAN_KV_TRANSFER]
    if xfer.empty or samples is None or samples.empty:
        return pd.DataFrame()
    from kvprof.analysis.breakdown import span_request_keys

    all_kv = spans[spans["name"].astype(str).isin(sc.ALL_SPANS)]
    keys = span_request_keys(all_kv)
    win = pd.DataFrame({"key": keys.loc[xfer.index].to_numpy(),
                        "clock": xfer["clock"].astype(str).to_numpy(),
                        "start": xfer["start_ns"].to_numpy(), "end": xfer["end_ns"].to_numpy()})
    win = win.groupby("key", sort=False).agg(clock=("clock", "first"), start=("start", "min"),
                                             end=("end", "max"))
    shift = win["clock"].map(off).fillna(0.0)
    t0 = ((win["start"] + shift) / 1e9).to_numpy(dtype=float)
    t1 = ((win["end"] + shift) / 1e9).to_numpy(dtype=float)
    info = req.set_index("key").reindex(win.index)
    p_node = info["prefill_node"].astype(object).fillna(info["prefill_clock"]).astype(str)
    d_node = info["decode_node"].astype(object).fillna(info["decode_clock"]).astype(str)
    best_bytes = np.zeros(len(win))
    best = np.full(len(win), None, dtype=object)
    for node, entity, metric, ts, values in _counter_series(samples, off):
        side, path = LINK_COUNTERS[metric]
        # tx counters on the prefill node, rx counters on the decode node see the transfer.
        relevant = (p_node == node).to_numpy() if side == "tx" else (d_node == node).to_numpy()
        if not relevant.any() or len(ts) < 2:
            continue
        moved = np.interp(t1, ts, values) - np.interp(t0, ts, values)
        # Windows outside the sampled span have no data, not zero bytes.
        covered = (t0 >= ts[0]) & (t1 <= ts[-1]) & relevant
        better = covered & (moved > best_bytes)
        best_bytes = np.where(better, moved, best_bytes)
        for i in np.flatnonzero(better):
            best[i] = (node, entity, metric, path)
    rates = _rates(samples)
    rows = []
    for i, key in enumerate(win.index):
        r = info.loc[key]
        ms = (t1[i] - t0[i]) * 1e3
        kv_bytes = float(r["kv_bytes"]) if pd.notna(r["kv_bytes"]) else float("nan")
        node, entity, metric, path = best[i] if best[i] else (None, None, None, "none")
        rate = rates.get((node, entity)) if node else None
        rate_source = "collector" if rate else ("nominal" if path in NOMINAL_RATE else None)
        if rate is None and path in NOMINAL_RATE:
            rate = NOMINAL_RATE[path]
        link_gbps = best_bytes[i] / (ms / 1e3) / 1e9 if best[i] and ms > 0 else float("nan")
        span_path = r["kv_path"] if isinstance(r["kv_path"], str) else None
        rows.append({
            "key": key, "pair": r["pair"], "kv_path": span_path, "path": path, "node": node,
            "entity": entity, "metric": metric, "kv_bytes": kv_bytes, "transfer_ms": ms,
            "achieved_gbps": kv_bytes / (ms / 1e3) / 1e9 if ms > 0 else float("nan"),
            "link_bytes": float(best_bytes[i]) if best[i] else float("nan"),
            "link_gbps": link_gbps,
            "link_rate_gbps": rate / 1e9 if rate else float("nan"),
            "rate_source": rate_source,
            "pct_of_link_rate": (100.0 * link_gbps / (rate / 1e9)) if rate and best[i]
            else float("nan"),
            "path_mismatch": bool(span_path and best[i] and span_path != path),
        })
    return pd.DataFrame(rows)


def link_timeline(samples: pd.DataFrame, offsets_ns: dict[str, float],
                  max_points: int = 2000) -> pd.DataFrame:
    """Byte rate (GB/s) over time per link counter: node, entity, metric, ts, gbps."""
    import numpy as np
    import pandas as pd

    parts = []
    for node, entity, metric, ts, values in _counter_series(samples, offsets_ns):
        if len(ts) < 2:
            continue
        dt = np.diff(ts)
        rate = np.where(dt > 0, np.diff(values) / np.where(dt > 0, dt, 1), 0.0) / 1e9
        mid = ts[1:]
        if len(mid) > max_points:  # keep plots light: every n-th point
            step = len(mid) // max_points + 1
            mid, rate = mid[::step], rate[::step]
        if not np.any(rate > 0):
            continue
        parts.append(pd.DataFrame({"node": node, "entity": entity, "metric": metric,
                                   "ts": mid, "gbps": rate}))
    if not parts:
        return pd.DataFrame(columns=["node", "entity", "metric", "ts", "gbps"])
    return pd.concat(parts, ignore_index=True)
