"""Summaries of the request table: legs per percentile, per leg, per stage, per pair."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from kvprof import semconv as sc
from kvprof.analysis import legs as lg
from kvprof.analysis.breakdown import LEG, PHASES, UNACCOUNTED, leg_info, leg_order

if TYPE_CHECKING:
    import pandas as pd


def nearest_rank(values: pd.Series, pct: float) -> int:
    """Position (in ascending order) of the nearest-rank percentile."""
    n = len(values)
    return max(0, min(n - 1, math.ceil(pct / 100.0 * n) - 1))


def leg_label(column: str, chain: str | None = None) -> str:
    """The words for a leg column (for the chain given, else the disaggregated one's)."""
    info = leg_info().get(column, {})
    return info.get(chain or "disaggregated") or info.get("aggregated") or column


def leg_stage(column: str, chain: str | None = None) -> str:
    info = leg_info().get(column, {})
    return (info.get(f"stage:{chain or 'disaggregated'}") or info.get("stage:aggregated")
            or "other")


def legs_of(row: pd.Series) -> dict[str, float]:
    """One request's legs in path order, by their words, unaccounted last."""
    chain = row.get("chain")
    out = {}
    for col in _path_columns(chain):
        v = _num(row.get(col))
        if v is not None:
            out[leg_label(col, chain)] = v
    out[UNACCOUNTED] = _num(row.get("unaccounted_ms")) or 0.0
    return out


def _path_columns(chain: str | None) -> list[str]:
    """Leg columns in the path order of ``chain`` (the other chains' legs after), so a table
    "in path order" follows the path its requests took, not the union of every chain."""
    from kvprof.analysis.views.words import path_order

    cols = [LEG + lid for lid in path_order(str(chain) if chain is not None else None)]
    return cols + [c for c in leg_order() if c not in cols]


def percentile_view(req: pd.DataFrame, pcts: tuple[int, ...] = (50, 90, 99)) -> list[dict]:
    """The request at each TTFT percentile (nearest rank) with its stacked legs."""
    done = req[req["ttft_ms"].notna()].sort_values("ttft_ms", kind="stable")
    out = []
    if done.empty:
        return out
    for p in pcts:
        row = done.iloc[nearest_rank(done["ttft_ms"], p)]
        out.append({"percentile": p, "key": row["key"], "pair": row["pair"],
                    "ttft_ms": float(row["ttft_ms"]), "ttft_source": row["ttft_source"],
                    "dynamo_ttft_ms": _num(row.get("dynamo_ttft_ms")),
                    "first_contact": bool(row["first_contact"]), "legs_ms": legs_of(row),
                    "stages_ms": stages_of(row),
                    "unaccounted_detail": row.get("unaccounted_detail"),
                    "kv_hold_ms": _num(row.get(sc.SPAN_KV_HOLD))})
    return out


def stages_of(row: pd.Series) -> dict[str, float]:
    """One request's time per stage (legs summed by stage), unaccounted last."""
    chain = row.get("chain")
    out: dict[str, float] = {}
    for col in _path_columns(chain):
        v = _num(row.get(col))
        if v is not None:
            stage = leg_stage(col, chain)
            out[stage] = out.get(stage, 0.0) + v
    out[UNACCOUNTED] = _num(row.get("unaccounted_ms")) or 0.0
    return out


def _stat(s: pd.Series, ttft_mean: float | None) -> dict:
    return {"count": int(len(s)), "mean_ms": float(s.mean()), "p50_ms": float(s.quantile(0.5)),
            "p99_ms": float(s.quantile(0.99)), "max_ms": float(s.max()),
            "share_of_ttft": (float(s.mean()) / ttft_mean) if ttft_mean else None}


def leg_stats(req: pd.DataFrame) -> list[dict]:
    """Each leg over the requests that have it (mean, p50, p99, max; share of mean TTFT,
    counting requests without the leg as 0), in path order, unaccounted last."""
    done = req[req["ttft_ms"].notna()]
    if done.empty:
        return []
    ttft_mean = float(done["ttft_ms"].mean())
    out = []
    main_chain = done["chain"].astype(str).mode().iloc[0] if "chain" in done else None
    for col in _path_columns(main_chain):
        if col not in done:
            continue
        s = done[col].dropna()
        if s.empty:
            continue
        chain = done.loc[s.index, "chain"].mode().iloc[0] if "chain" in done else None
        row = {"leg": col.removeprefix(LEG), "label": leg_label(col, chain),
               "stage": lg.STAGES.get(leg_stage(col, chain), leg_stage(col, chain)),
               **_stat(s, ttft_mean)}
        row["share_of_ttft"] = float(done[col].fillna(0).mean()) / ttft_mean
        out.append(row)
    u = done["unaccounted_ms"].fillna(0)
    out.append({"leg": UNACCOUNTED, "label": "unaccounted (no leg covers it)",
                "stage": UNACCOUNTED, **_stat(u, ttft_mean)})
    return out


def stage_table(req: pd.DataFrame) -> pd.DataFrame:
    """Per request (rows) and stage (columns): the sum of its legs in that stage, 0 if none;
    the last column is unaccounted."""
    import pandas as pd

    out = pd.DataFrame(index=req.index, dtype=float)
    chains = req["chain"] if "chain" in req else pd.Series("disaggregated", index=req.index)
    for chain, idx in chains.groupby(chains).groups.items():
        for col in leg_order():
            if col not in req:
                continue
            stage = leg_stage(col, str(chain))
            if stage not in out:
                out[stage] = 0.0
            out.loc[idx, stage] += req.loc[idx, col].fillna(0.0)
    out = out.fillna(0.0)
    out[UNACCOUNTED] = req["unaccounted_ms"].fillna(0.0)
    return out


def stage_means(req: pd.DataFrame) -> dict[str, float]:
    """Mean ms per stage (requests without a stage count 0), largest first, unaccounted last."""
    if req.empty:
        return {}
    means = stage_table(req).mean().to_dict()
    unacc = means.pop(UNACCOUNTED, 0.0)
    ranked = dict(sorted(means.items(), key=lambda kv: kv[1], reverse=True))
    ranked[UNACCOUNTED] = unacc
    return ranked


def level_view(req: pd.DataFrame) -> list[dict]:
    """Per concurrency level (and all levels): requests, TTFT, unaccounted share, stages."""

    done = req[req["ttft_ms"].notna()]
    groups: list[tuple[str, pd.DataFrame]] = [("all", done)]
    if "concurrency" in done and done["concurrency"].notna().any():
        for level, grp in done.groupby(done["concurrency"].astype("float")):
            groups.append((f"{int(level)}", grp))
    out = []
    for name, grp in groups:
        if grp.empty:
            continue
        ttft = float(grp["ttft_ms"].mean())
        unacc = float(grp["unaccounted_ms"].fillna(0).mean())
        dyn = grp["dynamo_ttft_ms"].dropna() if "dynamo_ttft_ms" in grp else grp["ttft_ms"][:0]
        out.append({"concurrency": name, "requests": int(len(grp)), "ttft_mean_ms": ttft,
                    "ttft_p99_ms": float(grp["ttft_ms"].quantile(0.99)),
                    # NVIDIA Dynamo's frontend's own TTFT (its ttft_ms), beside the client's
                    "dynamo_ttft_mean_ms": float(dyn.mean()) if len(dyn) else None,
                    "unaccounted_mean_ms": unacc,
                    "unaccounted_share": unacc / ttft if ttft else None,
                    "stages_ms": stage_means(grp)})
    return out


def phase_stats(req: pd.DataFrame) -> list[dict]:
    """Each span on its own (count, mean, p50, p99), then unaccounted and TTFT."""
    out = []
    for ph in (*PHASES, sc.SPAN_DECODE_KV_WAIT, UNACCOUNTED, "ttft"):
        column = {UNACCOUNTED: "unaccounted_ms", "ttft": "ttft_ms"}.get(ph, ph)
        if column not in req:
            continue
        s = req[column].dropna()
        if s.empty:
            continue
        out.append({"phase": ph, **_stat(s, None)})
    return out


def pair_view(req: pd.DataFrame) -> list[dict]:
    """Per (prefill, decode) pair: the first request against the steady state after it."""
    out = []
    for pair, grp in req.groupby("pair", sort=True):
        first = grp[grp["first_contact"]]
        steady = grp[~grp["first_contact"]]
        paths = grp["kv_path"].dropna().astype(str)

        def med(frame, colname):
            s = frame[colname].dropna()
            return float(s.median()) if len(s) else None

        out.append({
            "pair": pair, "requests": int(len(grp)),
            "path": paths.mode().iloc[0] if len(paths) else None,
            "first_key": first["key"].iloc[0] if len(first) else None,
            "first_ttft_ms": med(first, "ttft_ms"),
            "first_handshake_ms": med(first, sc.SPAN_KV_HANDSHAKE),
            "steady_ttft_ms": med(steady, "ttft_ms"),
            "steady_handshake_ms": med(steady, sc.SPAN_KV_HANDSHAKE),
            "steady_transfer_ms": med(steady, sc.SPAN_KV_TRANSFER),
            "median_transfer_gbps": med(grp, "transfer_gbps"),
        })
    return out


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f
