"""Microbench results: per-step statistics, the sweep's least-squares fit, and the JSON file.

JSON schema ``kvprof.microbench/1`` (``kvprof microbench --json PATH``; kvprof.analysis reads it).
Times are milliseconds, rates GB/s (1e9 bytes/s), sizes bytes::

    {
      "schema": "kvprof.microbench/1",
      "geometry": {...},            # kvprof.model.KvGeometry.to_dict(prefill_tp, decode_tp)
      "transport": "copy" | "gloo" | "nccl" | "nixl",
      "transport_reason": str,      # why auto picked it ("requested" when named)
      "device": "cpu" | "cuda:0",
      "iters": int, "warmup": int,
      "bytes_moved": int,           # bytes one run moves, all decode ranks together
      "descriptors": int,           # (layer, K|V, block, head slice) descriptors of one run
      "descriptor_bytes": int,
      "steps": {                    # setup, gather, wire, scatter, per_descriptor, total
        NAME: {
          "median_ms": float, "p10_ms": float, "p90_ms": float,
          "samples": int,           # timed runs behind the numbers (setup: 1, first contact)
          "bytes": int,             # 0 for setup
          "gbps": float | null,     # bytes / median
          "limit_gbps": float | null,   # raw contiguous copy of the same bytes, same run
          "pct_of_limit": float | null,
          "scaled": null | {"descriptors_timed", "descriptors_total", "scale_factor"},
          "method": str,            # wire and per_descriptor only: how the bytes moved
          "parts_ms": {...}         # setup only: what the first contact consisted of
        }
      },
      "limit": {"median_ms", "p10_ms", "p90_ms", "gbps", "path"},
      "links": {"tokens": 4000, "bytes": int, "seed_overhead_ms": 1153.0,
                "rows": [{"link": str, "gbps": float, "ms": float, "pct_of_seed": float}],
                "measured": {"transport": str, "gbps": float, "ms": float} | null},
      "environment": {"torch", "python", "kvprof", "platform", "hostname", "cpu_count",
                      "torch_threads", "device", "device_name", "transport", "timestamp",
                      "nixl" (version or null)},
      "sweep": null | {"points": [{"tokens", "bytes", "total_ms", "wire_ms",
                                   "per_descriptor_ms", "gbps"}],
                       "fit": {"fixed_ms", "ms_per_mb", "r2"} | null},
      "error": str                  # only when a run failed: the rest is what was measured
    }
"""

from __future__ import annotations

import json
import os
import platform
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from kvprof.model import NOMINAL_LINKS, link_cost_ms, resolve_geometry

SCHEMA = "kvprof.microbench/1"
STEP_ORDER = ("setup", "gather", "wire", "scatter", "per_descriptor", "total")
# The disaggregation overhead the seed report measured at concurrency 1 (P99 TTFT 1.4 s vs
# 213 ms aggregated) and could not break down: the number this command exists to explain.
SEED_OVERHEAD_MS = 1153.0
SEED_TOKENS = 4000


@dataclass(frozen=True)
class Stats:
    """Median / p10 / p90 of a list of durations."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    samples: int

    @classmethod
    def of_seconds(cls, seconds: list[float]) -> Stats:
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p10, p50, p90 = np.percentile(ms, [10, 50, 90])
        return cls(float(p50), float(p10), float(p90), len(ms))


def gbps(nbytes: int, ms: float) -> float | None:
    """GB/s (1e9 bytes/s) of moving nbytes in ms milliseconds."""
    if nbytes <= 0 or ms <= 0:
        return None
    return nbytes / (ms / 1e3) / 1e9


def step_entry(stats: Stats, nbytes: int, limit_gbps: float | None) -> dict:
    """One step's JSON entry."""
    rate = gbps(nbytes, stats.median_ms)
    pct = rate / limit_gbps * 100 if rate is not None and limit_gbps else None
    return {
        "median_ms": stats.median_ms,
        "p10_ms": stats.p10_ms,
        "p90_ms": stats.p90_ms,
        "samples": stats.samples,
        "bytes": nbytes,
        "gbps": rate,
        "limit_gbps": limit_gbps if nbytes else None,
        "pct_of_limit": pct,
        "scaled": None,
    }


def link_table(geometry_args: dict, measured_gbps: float | None, transport: str) -> dict:
    """What the seed's 4,000-token request of this geometry costs on each nominal link."""
    geometry = resolve_geometry(tokens=SEED_TOKENS, **geometry_args)
    nbytes = geometry.total_bytes
    rows = []
    for link, bps in NOMINAL_LINKS.items():
        ms = link_cost_ms(nbytes, bps)
        rows.append(
            {"link": link, "gbps": bps / 1e9, "ms": ms, "pct_of_seed": ms / SEED_OVERHEAD_MS * 100}
        )
    measured = None
    if measured_gbps:
        ms = link_cost_ms(nbytes, measured_gbps * 1e9)
        measured = {"transport": transport, "gbps": measured_gbps, "ms": ms}
    return {
        "tokens": SEED_TOKENS,
        "bytes": nbytes,
        "seed_overhead_ms": SEED_OVERHEAD_MS,
        "rows": rows,
        "measured": measured,
    }


def fit_growth(points: list[dict]) -> dict | None:
    """Least squares total_ms = fixed_ms + ms_per_mb * MB over the sweep points."""
    mb = np.array([p["bytes"] / 1e6 for p in points], dtype=np.float64)
    ms = np.array([p["total_ms"] for p in points], dtype=np.float64)
    if len(points) < 2 or np.ptp(mb) == 0:
        return None
    slope, intercept = np.polyfit(mb, ms, 1)
    predicted = intercept + slope * mb
    ss_tot = float(np.sum((ms - ms.mean()) ** 2))
    r2 = 1.0 - float(np.sum((ms - predicted) ** 2)) / ss_tot if ss_tot > 0 else 1.0
    return {"fixed_ms": float(intercept), "ms_per_mb": float(slope), "r2": r2}


def environment(device: str, transport: str, threads: int) -> dict:
    """Where the numbers were measured."""
    import torch

    from kvprof import __version__

    if device.startswith("cuda"):
        device_name = torch.cuda.get_device_name(torch.device(device))
    else:
        device_name = _cpu_model() or platform.processor() or platform.machine()
    nixl_version = None
    try:
        from importlib.metadata import version

        nixl_version = version("nixl")
    except Exception:  # not installed: recorded as null
        nixl_version = None
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "kvprof": __version__,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "device": device,
        "device_name": device_name,
        "transport": transport,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "nixl": nixl_version,
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def write_json(path: str | Path, result: dict) -> None:
    """Write atomically (temp file + rename) so a reader never sees half a file."""
    from kvprof.outputs import atomic_write

    # The temp file goes on any failure, a full disk included (issue 21).
    atomic_write(path, json.dumps(result, indent=2) + "\n", "--json")
