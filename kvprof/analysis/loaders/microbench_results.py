"""Read `kvprof microbench --json` output: what a transfer should cost on a measured path."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvprof.errors import BadInputError

log = logging.getLogger(__name__)

HINT = "Pass the file `kvprof microbench --json FILE` wrote."


@dataclass
class ShouldCost:
    """Medians of each measured step and their sum: this path's cost for one request."""

    steps: dict[str, dict[str, float]]
    total_ms: float
    kv_bytes: float | None
    environment: dict[str, Any] = field(default_factory=dict)
    links: list[dict] = field(default_factory=list)
    source: str = ""

    @property
    def steady_gbps(self) -> float | None:
        """End-to-end GB/s of the measured transfers (setup excluded): the "total" step's
        rate when reported, else its bytes over its median time."""
        total = self.steps.get("total", {})
        rate = total.get("gbps")
        if rate is None and total.get("bytes") and total.get("median_ms"):
            rate = total["bytes"] / (total["median_ms"] / 1e3) / 1e9
        if rate is None and self.kv_bytes and self.total_ms > 0:
            rate = self.kv_bytes / (self.total_ms / 1e3) / 1e9
        return float(rate) if rate and not math.isnan(rate) and rate > 0 else None

    def against(self, traced_bytes: float | None, traced_ms: float | None) -> dict:
        """How the traced transfer compares with the microbench, without comparing
        milliseconds across different byte counts: when the geometries differ the
        microbench's steady-state GB/s is scaled to the traced bytes (an estimate that
        ignores any fixed per-transfer cost)."""
        out: dict[str, Any] = {
            "microbench_bytes": self.kv_bytes, "traced_bytes": traced_bytes,
            "traced_ms": traced_ms, "steady_gbps": self.steady_gbps,
            "same_geometry": None, "expected_ms": None, "basis": None, "ratio": None}
        if self.kv_bytes and traced_bytes:
            same = abs(self.kv_bytes - traced_bytes) <= 0.01 * max(self.kv_bytes, traced_bytes)
            out["same_geometry"] = same
            if same:
                out["expected_ms"], out["basis"] = self.total_ms, "measured"
            elif self.steady_gbps:
                out["expected_ms"] = traced_bytes / (self.steady_gbps * 1e9) * 1e3
                out["basis"] = "scaled estimate"
        elif not self.kv_bytes and not traced_bytes:
            out["expected_ms"], out["basis"] = self.total_ms, "measured (byte counts unknown)"
        if out["expected_ms"] and traced_ms is not None and not math.isnan(traced_ms):
            out["ratio"] = traced_ms / out["expected_ms"]
        return out

    def to_dict(self) -> dict:
        return {"steps": self.steps, "total_ms": self.total_ms, "kv_bytes": self.kv_bytes,
                "steady_gbps": self.steady_gbps, "environment": self.environment,
                "links": self.links, "source": self.source}


def load_microbench(path: str | Path) -> ShouldCost:
    """Parse the microbench JSON tolerantly (unknown extra keys are ignored).

    Values of the wrong type or out of range (NaN, infinities, negative, absurd) are left out
    with a warning naming the file and the field; a file with no usable step is an error.
    """
    from kvprof.inputs import load_json_file, path_problem

    p = Path(path)
    if path_problem(p) == "not found":
        raise BadInputError(f"microbench file not found: {p}", hint=HINT)
    doc = load_json_file(p, "microbench file", "`kvprof microbench --json FILE` output")
    bad: list[str] = []
    steps_raw = doc.get("steps") if isinstance(doc, dict) else None
    if isinstance(steps_raw, list):  # a list of {"name": ..., "median_ms": ...} also counts
        steps_raw = {s.get("name", f"step{i}"): s for i, s in enumerate(steps_raw)
                     if isinstance(s, dict)}
    if not isinstance(steps_raw, dict) or not steps_raw:
        raise BadInputError(f"{p} has no \"steps\" object of microbench results", hint=HINT)
    steps: dict[str, dict[str, float]] = {}
    for name, stats in steps_raw.items():
        if not isinstance(stats, dict):
            bad.append(f"steps.{name} is {_show(stats)}, expected an object")
            continue
        values = {}
        for k, v in stats.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not _plausible(v):
                bad.append(f"steps.{name}.{k} is {_show(v)}")
                continue
            values[k] = float(v)
        if "median_ms" in values:
            steps[str(name)] = values
    if not steps:
        raise BadInputError(f"{p}: no step carries a usable median_ms"
                            + (f" ({'; '.join(bad[:3])})" if bad else ""), hint=HINT)
    # A "total" step, when the microbench reports one, already is the end-to-end cost.
    total = steps.get("total", {}).get("median_ms")
    if total is None:
        total = sum(s["median_ms"] for s in steps.values())
    geometry = doc.get("geometry")
    if geometry is not None and not isinstance(geometry, dict):
        bad.append(f"geometry is {_show(geometry)}, expected an object")
    kv_bytes = geometry.get("total_bytes") if isinstance(geometry, dict) else None
    if kv_bytes is not None and (isinstance(kv_bytes, bool) or not isinstance(
            kv_bytes, (int, float)) or not _plausible(kv_bytes)):
        bad.append(f"geometry.total_bytes is {_show(kv_bytes)}")
        kv_bytes = None
    environment = doc.get("environment") or {}
    if not isinstance(environment, dict):
        bad.append(f"environment is {_show(environment)}, expected an object")
        environment = {}
    links = doc.get("links") or []
    if not isinstance(links, list) or not all(isinstance(x, dict) for x in links):
        bad.append(f"links is {_show(links)}, expected a list of objects")
        links = []
    if bad:
        log.warning("%s: left out %d value(s) of the wrong type or out of range: %s", p,
                    len(bad), "; ".join(bad[:5]))
    return ShouldCost(
        steps=steps, total_ms=float(total) if not math.isnan(total) else math.nan,
        kv_bytes=float(kv_bytes) if kv_bytes else None,
        environment=environment, links=links, source=str(p))


# No microbench figure (ms, bytes, GB/s, %) comes near this; 1e300 would print as a result.
_MAX_VALUE = 1e15


def _plausible(v: float) -> bool:
    return math.isfinite(v) and 0 <= v <= _MAX_VALUE


def _show(v: Any) -> str:
    text = repr(v) if isinstance(v, float) else json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:37] + "..."
