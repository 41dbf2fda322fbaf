"""What-if results beside measured ones: replay, hold-out validation, tables labelled predicted."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvprof.analysis.whatif.simulate import Deployment, Load, Simulator

if TYPE_CHECKING:
    import pandas as pd


# The simulated legs in path order (simulate.py); the overheads in/mid/kv.fixed/out are the
# calibration's per-request samples, the rest the model's own queues, steps and link.
LEGS = ("in", "prefill.queue", "prefill.compute", "aggregated.queue", "aggregated.compute",
        "mid", "kv.handshake", "kv.link_wait", "kv.wire", "kv.fixed", "decode.queue",
        "decode.compute", "out")
MIN_SIM_REQUESTS = 400  # pooled over repeats: the predicted p99 stands on enough requests
PREDICTED = "predicted"
MEASURED = "measured"


@dataclass
class Row:
    """One line of the table: a deployment at one level, measured or predicted."""

    source: str  # MEASURED | PREDICTED
    deployment: str
    concurrency: int
    requests: int
    ttft_mean_ms: float | None
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    busiest_engine: float | None = None  # busy fraction of the busiest engine (predicted)
    error_mean_pct: float | None = None
    error_p99_pct: float | None = None
    # Predicted rows: the mean of each simulated leg (LEGS order), which sum to the mean TTFT.
    legs_ms: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _quantile(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.quantile(np.asarray(values, float), q)) if values else None


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def predict(dep: Deployment, loads: list[Load], seed: int = 0,
            min_requests: int = MIN_SIM_REQUESTS) -> dict[int, Row]:
    """Simulate the levels in order (as the sweep ran them), pooled over a few repeats."""
    per_level: dict[int, list[float]] = {ld.concurrency: [] for ld in loads}
    legs: dict[int, dict[str, float]] = {ld.concurrency: {} for ld in loads}
    busy: dict[int, list[float]] = {ld.concurrency: [] for ld in loads}
    least = min(ld.requests for ld in loads)
    repeats = max(1, math.ceil(min_requests / max(least, 1)))
    for r in range(repeats):
        sim = Simulator(dep, seed=seed + r)
        for ld in loads:
            res = sim.run(ld)
            per_level[ld.concurrency] += res.ttft()
            for r in res.requests:
                if not r.warmup:
                    acc = legs[ld.concurrency]
                    for k, v in r.legs.items():
                        acc[k] = acc.get(k, 0.0) + v
            busy[ld.concurrency].append(max(res.busy_fraction.values(), default=0.0))
    return {c: Row(PREDICTED, dep.label(), c, len(v), _mean(v), _quantile(v, 0.5),
                   _quantile(v, 0.99), _mean(busy[c]),
                   legs_ms={k: legs[c].get(k, 0.0) / len(v) for k in LEGS if k in legs[c]}
                   if v else None)
            for c, v in per_level.items()}


def measured(req: pd.DataFrame, label: str) -> dict[int, Row]:
    """Per level, the measured TTFT of the traced, non-warm-up requests."""
    done = req[~req["warmup"].astype(bool) & req["ttft_ms"].notna() & req["concurrency"].notna()]
    out = {}
    for c, grp in done.groupby(done["concurrency"].astype(int)):
        v = grp["ttft_ms"].astype(float).tolist()
        out[int(c)] = Row(MEASURED, label, int(c), len(v), _mean(v), _quantile(v, 0.5),
                          _quantile(v, 0.99))
    return out


def error_pct(predicted: float | None, actual: float | None) -> float | None:
    if predicted is None or not actual:
        return None
    return 100.0 * (predicted - actual) / actual


def with_errors(pred: dict[int, Row], meas: dict[int, Row]) -> dict[int, Row]:
    for c, row in pred.items():
        if c in meas:
            row.error_mean_pct = error_pct(row.ttft_mean_ms, meas[c].ttft_mean_ms)
            row.error_p99_pct = error_pct(row.ttft_p99_ms, meas[c].ttft_p99_ms)
    return pred


def validate(req: pd.DataFrame, aiperf: pd.DataFrame, steps: pd.DataFrame | None = None,
             link_gbytes_per_s: float | None = None,
             block_tokens: int | None = None) -> dict[str, Any]:
    """report.json's ``whatif``: calibrate on the lower levels, predict the highest, and
    replay every level with the model calibrated on the lower ones."""
    from kvprof.analysis.whatif.calibrate import calibrate, load_levels, measured_legs

    loads = load_levels(aiperf)
    levels = sorted(loads)
    traced = sorted(set(req.loc[req["ttft_ms"].notna() & req["concurrency"].notna(),
                                "concurrency"].astype(int)))
    levels = [lv for lv in levels if lv in traced]
    out: dict[str, Any] = {
        "calibrated_on": None, "predicted_level": None, "predicted_ttft_mean_ms": None,
        "measured_ttft_mean_ms": None, "error_pct": None, "predicted_ttft_p99_ms": None,
        "measured_ttft_p99_ms": None, "error_p99_pct": None,
        "label": "predicted_* figures are predictions of kvprof's what-if model, not "
                 "measurements",
    }
    if not levels:
        out["notes"] = ["no traced level with a TTFT: nothing to calibrate on"]
        return out
    calib_levels = levels[:-1] or levels
    cal = calibrate(req, aiperf, steps, calib_levels, link_gbytes_per_s,
                    block_tokens=block_tokens)
    dep = cal.deployment()
    pred = predict(dep, [loads[lv] for lv in levels])
    meas = measured(req, dep.label())
    with_errors(pred, meas)
    top = levels[-1]
    out.update({
        "calibrated_on": calib_levels, "predicted_level": top if len(levels) > 1 else None,
        "deployment": dep.label(),
    })
    if len(levels) > 1:
        out.update({
            "predicted_ttft_mean_ms": pred[top].ttft_mean_ms,
            "measured_ttft_mean_ms": meas[top].ttft_mean_ms,
            "error_pct": pred[top].error_mean_pct,
            "predicted_ttft_p99_ms": pred[top].ttft_p99_ms,
            "measured_ttft_p99_ms": meas[top].ttft_p99_ms,
            "error_p99_pct": pred[top].error_p99_pct,
            "predicted_legs_ms": pred[top].legs_ms,
            "measured_legs_ms": measured_legs(req, top),
        })
    out["levels"] = [r.to_dict() for lv in levels for r in (meas[lv], pred[lv])]
    out["calibration"] = cal.to_dict()
    out["notes"] = ([] if len(levels) > 1 else
                    ["one level only: the model was calibrated on it and validated on "
                     "nothing (run two or more levels to check a prediction)"])
    out["notes"].append("not modelled: preemption, chunked prefill of one prompt over several "
                        "steps, CPU contention between processes sharing cores (beyond the step "
                        "times measured at the calibration levels and the legs measured at the "
                        "nearest one); measured_legs_ms beside predicted_legs_ms shows where "
                        "the prediction parts from the measurement")
    return out


def leg_table(predicted: dict[str, float], measured: dict[str, float]) -> list[tuple]:
    """(leg, measured ms, predicted ms, predicted - measured) in path order; the KV link's
    simulated parts (wait, wire, fixed) summed into kv.transfer as the breakdown has it."""
    pred = dict(predicted)
    link = sum(pred.pop(k, 0.0) for k in ("kv.link_wait", "kv.wire", "kv.fixed"))
    if any(k in predicted for k in ("kv.link_wait", "kv.wire", "kv.fixed")):
        pred["kv.transfer"] = link
    order = [k for k in LEGS if k not in ("kv.link_wait", "kv.wire", "kv.fixed")]
    order.insert(order.index("decode.queue"), "kv.transfer")
    return [(k, measured.get(k), pred.get(k),
             None if k not in pred or k not in measured else pred[k] - measured[k])
            for k in order if k in pred or k in measured]


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def fmt_pct(v: float | None) -> str:
    return "" if v is None else f"{v:+.0f}%"


def render_table(rows: list[Row]) -> str:
    """A fixed-width table; every predicted figure carries the word 'predicted'."""
    head = ("source", "deployment", "conc", "reqs", "TTFT mean ms", "TTFT p50 ms",
            "TTFT p99 ms", "busiest engine", "err mean", "err p99")
    lines = [head]
    for r in rows:
        busy = "-" if r.busiest_engine is None else f"{100 * r.busiest_engine:.0f}%"
        lines.append((r.source, r.deployment, str(r.concurrency), str(r.requests),
                      fmt_ms(r.ttft_mean_ms), fmt_ms(r.ttft_p50_ms), fmt_ms(r.ttft_p99_ms),
                      busy, fmt_pct(r.error_mean_pct), fmt_pct(r.error_p99_pct)))
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    return "\n".join("  ".join(x[i].ljust(widths[i]) for i in range(len(head))).rstrip()
                     for x in lines)
