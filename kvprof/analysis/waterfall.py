"""The data behind the report's first figures: representative requests' legs, stage means.

The p50/p99 requests' legs on one time axis (the waterfall), and the mean time per stage per
concurrency level and deployment (chain) (the stacked bars).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from kvprof.analysis.views import words as w

if TYPE_CHECKING:
    import pandas as pd

WATERFALL_PERCENTILES = (50, 99)


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def request_legs(row: pd.Series) -> list[dict]:
    """One request's legs in path order, each with its start (ms after the first milestone,
    consecutive legs laid end to end), stage and process; keys stay keys (the JSON's)."""
    chain = row.get("chain")
    chain = str(chain) if chain is not None else None
    out, at = [], 0.0
    for lid in w.path_order(chain):
        ms = _num(row.get(w.LEG_PREFIX + lid))
        if ms is None:
            continue
        out.append({"leg": lid, "stage": w.leg_stage(lid, chain),
                    "process": w.process_of(lid, chain), "wait": w.is_wait(lid, chain),
                    "start_ms": at, "ms": ms})
        at += ms
    return out


def waterfall(req: pd.DataFrame, pcts: tuple[int, ...] = WATERFALL_PERCENTILES) -> list[dict]:
    """The request at each TTFT percentile (nearest rank, as the percentile table picks it)
    with its legs laid out on one time axis; unaccounted time (no leg covers it) is a separate
    entry because where it sits on the path is not known."""
    from kvprof.analysis.views.summaries import nearest_rank

    done = req[req["ttft_ms"].notna()].sort_values("ttft_ms", kind="stable")
    out = []
    for p in pcts if len(done) else ():
        row = done.iloc[nearest_rank(done["ttft_ms"], p)]
        conc = _num(row.get("concurrency"))
        out.append({
            "percentile": p, "key": str(row["key"]), "chain": str(row.get("chain")),
            "ttft_ms": float(row["ttft_ms"]),
            "distribution_ms": float(done["ttft_ms"].quantile(p / 100)),
            "requests": int(len(done)),
            "concurrency": int(conc) if conc is not None else None,
            "first_contact": bool(row.get("first_contact")),
            "unaccounted_ms": _num(row.get("unaccounted_ms")) or 0.0,
            "legs": request_legs(row)})
    return out


def stages_by_level(req: pd.DataFrame) -> list[dict]:
    """Per concurrency level and chain (aggregated / disaggregated side by side): requests,
    mean TTFT and the mean ms of each stage (in path order; requests without it count 0)."""
    from kvprof.analysis.views.summaries import stage_table

    done = req[req["ttft_ms"].notna()]
    if done.empty:
        return []
    conc = done["concurrency"] if "concurrency" in done else None
    # Unknown concurrency (no aiperf records) is one group: -1, shown as "all requests".
    level = (conc.astype(float).fillna(-1.0) if conc is not None
             else done["ttft_ms"] * 0 - 1.0)
    out = []
    for (lv, chain), grp in done.groupby([level, done["chain"].astype(str)], sort=True):
        chain_name = str(chain)
        order: dict[str, None] = {}
        for lid in w.path_order(chain_name):
            order.setdefault(w.leg_stage(lid, chain_name), None)
        means = stage_table(grp).mean().to_dict()
        stages = {s: float(means[s]) for s in [*order, *means]
                  if s in means and s != w.UNACCOUNTED and means[s] > 0}
        out.append({"concurrency": None if lv < 0 else int(lv),
                    "chain": chain_name, "requests": int(len(grp)),
                    "ttft_mean_ms": float(grp["ttft_ms"].mean()),
                    "stages_ms": stages,
                    "unaccounted_ms": float(grp["unaccounted_ms"].fillna(0).mean())})
    return out
