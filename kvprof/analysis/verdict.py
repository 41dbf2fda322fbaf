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
        evidence = [f"mean {mean:.1f} ms per request, p50 {s.quantile(0.5):.1f} ms, "
                    f"p99 {s.quantile(0.99):.1f} ms over {len(s)} requests"
                    + (f"; largest in {_fmt_keys(top)}" if s.max() > s.min() else
                       " (the same in every request)")]
        estimate = False
        if ph == sc.SPAN_KV_HANDSHAKE:
            evidence.append(_handshake_evidence(done))
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
            "cause": ph, "label": LABELS.get(ph, ph), "mean_ms": mean,
            "share": (mean / total) if total > 0 else 0.0, "estimate": estimate,
            "evidence": [e for e in evidence if e],
        })
    causes.sort(key=lambda c: c["mean_ms"], reverse=True)
    for rank, c in enumerate(causes, start=1):
        c["rank"] = rank
    return causes


def _handshake_evidence(done: pd.DataFrame) -> str:
    hs = done[sc.SPAN_KV_HANDSHAKE] if sc.SPAN_KV_HANDSHAKE in done else None
    if hs is None or hs.dropna().empty:
        return ""
    first = done[done["first_contact"]]
    steady = done[~done["first_contact"]]
    text = (f"{len(first)} first-contact requests (first per prefill->decode pair) paid "
            f"median {first[sc.SPAN_KV_HANDSHAKE].median():.1f} ms "
            f"({_fmt_keys(first['key'])})")
    if len(steady):
        text += (f"; the {len(steady)} later requests median "
                 f"{steady[sc.SPAN_KV_HANDSHAKE].median():.1f} ms")
    return text


def _transfer_evidence(done: pd.DataFrame, links: pd.DataFrame | None,
                       should_cost: ShouldCost | None) -> list[str]:
    out = []
    paths = done.groupby(done["kv_path"].astype(object).fillna("unknown path"))
    for path, grp in paths:
        pairs = sorted(set(grp["pair"].astype(str)))
        out.append(f"{path}: {len(grp)} transfers, median {grp[sc.SPAN_KV_TRANSFER].median():.1f}"
                   f" ms at {grp['transfer_gbps'].median():.2f} GB/s (pairs: {_fmt_keys(pairs)})")
    if links is not None and len(links):
        seen = links[links["path"] != "none"]
        for path, grp in seen.groupby("path"):
            rate = grp["link_rate_gbps"].median()
            label = " (nominal rate: estimate)" if (grp["rate_source"] == "nominal").any() else ""
            out.append(f"collector counters: {len(grp)} transfer windows moved their bytes over "
                       f"{path} ({', '.join(sorted(set(grp['entity'].astype(str))))}), "
                       f"{grp['link_gbps'].median():.2f} GB/s = "
                       f"{grp['pct_of_link_rate'].median():.1f}% of the {rate:.1f} GB/s "
                       f"link{label}")
        bad = links[links["path_mismatch"]]
        if len(bad):
            out.append(f"{len(bad)} transfers moved on another link than kv.path says "
                       f"({_fmt_keys(bad['key'])})")
    if should_cost is not None:
        measured = done[sc.SPAN_KV_TRANSFER].median()
        env = should_cost.environment
        where = env.get("path") or env.get("transport") or "its path"
        out.append(f"estimate: microbench measured {should_cost.total_ms:.1f} ms for this KV "
                   f"size ({where}); the median traced transfer took {measured:.1f} ms "
                   f"({measured / should_cost.total_ms:.1f}x)")
    return out
