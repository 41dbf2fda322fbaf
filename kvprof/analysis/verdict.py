"""Rank the causes of the disaggregation TTFT overhead by their measured share, with evidence."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvprof import semconv as sc
from kvprof.analysis.breakdown import (
    OVERHEAD_PHASES,
    SOURCE_ID,
    SOURCE_SPANS,
    UNACCOUNTED,
)
from kvprof.analysis.render import fmt, fmt_sig

if TYPE_CHECKING:
    import pandas as pd

    from kvprof.analysis.microbench_results import ShouldCost

LABELS = {
    sc.SPAN_KV_SERIALIZE: "KV serialization on the prefill engine",
    sc.SPAN_KV_HANDSHAKE: "NIXL handshake before the transfer",
    sc.SPAN_KV_TRANSFER: "KV transfer between engines",
    sc.SPAN_KV_DESERIALIZE: "KV deserialization on the decode engine",
    sc.SPAN_DECODE_QUEUE: "Queueing on the decode engine",
    UNACCOUNTED: "Unaccounted hand-over (frontend/router, client, gaps between spans)",
}


def _fmt_keys(keys) -> str:
    keys = [str(k) for k in keys]
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def rank_causes(req: pd.DataFrame, links: pd.DataFrame | None = None,
                should_cost: ShouldCost | None = None) -> list[dict]:
    """Causes ordered by mean ms per request; share = that / the summed overhead."""
    done = req[req["ttft_ms"].notna()]
    if done.empty:
        return []
    means = {ph: float(done[ph].fillna(0).mean()) if ph in done else 0.0
             for ph in OVERHEAD_PHASES}
    means[UNACCOUNTED] = float(done["unaccounted_ms"].clip(lower=0).mean())
    total = sum(means.values())
    causes = []
    for ph, mean in means.items():
        column = "unaccounted_ms" if ph == UNACCOUNTED else ph
        s = done[column].dropna()
        if s.empty:
            continue
        top = done.loc[s.sort_values(ascending=False).index[:3], "key"]
        if len(s) == 1:
            spread = f"{fmt(s.iloc[0])} ms in 1 request ({_fmt_keys(top)})"
        else:
            spread = (f"p50 {fmt(s.quantile(0.5))} ms, p99 {fmt(s.quantile(0.99))} ms over "
                      f"{len(s)} requests" + (f"; largest in {_fmt_keys(top)}"
                                              if s.max() > s.min() else
                                              " (the same in each of them)"))
        evidence = [f"mean {fmt(mean)} ms per request, {spread}"]
        headline = f"{fmt(mean)} ms per request"
        estimate = False
        if ph == sc.SPAN_KV_HANDSHAKE:
            hs = _handshake_evidence(done, mean)
            if hs:
                headline, evidence = hs
        elif ph == sc.SPAN_KV_TRANSFER:
            evidence.extend(_transfer_evidence(done, links, should_cost))
        elif ph == UNACCOUNTED:
            sources = done["ttft_source"].value_counts().to_dict()
            measured = sources.get(SOURCE_ID, 0)
            estimate = measured < len(done)
            evidence.append(
                "TTFT from " + ", ".join(f"{v} x {k}" for k, v in sources.items())
                + ("; TTFT minus the spans' stacked phases" if measured else "")
                + (". The span-only TTFT misses the client->frontend leg: an estimate."
                   if sources.get(SOURCE_SPANS) else ""))
        causes.append({
            "cause": ph, "label": LABELS.get(ph, ph), "mean_ms": mean, "headline": headline,
            "share": (mean / total) if total > 0 else 0.0, "estimate": estimate,
            "evidence": [e for e in evidence if e],
        })
    causes.sort(key=lambda c: c["mean_ms"], reverse=True)
    for rank, c in enumerate(causes, start=1):
        c["rank"] = rank
    return causes


def _handshake_evidence(done: pd.DataFrame, mean: float) -> tuple[str, list[str]] | None:
    """First contact leads: what the first request per pair paid, how many paid it, and
    what the later requests paid (often nothing); the amortised mean comes last."""
    hs = done[sc.SPAN_KV_HANDSHAKE] if sc.SPAN_KV_HANDSHAKE in done else None
    if hs is None or hs.dropna().empty:
        return None
    first = done[done["first_contact"]]
    steady = done[~done["first_contact"]]
    first_hs = first[sc.SPAN_KV_HANDSHAKE].dropna()
    steady_hs = steady[sc.SPAN_KV_HANDSHAKE].dropna()
    steady_hs = steady_hs[steady_hs > 0]
    n = len(done)
    lines = []
    if len(first_hs):
        headline = (f"{fmt(first_hs.median())} ms on the first request per prefill->decode "
                    f"pair ({_count(len(first_hs), 'request')}), {fmt(mean)} ms per request "
                    f"amortised over {n}")
        lines.append(f"the first request of each pair paid median {fmt(first_hs.median())} ms"
                     f" ({_count(len(first_hs), 'request')} of {n}: "
                     f"{_fmt_keys(first.loc[first_hs.index, 'key'])})")
    else:
        headline = f"{fmt(mean)} ms per request, none of it on first contact"
        lines.append("no first request of a pair carried a handshake span")
    # When every request was a first contact there is no steady state to describe.
    if len(steady) and steady_hs.empty:
        lines.append(f"the {_count(len(steady), 'later request')} paid none")
    elif len(steady_hs):
        lines.append(f"{len(steady_hs)} of the {_count(len(steady), 'later request')} paid one "
                     f"too, median {fmt(steady_hs.median())} ms "
                     f"({_fmt_keys(steady.loc[steady_hs.index, 'key'])})")
    lines.append(f"amortised over all {_count(n, 'request')}: mean {fmt(mean)} ms per request")
    return headline, lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _transfer_evidence(done: pd.DataFrame, links: pd.DataFrame | None,
                       should_cost: ShouldCost | None) -> list[str]:
    out = []
    paths = done.groupby(done["kv_path"].astype(object).fillna("unknown path"))
    for path, grp in paths:
        pairs = sorted(set(grp["pair"].astype(str)))
        out.append(f"{path}: {_count(len(grp), 'transfer')}, median "
                   f"{fmt(grp[sc.SPAN_KV_TRANSFER].median())} ms at "
                   f"{fmt_sig(grp['transfer_gbps'].median())} GB/s "
                   f"(pairs: {_fmt_keys(pairs)})")
    if links is not None and len(links):
        seen = links[links["path"] != "none"]
        for path, grp in seen.groupby("path"):
            rate = grp["link_rate_gbps"].median()
            label = " (nominal rate: estimate)" if (grp["rate_source"] == "nominal").any() else ""
            out.append(f"collector counters: {len(grp)} transfer windows moved their bytes over "
                       f"{path} ({', '.join(sorted(set(grp['entity'].astype(str))))}), "
                       f"{fmt_sig(grp['link_gbps'].median())} GB/s = "
                       f"{fmt_sig(grp['pct_of_link_rate'].median())}% of the "
                       f"{fmt_sig(rate)} GB/s link{label}")
        bad = links[links["path_mismatch"]]
        if len(bad):
            out.append(f"{len(bad)} transfers moved on another link than kv.path says "
                       f"({_fmt_keys(bad['key'])})")
    if should_cost is not None:
        out.append(should_cost_line(should_cost, done))
    return out


def traced_transfer(done: pd.DataFrame) -> tuple[float | None, float | None]:
    """Median kv.bytes and median transfer ms of the traced requests (None when absent)."""
    def med(col: str) -> float | None:
        if col not in done:
            return None
        s = done[col].dropna()
        return float(s.median()) if len(s) else None
    return med("kv_bytes"), med(sc.SPAN_KV_TRANSFER)


def should_cost_line(should_cost: ShouldCost, done: pd.DataFrame) -> str:
    """The microbench comparison in words; milliseconds are compared only for equal bytes."""
    traced_bytes, traced_ms = traced_transfer(done)
    cmp = should_cost.against(traced_bytes, traced_ms)
    env = should_cost.environment
    where = env.get("path") or env.get("transport") or "its path"
    mb_bytes = _bytes(cmp["microbench_bytes"])
    tr_bytes = _bytes(traced_bytes)
    took = (f"the median traced transfer took {fmt(traced_ms)} ms"
            if traced_ms is not None else "no traced transfer has a duration")
    if cmp["basis"] == "scaled estimate":
        return (f"scaled estimate: the microbench moved {mb_bytes} ({where}) at "
                f"{fmt_sig(cmp['steady_gbps'])} GB/s steady state; at that rate the traced "
                f"{tr_bytes} (median kv.bytes) should take {fmt_sig(cmp['expected_ms'])} ms; "
                f"{took}" + (f" ({fmt_sig(cmp['ratio'])}x)" if cmp["ratio"] else "")
                + ". Fixed per-transfer costs do not scale with bytes.")
    if cmp["expected_ms"] is not None:
        return (f"estimate: microbench measured {fmt(cmp['expected_ms'])} ms for {mb_bytes} "
                f"({where}), the traced size; {took}"
                + (f" ({fmt_sig(cmp['ratio'])}x)" if cmp["ratio"] else ""))
    return (f"microbench geometry ({mb_bytes}) differs from the traced transfers ({tr_bytes}) "
            "and it reports no steady-state GB/s to scale by: its milliseconds are not "
            "comparable")


def _bytes(n: float | None) -> str:
    if n is None:
        return "unknown bytes"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{fmt_sig(n / size)} {unit} ({int(n):,} bytes)"
    return f"{int(n):,} bytes"
