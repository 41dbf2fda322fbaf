"""The verdict's first rule: never rank a named leg first while a larger share is not seen finely.

Time kvprof cannot name finely is of two kinds: *unaccounted* (no leg covers it) and *coarse*
(only NVIDIA Dynamo's or vLLM's own spans and records bound it: kvprof.analysis.coarse). When
their sum outweighs the largest finely measured stage, the verdict must lead with that, say
what is missing, and give the one command that would measure it; otherwise a user reads "top
cause: router (2%)" off a report where 97% of TTFT is unknown.

``blind_spot(causes, done)`` returns that lead entry (or None); ``lead_with_blind_spot``
puts it first. The entry has the keys of a ranked cause (cause "blind_spot", label,
mean_ms, share, headline, estimate, evidence, rank) plus ``command`` (the one command),
``unaccounted_ms``, ``coarse_ms`` and ``coarse_stages``; its share overlaps the unaccounted
and coarse entries that follow it (it sums them), it is not one more share of TTFT.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from kvprof.analysis import legs as lg
from kvprof.analysis.coarse import COARSE_SOURCES, PREFIX, is_coarse

if TYPE_CHECKING:
    import pandas as pd

BLIND_SPOT = "blind_spot"
UNACCOUNTED = lg.UNACCOUNTED
ATTACH_DYNAMO = "kvprof attach --role auto -- python -m dynamo.vllm <the worker's arguments>"
ATTACH_VLLM = "kvprof attach -- vllm serve <the engine's arguments>"
VLLM_SPANS = "--otlp-traces-endpoint <OTLP URL> on each vLLM worker (its llm_request span)"
DYNAMO_RECORDS = ("DYN_REQUEST_TRACE=1 DYN_REQUEST_TRACE_SINKS=stderr DYN_LOGGING_JSONL=true on "
                  "the Dynamo frontend, then `kvprof report --dynamo-log <its log>`")
AIPERF = "`kvprof report --aiperf <aiperf artifact dir>` (the client's own records)"
# Fine milestones only kvprof's probes write inside an engine (their legs exist only where
# `kvprof attach` ran).
_PROBED_LEGS = ("leg:prefill.scheduled", "leg:prefill.first_token", "leg:decode.first_token",
                "leg:engine.scheduled", "leg:engine.first_token")


def _dynamo(done: pd.DataFrame) -> bool:
    return "chain" in done and bool(
        done["chain"].astype(str).str.startswith("dynamo").mean() > 0.5)


def _has(done: pd.DataFrame, prefix: str) -> bool:
    return any(c.startswith(prefix) and done[c].notna().any() for c in done.columns)


def _missing(done: pd.DataFrame) -> list[str]:
    """The milestones the gaps name most often, most frequent first."""
    if "unaccounted_detail" not in done:
        return []
    count: dict[str, int] = {}
    for text in done["unaccounted_detail"].dropna():
        for m in re.findall(r"\(missing: ([^)]*)\)", str(text)):
            count[m] = count.get(m, 0) + 1
    return [m for m, _ in sorted(count.items(), key=lambda kv: -kv[1])]


def _origin(source: str) -> str:
    """Who emitted a coarse leg's source, in a few words."""
    if source.startswith("vLLM"):
        return "vLLM's llm_request"
    if "request_end" in source:
        return "Dynamo's request_end records"
    return "Dynamo's spans"


def refine_command(done: pd.DataFrame) -> tuple[str, list[str]]:
    """The one command that would measure the most of what is not seen finely, and the
    other settings that would narrow it further."""
    dynamo = _dynamo(done)
    probed = any(c in done and done[c].notna().any() for c in _PROBED_LEGS)
    others = []
    if dynamo and not _has(done, f"leg:{PREFIX}prefill.vllm") and \
            not _has(done, f"leg:{PREFIX}engine.vllm"):
        others.append("coarser, without kvprof in the worker: " + VLLM_SPANS)
    bound = (done["dynamo_kv_bound_ms"].dropna() if "dynamo_kv_bound_ms" in done
             else done.iloc[:0, :1])
    if len(bound):
        others.append("Dynamo's request_end records bound the prefill -> decode hand-off "
                      f"(prefill done -> first token) at {bound.mean():.1f} ms mean, "
                      f"{bound.max():.1f} ms at most")
    elif dynamo:
        others.append("Dynamo's request_end records bound the prefill -> decode hand-off: "
                      + DYNAMO_RECORDS)
    client_only = "ttft_source" in done and (done["ttft_source"] == "spans (estimate)").all()
    if probed:
        missing = " ".join(_missing(done)).lower()
        if client_only and ("client" in missing or not missing):
            return AIPERF, others
        return ("kvprof attach in the process whose milestones are missing ("
                + (ATTACH_DYNAMO if dynamo else ATTACH_VLLM) + ")"), others
    if client_only:
        others.append("the client's legs: " + AIPERF)
    return (ATTACH_DYNAMO if dynamo else ATTACH_VLLM) + " in each worker", others


def blind_spot(causes: list[dict], done: pd.DataFrame) -> dict | None:
    """The lead verdict entry when unaccounted + coarse time exceeds the largest finely
    measured stage (None otherwise, or without requests)."""
    if done.empty or not causes:
        return None
    ttft = float(done["ttft_ms"].mean())
    unacc = next((c["mean_ms"] for c in causes if c["cause"] == UNACCOUNTED), 0.0)
    unacc = 0.0 if abs(unacc) < 1e-6 else unacc  # rounding of exact sums, not a gap
    coarse = [c for c in causes if is_coarse(c["cause"])]
    coarse_ms = sum(c["mean_ms"] for c in coarse)
    fine = [c for c in causes if c["cause"] not in (UNACCOUNTED, BLIND_SPOT)
            and not is_coarse(c["cause"])]
    top_fine = max((c["mean_ms"] for c in fine), default=0.0)
    unknown = max(unacc, 0.0) + coarse_ms
    if unknown <= top_fine or unknown <= 0 or ttft <= 0:
        return None
    command, others = refine_command(done)
    pct = 100 * unknown / ttft
    top_words = (f"; the largest finely measured stage is {100 * top_fine / ttft:.0f}%"
                 if fine else "; no stage is measured finely")
    if unacc >= coarse_ms:
        missing = _missing(done)
        what = f" (missing: {missing[0]})" if missing else ""
        headline = (f"{pct:.0f}% of TTFT is not measured finely: {unacc:.1f} ms per request "
                    f"is covered by no leg{what}"
                    + (f" and {coarse_ms:.1f} ms only by coarse legs" if coarse_ms else "")
                    + f"{top_words}. Measure it: {command}")
    else:
        sources = sorted({COARSE_SOURCES.get(col.removeprefix("leg:"), "")
                          for col in done.columns if col.startswith("leg:" + PREFIX)
                          and done[col].notna().any()} - {""})
        names = sorted({_origin(s) for s in sources})
        big = max(coarse, key=lambda c: c["mean_ms"])
        headline = (f"{pct:.0f}% of TTFT is seen only coarsely: {coarse_ms:.1f} ms per request "
                    f"in coarse legs from {' and '.join(names) or 'native telemetry'}; largest: "
                    f"{big['label']} ({100 * big['share']:.0f}%)"
                    + (f"; {unacc:.1f} ms not at all" if unacc > 0.05 else "")
                    + f"{top_words}. Refine it: {command}")
    evidence = [f"{c['label']}: {c['mean_ms']:.1f} ms per request ({100 * c['share']:.0f}%)"
                for c in sorted(coarse, key=lambda c: -c["mean_ms"])]
    if unacc > 0:
        evidence.append(f"unaccounted: {unacc:.1f} ms per request ({100 * unacc / ttft:.0f}%)")
    evidence.extend(others)
    return {"cause": BLIND_SPOT, "label": "not measured finely (unaccounted + coarse legs)",
            "mean_ms": unknown, "headline": headline, "share": unknown / ttft,
            "estimate": True, "evidence": evidence, "command": command,
            "unaccounted_ms": unacc, "coarse_ms": coarse_ms,
            "coarse_stages": [c["cause"] for c in coarse]}


def lead_with_blind_spot(causes: list[dict], done: pd.DataFrame) -> list[dict]:
    """``causes`` with the blind-spot entry first when there is one, ranks renumbered."""
    lead = blind_spot(causes, done)
    out = ([lead] if lead else []) + [c for c in causes if c["cause"] != BLIND_SPOT]
    for rank, c in enumerate(out, start=1):
        c["rank"] = rank
    return out
