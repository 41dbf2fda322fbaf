"""Rank where TTFT goes, stage by stage, in a serving engineer's words, with evidence."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvprof import semconv as sc
from kvprof.analysis import legs as lg
from kvprof.analysis.blind_spot import lead_with_blind_spot
from kvprof.analysis.breakdown import SOURCE_ID, SOURCE_SPANS, UNACCOUNTED, leg_order
from kvprof.analysis.views.render import fmt, fmt_sig
from kvprof.analysis.views.summaries import leg_label, leg_stage, stage_table

if TYPE_CHECKING:
    import pandas as pd

    from kvprof.analysis.loaders.microbench_results import ShouldCost

# What a stage's mean means, said plainly ({ms} is the mean per request).
SENTENCES = {
    "client": "{ms} ms per request pass between the client and the router/frontend "
              "(connect, upload, the first bytes back and the client reading them)",
    "router": "the router itself spent {ms} ms per request (parsing, between its calls, "
              "forwarding the first bytes)",
    "prefill.intake": "the prefill engine's API server held the request {ms} ms before its "
                      "EngineCore saw it",
    "prefill.queue": "requests waited {ms} ms in the prefill scheduler's queue",
    "prefill.compute": "prefill compute took {ms} ms to the first token",
    "prefill.response": "the prefill engine's answer took {ms} ms from its first token back "
                        "to the router",
    "decode.intake": "the decode engine's API server held the request {ms} ms before its "
                     "EngineCore saw it",
    "kv.wait": "the decode engine waited {ms} ms for a step boundary before it started the "
               "KV load",
    "kv.handshake": "the NIXL handshake cost {ms} ms per request",
    "kv.transfer": "moving the KV took {ms} ms per request",
    "kv.copy": "KV staging copies (serialize / deserialize) took {ms} ms per request",
    "kv.ready": "{ms} ms passed between the KV arriving and the request being scheduled "
                "(step boundaries)",
    "decode.compute": "the decode engine's first step took {ms} ms",
    "decode.response": "{ms} ms passed from the decode engine's first token to the router "
                       "(API server)",
    "engine.intake": "the API server held the request {ms} ms before its EngineCore saw it",
    "engine.queue": "requests waited {ms} ms in the scheduler's queue",
    "engine.compute": "prefill compute took {ms} ms to the first token",
    "engine.response": "{ms} ms passed from the first token to the API server's first bytes",
    UNACCOUNTED: "{ms} ms per request are covered by no leg",
    # Coarse stages (kvprof.analysis.coarse): bounded only by Dynamo's / vLLM's own telemetry.
    "coarse.frontend": "coarse: {ms} ms per request in the Dynamo frontend and its request "
                       "plane, as Dynamo's own spans bound them",
    "coarse.prefill.queue": "coarse: {ms} ms per request between the prefill worker's handler "
                            "and vLLM's scheduler (intake and queue), as vLLM's llm_request "
                            "bounds them",
    "coarse.prefill": "coarse: {ms} ms per request in the prefill worker, as Dynamo's and "
                      "vLLM's own spans and records bound it",
    "coarse.handoff": "coarse: {ms} ms per request in the prefill -> decode hand-off (KV pull, "
                      "decode queue) as Dynamo and vLLM bound it, an upper bound",
    "coarse.decode": "coarse: {ms} ms per request in the decode worker to its first token, as "
                     "vLLM's llm_request bounds it",
}
# The same stages behind NVIDIA Dynamo: its frontend replaces the router, each worker hosts
# AsyncLLM behind Dynamo's request plane instead of vLLM's API server.
DYNAMO_SENTENCES = {
    "client": "{ms} ms per request pass between the client and the Dynamo frontend "
              "(connect, upload, the first bytes back and the client reading them)",
    "router": "the Dynamo frontend itself spent {ms} ms per request (preprocessing, "
              "tokenization, routing, between its calls)",
    "prefill.intake": "the prefill worker held the request {ms} ms before its EngineCore saw "
                      "it (request plane, Dynamo handler, AsyncLLM input processing)",
    "prefill.response": "the prefill worker's answer took {ms} ms from its first token back "
                        "to the frontend",
    "decode.intake": "the decode worker held the request {ms} ms before its EngineCore saw it "
                     "(request plane, Dynamo handler, AsyncLLM input processing)",
    "decode.response": "{ms} ms passed from the decode engine's first token to the Dynamo "
                       "frontend (worker, request plane)",
    "engine.intake": "the worker held the request {ms} ms before its EngineCore saw it "
                     "(request plane, Dynamo handler, AsyncLLM input processing)",
}
TOP_LEGS = 3  # legs named in a stage's evidence


def _fmt_keys(keys) -> str:
    keys = [str(k) for k in keys]
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def sentence(stage: str, mean_ms: float, dynamo: bool = False) -> str:
    """A stage's mean in words (behind NVIDIA Dynamo when ``dynamo``)."""
    text = (DYNAMO_SENTENCES.get(stage) if dynamo else None) or SENTENCES.get(
        stage, stage + ": {ms} ms per request")
    return text.format(ms=fmt(mean_ms))


def rank_causes(req: pd.DataFrame, links: pd.DataFrame | None = None,
                should_cost: ShouldCost | None = None) -> list[dict]:
    """Stages ordered by mean ms per request, unaccounted last; share = of the mean TTFT."""
    done = req[req["ttft_ms"].notna()]
    if done.empty:
        return []
    ttft_mean = float(done["ttft_ms"].mean())
    stages = stage_table(done)
    dynamo = "chain" in done and done["chain"].astype(str).str.startswith("dynamo").mean() > 0.5
    causes = []
    for stage in stages.columns:
        col = stages[stage]
        mean = float(col.mean())
        if stage != UNACCOUNTED and mean <= 0:
            continue
        evidence = _leg_evidence(done, stage) if stage != UNACCOUNTED else []
        headline = sentence(stage, mean, dynamo)
        estimate = False
        if stage == "kv.handshake":
            hs = _handshake_evidence(done, mean)
            if hs:
                headline, evidence = hs
        elif stage == "kv.transfer":
            evidence.extend(_transfer_evidence(done, links, should_cost))
        elif stage == UNACCOUNTED:
            evidence, estimate = _unaccounted_evidence(done)
        top = done.loc[col.sort_values(ascending=False).index[:3], "key"]
        if stage != UNACCOUNTED and col.max() > col.min():
            evidence.append(f"p50 {fmt(col.quantile(0.5))} ms, p99 {fmt(col.quantile(0.99))} ms;"
                            f" largest in {_fmt_keys(top)}")
        causes.append({
            "cause": stage, "label": lg.STAGES.get(stage, "unaccounted (no leg covers it)"),
            "mean_ms": mean, "headline": headline,
            "share": mean / ttft_mean if ttft_mean > 0 else 0.0, "estimate": estimate,
            "evidence": [e for e in evidence if e],
        })
    unacc = [c for c in causes if c["cause"] == UNACCOUNTED]
    causes = sorted((c for c in causes if c["cause"] != UNACCOUNTED),
                    key=lambda c: c["mean_ms"], reverse=True) + unacc
    # Never a named leg first while more time is unaccounted or only coarse (blind_spot.py).
    return lead_with_blind_spot(causes, done)


def rank_by_level(req: pd.DataFrame) -> list[dict]:
    """Per concurrency level: the top stages in words (queueing differs between levels)."""
    done = req[req["ttft_ms"].notna()]
    if "concurrency" not in done or done["concurrency"].isna().all():
        return []
    out = []
    for level, grp in done.groupby(done["concurrency"].astype(float)):
        causes = rank_causes(grp)
        named = [c for c in causes if c["cause"] != UNACCOUNTED][:3]
        unacc = next((c for c in causes if c["cause"] == UNACCOUNTED), None)
        out.append({"concurrency": int(level), "requests": int(len(grp)),
                    "ttft_mean_ms": float(grp["ttft_ms"].mean()),
                    "top": [{"cause": c["cause"], "headline": c["headline"],
                             "mean_ms": c["mean_ms"], "share": c["share"]} for c in named],
                    "unaccounted_mean_ms": unacc["mean_ms"] if unacc else 0.0,
                    "unaccounted_share": unacc["share"] if unacc else 0.0})
    return out


def _leg_evidence(done: pd.DataFrame, stage: str) -> list[str]:
    """The stage's legs, largest first: what each one is and its mean."""
    rows = []
    for col in leg_order():
        if col not in done:
            continue
        s = done[col]
        chains = done["chain"] if "chain" in done else None
        chain = chains[s.notna()].mode().iloc[0] if chains is not None and s.notna().any() \
            else None
        if s.notna().any() and leg_stage(col, chain) == stage:
            rows.append((float(s.fillna(0).mean()), leg_label(col, chain), int(s.notna().sum())))
    rows.sort(reverse=True)
    if len(rows) <= 1:
        return []
    return [f"{label}: {fmt(mean)} ms mean ({n} requests)" for mean, label, n in
            rows[:TOP_LEGS]]


def _unaccounted_evidence(done: pd.DataFrame) -> tuple[list[str], bool]:
    """Where the unaccounted time sits, and whether TTFT itself is measured."""
    sources = done["ttft_source"].value_counts().to_dict()
    measured = sources.get(SOURCE_ID, 0)
    lines = ["TTFT from " + ", ".join(f"{v} x {k}" for k, v in sources.items())]
    if sources.get(SOURCE_SPANS):
        lines.append("without the client's records the first and last legs (client <-> "
                     "router) are not seen at all")
    details = done["unaccounted_detail"].dropna() if "unaccounted_detail" in done else []
    if len(details):
        import re

        missing: dict[str, int] = {}
        for text in details:
            for m in re.findall(r"\(missing: ([^)]*)\)", str(text)):
                missing[m] = missing.get(m, 0) + 1
        for what, n in sorted(missing.items(), key=lambda kv: -kv[1])[:3]:
            lines.append(f"{n} requests have a gap where these milestones are missing: {what}")
    return lines, measured < len(done)


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
