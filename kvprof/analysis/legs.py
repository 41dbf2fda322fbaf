"""The legs of TTFT: milestones on a request's path, and the time between consecutive ones.

A request's TTFT as the client measures it runs from "client sent" to "client got the first
bytes". On the way it passes milestones, each the start or end of a span some process wrote
(the router's, each engine's API server, EngineCore and worker, NVIDIA Dynamo's). A *chain*
lists them in the order a request meets them; a *leg* is the time between two consecutive
milestones and is named after what happens in between ("decode: waiting for a step boundary
to start the KV load"). Consecutive differences add up exactly, so legs + unaccounted = TTFT
by construction; what makes time *unaccounted* is a milestone that should be there and is not
(no router spans, a hook missing in this vLLM) or that lies out of order: the legs around it
merge into one unaccounted segment that says which milestones were missing.

Milestones are *required* (their absence is a gap in the account), *optional* (a phase not
every request has: the NIXL handshake on first contact only, staging copies) or part of a
*group* that is required as soon as any member is present (the KV-pull milestones exist only
for connectors that pull). An optional group is kept only where it fits in time between the
milestones around it; the same span can sit at two places of a chain (a deserialize copy
after the transfer on a GPU, inside the first step for a file connector) and lands where it
fits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from kvprof import semconv as sc

if TYPE_CHECKING:
    import numpy as np

CLIENT = "@client"  # pseudo span of the aiperf record: edges "send" and "first"
DYNAMO_FIRST = "@dynamo.first_token"  # http-request start + its ttft_ms attribute


@dataclass(frozen=True)
class Milestone:
    """One point on a request's path: the first available of ``sources`` (slot, edge)."""

    id: str
    sources: tuple[tuple[str, str], ...]
    event: str  # what happened here, in words ("prefill API server received the request")
    leg: str  # the leg that ends here, from the previous milestone of the chain
    stage: str  # the stage of the path the leg belongs to (see STAGES)
    group: str | None = None  # milestones of a group are required once any is present
    optional: bool = False  # may be absent or out of place without leaving a gap


def _api(side: str, name: str) -> str:
    return f"{name}@{side}"


def _m(id_: str, sources, event: str, leg: str, stage: str, group: str | None = None,
       optional: bool = False) -> Milestone:
    return Milestone(id_, tuple(sources), event, leg, stage, group, optional)


# Stages group legs in a serving engineer's terms; the verdict speaks in stages.
STAGES = {
    "client": "client <-> router/frontend",
    "router": "router/frontend",
    "prefill.intake": "prefill engine intake (HTTP, tokenize, hand-off to its EngineCore)",
    "prefill.queue": "prefill scheduler queue",
    "prefill.compute": "prefill compute",
    "prefill.response": "prefill response back to the router",
    "decode.intake": "decode engine intake (HTTP, tokenize, hand-off to its EngineCore)",
    "kv.wait": "decode waits for a step boundary to start the KV load",
    "kv.handshake": "NIXL handshake (first contact)",
    "kv.transfer": "KV transfer",
    # The transfer split by NIXL's own telemetry (issue 19): where it is measured, the
    # kv.transfer stage holds only the notice (NIXL done -> the worker reported it).
    "kv.post": "KV transfer: load started -> handed to NIXL",
    "kv.wire": "KV on the wire (NIXL's own measurement)",
    "kv.copy": "KV staging copies (serialize / deserialize)",
    "kv.ready": "KV loaded -> scheduled (step boundaries)",
    "decode.compute": "decode first token",
    "decode.response": "decode first token -> router/frontend",
    "engine.intake": "engine intake (HTTP, tokenize, hand-off to its EngineCore)",
    "engine.queue": "scheduler queue",
    "engine.compute": "prefill compute (first token)",
    "engine.response": "first token -> first bytes out",
    # Coarse stages: legs bounded only by NVIDIA Dynamo's and vLLM's own spans and records,
    # where kvprof's probes did not run (kvprof.analysis.coarse).
    "coarse.frontend": "Dynamo frontend and request plane (coarse)",
    "coarse.prefill.queue": "prefill worker intake and queue (coarse)",
    "coarse.prefill": "prefill worker (coarse)",
    "coarse.handoff": "prefill -> decode hand-off as Dynamo/vLLM bound it (coarse)",
    "coarse.decode": "decode worker to the first token (coarse)",
}
UNACCOUNTED = "unaccounted"

# -- milestones ------------------------------------------------------------------------------
CLIENT_SEND = _m("client.send", [(CLIENT, "send")], "the client sent the request", "", "client")
ROUTER_RECV = _m("router.recv", [(sc.SPAN_ROUTER_REQUEST, "start")],
                 "the router received it", "client -> router (connect, upload)", "client")
ROUTER_P_SEND = _m("router.prefill.send", [(sc.SPAN_ROUTER_PREFILL, "start")],
                   "the router called the prefill engine", "router: before the prefill call",
                   "router")


def _engine_intake(side: str, stage: str, who: str) -> list[Milestone]:
    return [
        _m(f"{side}.api.recv", [(_api(side, sc.SPAN_API_REQUEST), "start")],
           f"the {who} API server received it", f"router -> {who} API server (HTTP)", stage),
        _m(f"{side}.api.input", [(_api(side, sc.SPAN_API_INPUT), "end"),
                                 (_api(side, sc.SPAN_API_TO_CORE), "start")],
           f"the {who} API server validated and tokenized it",
           f"{who} API server: HTTP body, validation, tokenization", stage),
        _m(f"{side}.api.handoff", [(_api(side, sc.SPAN_API_TO_CORE), "end")],
           f"the {who} API server handed it to its EngineCore",
           f"{who} API server: input processing, hand-off to the EngineCore", stage),
    ]


def _engine_output(side: str, stage: str, who: str, done_leg: str) -> list[Milestone]:
    return [
        _m(f"{side}.api.output", [(_api(side, sc.SPAN_API_WAIT), "end"),
                                  (_api(side, sc.SPAN_API_RESPOND), "start")],
           f"the {who} API server got the first output",
           f"{who} EngineCore -> API server (output)", stage),
        _m(f"{side}.api.answered", [(_api(side, sc.SPAN_API_RESPOND), "end")],
           f"the {who} API server answered", done_leg, stage),
    ]


P, D, A = sc.ROLE_PREFILL, sc.ROLE_DECODE, sc.ROLE_AGGREGATED

DISAGG_CHAIN: tuple[Milestone, ...] = (
    CLIENT_SEND, ROUTER_RECV, ROUTER_P_SEND,
    *_engine_intake(P, "prefill.intake", "prefill"),
    _m("prefill.core.arrive", [(sc.SPAN_PREFILL_QUEUE, "start")],
       "the prefill EngineCore got it",
       "prefill API server -> EngineCore (IPC; the core finishes its current step)",
       "prefill.intake"),
    _m("prefill.scheduled", [(sc.SPAN_PREFILL_QUEUE, "end"), (sc.SPAN_PREFILL_COMPUTE, "start")],
       "the prefill scheduler scheduled it", "prefill scheduler queue", "prefill.queue"),
    _m("prefill.first_token", [(sc.SPAN_PREFILL_COMPUTE, "end")],
       "the prefill engine computed the first token", "prefill compute (to the first token)",
       "prefill.compute"),
    _m("kv.serialize.start", [(sc.SPAN_KV_SERIALIZE, "start")], "KV serialize started",
       "first token -> KV serialize starts", "kv.copy", group="serialize", optional=True),
    _m("kv.serialize.end", [(sc.SPAN_KV_SERIALIZE, "end")], "KV serialize done",
       "KV serialize (staging copy)", "kv.copy", group="serialize", optional=True),
    *_engine_output(P, "prefill.response", "prefill", "prefill API server: response built "
                    "and sent"),
    _m("router.prefill.done", [(sc.SPAN_ROUTER_PREFILL, "end")],
       "the router had the prefill response", "prefill engine -> router (response)",
       "prefill.response"),
    _m("router.decode.send", [(sc.SPAN_ROUTER_DECODE, "start")],
       "the router called the decode engine",
       "router: between the prefill answer and the decode call", "router"),
    *_engine_intake(D, "decode.intake", "decode"),
    _m("decode.core.arrive", [(sc.SPAN_DECODE_KV_WAIT, "start"), (sc.SPAN_DECODE_QUEUE, "start")],
       "the decode EngineCore got it",
       "decode API server -> EngineCore (IPC; the core finishes its current step)",
       "decode.intake"),
    _m("kv.load.start", [(sc.SPAN_KV_HANDSHAKE, "start"), (sc.SPAN_KV_TRANSFER, "start")],
       "the decode worker started the KV load",
       "decode: waiting for a step boundary to start the KV load", "kv.wait", group="pull"),
    _m("kv.handshake.end", [(sc.SPAN_KV_HANDSHAKE, "end")], "the NIXL handshake finished",
       "NIXL handshake (first contact with this prefill engine)", "kv.handshake",
       group="handshake", optional=True),
    _m("kv.posted", [(sc.SPAN_KV_WIRE, "start")], "NIXL started the KV read",
       "KV transfer: load started -> handed to NIXL", "kv.post", group="xfersplit",
       optional=True),
    _m("kv.wire.end", [(sc.SPAN_KV_WIRE, "end")], "NIXL saw the KV read done",
       "KV on the wire (NIXL's own measurement)", "kv.wire", group="xfersplit",
       optional=True),
    _m("kv.transfer.end", [(sc.SPAN_KV_TRANSFER, "end")], "the KV transfer finished",
       "KV transfer (where NIXL's telemetry splits it: NIXL done -> the decode worker "
       "reported it)", "kv.transfer", group="pull"),
    _m("kv.deserialize.start", [(sc.SPAN_KV_DESERIALIZE, "start")], "KV deserialize started",
       "KV transfer -> deserialize starts", "kv.copy", group="deserialize", optional=True),
    _m("kv.deserialize.end", [(sc.SPAN_KV_DESERIALIZE, "end")], "KV deserialize done",
       "KV deserialize (staging copy)", "kv.copy", group="deserialize", optional=True),
    _m("kv.ready", [(sc.SPAN_DECODE_KV_WAIT, "end")], "the decode scheduler saw the KV ready",
       "KV loaded -> the decode scheduler sees it (next step boundary)", "kv.ready",
       group="pull"),
    _m("decode.scheduled", [(sc.SPAN_DECODE_QUEUE, "end"),
                            (sc.SPAN_DECODE_FIRST_TOKEN, "start")],
       "the decode scheduler scheduled it", "decode scheduler queue", "kv.ready"),
    _m("kv.read.start", [(sc.SPAN_KV_DESERIALIZE, "start")], "the KV read started",
       "step start -> KV read starts", "kv.copy", group="read", optional=True),
    _m("kv.read.end", [(sc.SPAN_KV_DESERIALIZE, "end")], "the KV read finished",
       "KV read and inject (file connector)", "kv.copy", group="read", optional=True),
    _m("decode.first_token", [(sc.SPAN_DECODE_FIRST_TOKEN, "end")],
       "the decode engine computed the first token", "decode: first token computed",
       "decode.compute"),
    *_engine_output(D, "decode.response", "decode",
                    "decode API server: detokenize, first bytes written"),
    _m("router.first.read", [(sc.SPAN_ROUTER_FIRST_BYTE, "start")],
       "the router read the first bytes", "decode API server -> router (first bytes)",
       "decode.response"),
    _m("router.first.write", [(sc.SPAN_ROUTER_FIRST_BYTE, "end")],
       "the router wrote the first bytes", "router: forwards the first bytes",
       "decode.response"),
    _m("client.first", [(CLIENT, "first")], "the client got the first bytes",
       "router -> client (first bytes arrive; the client's own reading included)", "client"),
)

AGGREGATED_CHAIN: tuple[Milestone, ...] = (
    CLIENT_SEND,
    _m("router.recv", [(sc.SPAN_ROUTER_REQUEST, "start")], "a router received it",
       "client -> router", "client", group="router", optional=True),
    *_engine_intake(A, "engine.intake", "engine"),
    _m("engine.core.arrive", [(sc.SPAN_PREFILL_QUEUE, "start")], "the EngineCore got it",
       "API server -> EngineCore (IPC; the core finishes its current step)", "engine.intake"),
    _m("engine.scheduled", [(sc.SPAN_PREFILL_QUEUE, "end"), (sc.SPAN_PREFILL_COMPUTE, "start")],
       "the scheduler scheduled it", "scheduler queue", "engine.queue"),
    _m("engine.first_token", [(sc.SPAN_PREFILL_COMPUTE, "end")],
       "the engine computed the first token", "prefill compute (to the first token)",
       "engine.compute"),
    *_engine_output(A, "engine.response", "engine",
                    "API server: detokenize, first bytes written"),
    _m("router.first.write", [(sc.SPAN_ROUTER_FIRST_BYTE, "end")],
       "a router wrote the first bytes", "API server -> router -> client", "engine.response",
       group="router", optional=True),
    _m("client.first", [(CLIENT, "first")], "the client got the first bytes",
       "first bytes reach the client (the client's own reading included)", "client"),
)


# NVIDIA Dynamo: its frontend (HTTP, tokenization, routing) replaces the router, and each
# worker hosts AsyncLLM directly (no vLLM API server: the API spans start at add_request).
# Dynamo's spans are numbered by start within a request: route_request #1 / handle_payload
# #1 are the prefill worker's, #2 the decode worker's.
_ROUTE1, _ROUTE2 = sc.DYNAMO_ROUTE + "#1", sc.DYNAMO_ROUTE + "#2"
_HANDLE1, _HANDLE2 = sc.DYNAMO_HANDLE + "#1", sc.DYNAMO_HANDLE + "#2"


def _worker_intake(side: str, stage: str, who: str) -> list[Milestone]:
    return [
        _m(f"{side}.api.input", [(_api(side, sc.SPAN_API_TO_CORE), "start")],
           f"the {who} worker called AsyncLLM", f"{who} worker: Dynamo handler -> AsyncLLM",
           stage),
        _m(f"{side}.api.handoff", [(_api(side, sc.SPAN_API_TO_CORE), "end")],
           f"the {who} worker handed it to its EngineCore",
           f"{who} worker: input processing, hand-off to the EngineCore", stage),
    ]


def _worker_words(m: Milestone) -> Milestone:
    """A vLLM-chain milestone as a Dynamo worker sees it (no API server there)."""
    return replace(m, leg=m.leg.replace("API server", "worker"))


def _engine_core(prefill: tuple[Milestone, ...]) -> tuple[Milestone, ...]:
    """The prefill engine's own milestones, shared by the vLLM and Dynamo chains."""
    return tuple(_worker_words(m) for m in prefill if m.id in (
        "prefill.core.arrive", "prefill.scheduled", "prefill.first_token",
        "kv.serialize.start", "kv.serialize.end"))


def _decode_core() -> tuple[Milestone, ...]:
    start = next(i for i, m in enumerate(DISAGG_CHAIN) if m.id == "decode.core.arrive")
    stop = next(i for i, m in enumerate(DISAGG_CHAIN) if m.id == "decode.first_token")
    return tuple(_worker_words(m) for m in DISAGG_CHAIN[start:stop + 1])


DYNAMO_FRONTEND = _m("frontend.recv", [(sc.DYNAMO_HTTP_REQUEST, "start")],
                     "the Dynamo frontend received it", "client -> Dynamo frontend "
                     "(connect, upload)", "client")
DYNAMO_FIRST_TOKEN = _m("frontend.first_token", [(DYNAMO_FIRST, "at")],
                        "the Dynamo frontend had the first token",
                        "worker -> Dynamo frontend (first token)", "decode.response")
DYNAMO_CLIENT_FIRST = _m("client.first", [(CLIENT, "first")], "the client got the first bytes",
                         "Dynamo frontend -> client (first bytes arrive; the client's own "
                         "reading included)", "client")

DYNAMO_DISAGG_CHAIN: tuple[Milestone, ...] = (
    CLIENT_SEND, DYNAMO_FRONTEND,
    _m("frontend.route.prefill", [(_ROUTE1, "start")], "the frontend routed it to prefill",
       "frontend: preprocessing and tokenization before routing", "router"),
    _m("prefill.worker.recv", [(_HANDLE1, "start")], "the prefill worker's handler got it",
       "frontend -> prefill worker (request plane)", "prefill.intake"),
    *_worker_intake(P, "prefill.intake", "prefill"),
    *_engine_core(DISAGG_CHAIN),
    _m("prefill.api.output", [(_api(P, sc.SPAN_API_WAIT), "end")],
       "the prefill worker got the first output", "prefill EngineCore -> worker (output)",
       "prefill.response"),
    # Optional: the frontend may route to decode on the prefill answer's last message, a
    # moment before the prefill worker's handler span closes.
    _m("prefill.worker.done", [(_HANDLE1, "end")], "the prefill worker's handler returned",
       "prefill worker: output back through Dynamo", "prefill.response", optional=True),
    _m("frontend.route.decode", [(_ROUTE2, "start")], "the frontend routed it to decode",
       "frontend: between the prefill answer and routing to decode", "router"),
    _m("decode.worker.recv", [(_HANDLE2, "start")], "the decode worker's handler got it",
       "frontend -> decode worker (request plane)", "decode.intake"),
    *_worker_intake(D, "decode.intake", "decode"),
    *_decode_core(),
    _m("decode.api.output", [(_api(D, sc.SPAN_API_WAIT), "end")],
       "the decode worker got the first output", "decode EngineCore -> worker (output)",
       "decode.response"),
    DYNAMO_FIRST_TOKEN, DYNAMO_CLIENT_FIRST,
)

DYNAMO_AGGREGATED_CHAIN: tuple[Milestone, ...] = (
    CLIENT_SEND, DYNAMO_FRONTEND,
    _m("frontend.route", [(_ROUTE1, "start")], "the frontend routed it to a worker",
       "frontend: preprocessing and tokenization before routing", "router"),
    _m("engine.worker.recv", [(_HANDLE1, "start")], "the worker's handler got it",
       "frontend -> worker (request plane)", "engine.intake"),
    *_worker_intake(A, "engine.intake", "engine"),
    *(_worker_words(m) for m in AGGREGATED_CHAIN if m.id in (
        "engine.core.arrive", "engine.scheduled", "engine.first_token")),
    _m("engine.api.output", [(_api(A, sc.SPAN_API_WAIT), "end")],
       "the worker got the first output", "EngineCore -> worker (output)", "engine.response"),
    DYNAMO_FIRST_TOKEN, DYNAMO_CLIENT_FIRST,
)

CHAINS = {"disaggregated": DISAGG_CHAIN, "aggregated": AGGREGATED_CHAIN,
          "dynamo disaggregated": DYNAMO_DISAGG_CHAIN,
          "dynamo aggregated": DYNAMO_AGGREGATED_CHAIN}


def chain_slots(chain: tuple[Milestone, ...]) -> set[str]:
    """Every slot (span name, or name@role) a chain reads."""
    return {slot for m in chain for slot, _ in m.sources}


@dataclass
class LegTable:
    """Per request (rows) and leg (columns, in chain order): milliseconds, NaN = no leg."""

    chain: tuple[Milestone, ...]
    legs_ms: np.ndarray  # (n_requests, n_milestones): leg ending at milestone j
    unaccounted_ms: np.ndarray  # (n_requests,)
    gaps: list[list[str]]  # per request: the unaccounted segments, in words
    first_ns: np.ndarray  # first kept milestone time (reference clock), NaN if none
    last_ns: np.ndarray
    kept: np.ndarray  # (n, m) bool: milestone kept


def compute_legs(times: np.ndarray, chain: tuple[Milestone, ...],
                 ttft_ms: np.ndarray | None = None) -> LegTable:
    """Legs of each request from its milestone times (ns on one clock, NaN = absent).

    ``ttft_ms``: the client's TTFT when known; unaccounted = TTFT - sum of named legs (the
    span between the first and last milestone when the client's is not known).
    """
    import numpy as np

    n, m = times.shape
    present = ~np.isnan(times)
    required = np.zeros((n, m), dtype=bool)
    for j, ms in enumerate(chain):
        if ms.optional:
            continue
        if ms.group is None:
            required[:, j] = True
        else:
            members = [k for k, x in enumerate(chain) if x.group == ms.group]
            required[:, j] = present[:, members].any(axis=1)
    # Pass 1: required milestones in chain order; one earlier than the last kept is dropped.
    kept = np.zeros((n, m), dtype=bool)
    last = np.full(n, -np.inf)
    for j in range(m):
        ok = present[:, j] & required[:, j] & (times[:, j] >= last)
        kept[:, j] = ok
        last = np.where(ok, times[:, j], last)
    # Pass 2: optional milestones, a group at a time (a lone one is its own group), kept
    # only where every present member fits between the kept milestones around it.
    optional_groups: dict[str, list[int]] = {}
    for j, ms in enumerate(chain):
        if ms.optional:
            optional_groups.setdefault(ms.group or f"#{j}", []).append(j)
    for idx in optional_groups.values():
        # Only the requests that have one of the group's milestones (a handshake: first
        # contacts only); the others keep none of it, as pass 1 left them.
        rows = np.flatnonzero(present[:, idx].any(axis=1))
        if not len(rows):
            continue
        cand, t_r, k_r = present[np.ix_(rows, idx)], times[rows], kept[rows]
        fits = np.ones(len(rows), dtype=bool)
        run = np.full(len(rows), -np.inf)
        for c, j in enumerate(idx):
            col = np.where(cand[:, c], t_r[:, j], np.nan)
            inside = (col >= _kept_before(t_r, k_r, j)) & (col <= _kept_after(t_r, k_r, j))
            fits &= ~cand[:, c] | (inside & (col >= run))
            run = np.where(cand[:, c], col, run)
        for c, j in enumerate(idx):
            kept[rows, j] = fits & cand[:, c]
    # Legs: kept milestone j minus the kept one before it.
    legs = np.full((n, m), np.nan)
    unacc = np.zeros(n)
    gaps: list[list[str]] = [[] for _ in range(n)]
    prev_t = np.full(n, np.nan)
    prev_j = np.full(n, -1)
    missing_req = np.zeros(n, dtype=np.int64)  # required milestones skipped since prev kept
    first = np.full(n, np.nan)
    skipped = required & ~kept
    for j in range(m):
        k = kept[:, j]
        delta = times[:, j] - prev_t
        named = k & (prev_j >= 0) & (missing_req == 0)
        coarse = k & (prev_j >= 0) & (missing_req > 0)
        legs[named, j] = delta[named] / 1e6
        unacc[coarse] += delta[coarse] / 1e6
        _coarse_gaps(gaps, np.flatnonzero(coarse), j, prev_j, delta, skipped, chain)
        first = np.where(np.isnan(first) & k, times[:, j], first)
        missing_req = np.where(k, 0, missing_req + (required[:, j] & ~k))
        prev_t = np.where(k, times[:, j], prev_t)
        prev_j = np.where(k, j, prev_j)
    last_t = prev_t
    if ttft_ms is not None:
        named_sum = np.nansum(legs, axis=1)
        has_ttft = ~np.isnan(ttft_ms)
        unacc = np.where(has_ttft, ttft_ms - named_sum, unacc)
        edge = has_ttft & ~(kept[:, 0] & kept[:, -1])
        rows = np.flatnonzero(edge & (np.abs(unacc - 0.0) > 0))
        # Which ends are missing: one of three sentences, picked per row.
        words = {(a, b): "the client's TTFT spans more than the traced milestones (missing: "
                 + "; ".join(chain[x].event for x, k in ((0, a), (m - 1, b)) if not k) + ")"
                 for a in (False, True) for b in (False, True)}
        for i, a, b in zip(rows.tolist(), kept[rows, 0].tolist(), kept[rows, -1].tolist(),
                           strict=True):
            gaps[i].append(words[(a, b)])
    return LegTable(chain, legs, unacc, gaps, first, last_t, kept)


def _coarse_gaps(gaps: list[list[str]], rows: np.ndarray, j: int, prev_j: np.ndarray,
                 delta: np.ndarray, skipped: np.ndarray, chain: tuple[Milestone, ...]) -> None:
    """Append "N ms between A and B (missing: ...)" to each row's gaps: the words are built
    once per distinct (previous milestone, skipped milestones), since a scenario's requests
    mostly miss the same milestones; only the number is per row."""
    import numpy as np

    if not len(rows):
        return
    cols = np.arange(skipped.shape[1])
    prev = prev_j[rows]
    window = skipped[rows] & (cols > prev[:, None]) & (cols < j)
    if len(cols) <= 56:
        # One int64 per row: the skipped milestones as bits, the previous one in the low 6.
        code = (window.astype(np.int64) @ (np.int64(64) << cols.astype(np.int64))) + prev
        uniq_code, which = np.unique(code, return_inverse=True)
        uniq = [(int(c) & 63, [x for x in cols if int(c) >> 6 & (1 << int(x))])
                for c in uniq_code]
    else:  # a chain this long does not exist today; rows as keys (slower, same words)
        pattern = np.column_stack([prev, window]).astype(np.int64)
        rows_u, which = np.unique(pattern, axis=0, return_inverse=True)
        uniq = [(int(u[0]), list(np.flatnonzero(u[1:]))) for u in rows_u]
    words = [f" ms between '{chain[p].event}' and '{chain[j].event}' (missing: "
             + "; ".join(chain[x].event for x in missing) + ")" for p, missing in uniq]
    for i, d, w in zip(rows.tolist(), (delta[rows] / 1e6).tolist(), which.ravel().tolist(),
                       strict=True):
        gaps[i].append(f"{d:.1f}{words[w]}")


def _kept_before(times: np.ndarray, kept: np.ndarray, j: int) -> np.ndarray:
    import numpy as np

    if j == 0:
        return np.full(times.shape[0], -np.inf)
    sub = np.where(kept[:, :j], times[:, :j], -np.inf)
    return sub.max(axis=1)


def _kept_after(times: np.ndarray, kept: np.ndarray, j: int) -> np.ndarray:
    import numpy as np

    if j + 1 >= times.shape[1]:
        return np.full(times.shape[0], np.inf)
    sub = np.where(kept[:, j + 1:], times[:, j + 1:], np.inf)
    return sub.min(axis=1)
