"""Keys to words: what every table, figure and CLI line says for a stage, leg or span key.

report.json keeps the keys (``prefill.intake``, ``leg:kv.ready``, ``vllm.decode.queue``);
everything a person reads goes through ``words()``, so the report speaks the verdict's
vocabulary everywhere. A key nobody has named yet still reads as words (dots and underscores
become spaces), never as a raw key; name it in legs.STAGES / the chain's milestone / SPANS.
The colours of the stages are here too: one colour per stage in every figure of the report.
"""

from __future__ import annotations

import hashlib

from kvprof import semconv as sc
from kvprof.analysis import legs as lg

UNACCOUNTED = lg.UNACCOUNTED
LEG_PREFIX = "leg:"

# Spans on their own ("Each span on its own"): what each measures, in words.
SPANS = {
    sc.SPAN_PREFILL: "prefill engine's whole request",
    sc.SPAN_PREFILL_QUEUE: "prefill scheduler queue",
    sc.SPAN_PREFILL_COMPUTE: "prefill compute",
    sc.SPAN_KV_SERIALIZE: "KV serialize (staging copy)",
    sc.SPAN_KV_HOLD: "KV held by prefill until decode pulled it",
    sc.SPAN_DECODE: "decode engine's whole request",
    sc.SPAN_KV_HANDSHAKE: "NIXL handshake",
    sc.SPAN_KV_TRANSFER: "KV transfer",
    sc.SPAN_KV_DESERIALIZE: "KV deserialize (staging copy)",
    sc.SPAN_DECODE_QUEUE: "decode scheduler queue",
    sc.SPAN_DECODE_FIRST_TOKEN: "decode first step (first token)",
    sc.SPAN_DECODE_KV_WAIT: "decode waits for the KV (asked -> ready)",
    sc.SPAN_REQUEST: "engine's whole request",
    "ttft": "TTFT (as the client measured it)",
}
UNACCOUNTED_WORDS = "unaccounted (no leg covers it)"

STAGE_COLOURS = {
    "client": "#aec7e8", "router": "#c5b0d5", "prefill.intake": "#ffbb78",
    "prefill.queue": "#c7c7c7", "prefill.compute": "#1f77b4", "prefill.response": "#98df8a",
    "decode.intake": "#ff9896", "kv.wait": "#e377c2", "kv.handshake": "#d62728",
    "kv.transfer": "#ff7f0e", "kv.copy": "#8c564b", "kv.ready": "#bcbd22",
    "kv.post": "#fdae6b", "kv.wire": "#e6550d",  # the transfer split (issue 19)
    "decode.compute": "#2ca02c", "decode.response": "#17becf",
    "engine.intake": "#ffbb78", "engine.queue": "#c7c7c7", "engine.compute": "#1f77b4",
    "engine.response": "#17becf", UNACCOUNTED: "#7f7f7f",
    # Coarse stages (where the probes did not run): their own muted shades.
    "coarse.frontend": "#9edae5", "coarse.prefill.queue": "#dbdb8d", "coarse.prefill": "#9467bd",
    "coarse.handoff": "#f7b6d2", "coarse.decode": "#c49c94",
}
# Stages that are waiting rather than work: drawn hatched in the figures.
WAIT_STAGES = {"prefill.queue", "engine.queue", "kv.wait", "kv.ready"}


def humanize(key: str) -> str:
    """A key nobody named yet, as words: ``kv.post_ms`` -> ``kv post ms``."""
    return str(key).replace(LEG_PREFIX, "").replace(".", " ").replace("_", " ")


def stage_words(stage: str) -> str:
    """A stage key in the verdict's words."""
    if stage == UNACCOUNTED:
        return UNACCOUNTED_WORDS
    return lg.STAGES.get(stage) or humanize(stage)


def _milestones(chain: str | None) -> dict[str, lg.Milestone]:
    chains = [lg.CHAINS[chain]] if chain in lg.CHAINS else []
    chains += [c for name, c in lg.CHAINS.items() if name != chain]
    out: dict[str, lg.Milestone] = {}
    for c in chains:
        for m in c[1:]:
            out.setdefault(m.id, m)
    return out


def leg_words(leg: str, chain: str | None = None) -> str:
    """A leg key (``kv.ready`` or ``leg:kv.ready``) in words, as the given chain says it."""
    lid = leg.removeprefix(LEG_PREFIX)
    if lid == UNACCOUNTED:
        return UNACCOUNTED_WORDS
    m = _milestones(chain).get(lid)
    return m.leg if m is not None and m.leg else humanize(lid)


def leg_stage(leg: str, chain: str | None = None) -> str:
    """The stage key a leg belongs to (``other`` when no chain knows it)."""
    m = _milestones(chain).get(leg.removeprefix(LEG_PREFIX))
    return m.stage if m is not None else "other"


def span_words(name: str) -> str:
    """A span name in words."""
    if name == UNACCOUNTED:
        return UNACCOUNTED_WORDS
    return SPANS.get(name) or humanize(name)


def words(key: str, chain: str | None = None) -> str:
    """Any key of the report (stage, leg, span) in words; the one call for other views."""
    if key in lg.STAGES or key == UNACCOUNTED:
        return stage_words(key)
    if key in SPANS:
        return span_words(key)
    if key.startswith(LEG_PREFIX) or key in _milestones(chain):
        return leg_words(key, chain)
    return humanize(key)


def stage_colour(stage: str) -> str:
    """The stage's colour, the same in every figure (a stable colour for new stages)."""
    if stage in STAGE_COLOURS:
        return STAGE_COLOURS[stage]
    hue = int(hashlib.sha1(stage.encode()).hexdigest()[:4], 16) % 360
    return f"hsl({hue},55%,60%)"


def is_wait(leg: str, chain: str | None = None) -> bool:
    """Whether a leg is time spent waiting (a queue, a step boundary) rather than working."""
    lid = leg.removeprefix(LEG_PREFIX)
    text = leg_words(lid, chain).lower()
    return (leg_stage(lid, chain) in WAIT_STAGES or "wait" in text or "queue" in text
            or "step boundary" in text or "finishes its current step" in text)


def path_order(chain: str | None) -> list[str]:
    """Leg ids in the order a request of ``chain`` meets them; the other chains' after."""
    return list(_milestones(chain))


# Which process a leg's time is spent in (one row per process in the waterfall). A leg between
# two processes (a hop) lands on the process it arrives at.
_PROCESS = [
    (("client.",), "client"),
    (("router.recv", "frontend.recv"), "client"),
    (("router.", "frontend."), "{front}"),
    (("prefill.api.", "prefill.worker."), "prefill {server}"),
    (("decode.api.", "decode.worker."), "decode {server}"),
    (("aggregated.api.", "aggregated.worker.", "engine.worker."), "engine {server}"),
    (("prefill.", "kv.serialize"), "prefill EngineCore"),
    (("engine.",), "EngineCore"),
    (("decode.", "kv."), "decode EngineCore"),
]


def process_of(leg: str, chain: str | None = None) -> str:
    """The process (in words) a leg's time is spent in, for the waterfall's rows."""
    lid = leg.removeprefix(LEG_PREFIX)
    dynamo = bool(chain and chain.startswith("dynamo"))
    front = "Dynamo frontend" if dynamo else "router"
    server = "worker (Dynamo handler)" if dynamo else "API server"
    for prefixes, row in _PROCESS:
        if lid.startswith(prefixes):
            return row.format(front=front, server=server)
    stage = leg_stage(lid, chain)
    return {"client": "client", "router": front}.get(stage, "other")
