"""A discrete-event model of a deployment: frontend, prefill/decode/aggregated engines, links.

One event queue ordered by time (``heapq``); a closed-loop client like aiperf's concurrency mode
(C users, each sends its next request when the previous one finishes); each engine runs
continuous batching under a max batch and a token budget, one step at a time, its step time
from a ``StepCost``; a disaggregated request's KV crosses the decode worker's link (one FIFO
transfer at a time, so transfers queue when the link is busy) after a NIXL handshake the first
time a prefill -> decode pair meets. Everything the engines do not model (HTTP, frontend,
API-server and response legs) is a per-request overhead drawn from the calibration's samples.

Engines hold KV blocks (a prefill engine until the decode side has pulled them) when their
cache size is known. Not modelled (said so in the report): preemption, chunked prefill of one
request over several steps, CPU contention between processes that share cores beyond what
the calibration level nearest the predicted one measured.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from dataclasses import dataclass, field, replace

from kvprof.errors import BadInputError, UsageError

PREFILL, DECODE, AGGREGATED = "prefill", "decode", "aggregated"
ROLES = (PREFILL, DECODE, AGGREGATED)


@dataclass(frozen=True)
class StepCost:
    """One engine step's duration: base + per prefill token + per sequence decoded."""

    base_ms: float
    per_prefill_token_ms: float = 0.0
    per_decode_seq_ms: float = 0.0

    def step_ms(self, prefill_tokens: int, decode_seqs: int) -> float:
        return (self.base_ms + self.per_prefill_token_ms * prefill_tokens
                + self.per_decode_seq_ms * decode_seqs)


@dataclass(frozen=True)
class WorkerGroup:
    """``count`` identical engines of one role (each ``tp`` GPUs, a label for the tables)."""

    role: str
    count: int
    cost: StepCost
    tp: int = 1
    max_batch: int = 256
    token_budget: int = 8192
    # KV cache: None = unbounded. A prefill engine holds a request's blocks until the decode
    # side has pulled them (kv.hold); decode and aggregated engines hold them while it runs.
    kv_blocks: int | None = None
    block_tokens: int = 16

    def blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)


@dataclass(frozen=True)
class Link:
    """The KV path into each decode worker: fixed cost + bytes at a rate, then a handshake."""

    gbytes_per_s: float | None  # None: transfers take their calibrated fixed time only
    handshake_ms: float = 0.0
    prewarmed: bool = False  # the NIXL handshake of every pair done before the first request

    def wire_ms(self, kv_bytes: float) -> float:
        if not self.gbytes_per_s or not kv_bytes:
            return 0.0
        return kv_bytes / (self.gbytes_per_s * 1e9) * 1e3


@dataclass(frozen=True)
class Overheads:
    """What one request spends outside the modelled queues, in ms: before its engine (in),
    between prefill and the KV transfer (mid), the transfer's fixed part (post + notice), and
    after the first token (out). One sample per calibration request, drawn together."""

    samples: tuple[tuple[float, float, float, float], ...]
    # The same samples per calibration level: a level draws from the nearest one (on a log
    # scale), since what the engines do not model (CPU contention, an idle engine's slow
    # polling) changes with load too.
    by_level: tuple[tuple[int, tuple[tuple[float, float, float, float], ...]], ...] = ()

    def draw(self, rng: random.Random) -> tuple[float, float, float, float]:
        return self.samples[rng.randrange(len(self.samples))] if self.samples else (0, 0, 0, 0)

    def for_level(self, concurrency: int) -> Overheads:
        if not self.by_level:
            return self
        near = min(self.by_level, key=lambda lv: (abs(math.log(lv[0] / concurrency)), -lv[0]))
        return Overheads(near[1])


@dataclass(frozen=True)
class Deployment:
    """Worker groups plus the link and overheads; aggregated or disaggregated, not both."""

    groups: tuple[WorkerGroup, ...]
    link: Link = Link(None)
    overheads: Overheads = Overheads(())
    kv_bytes_per_token: float = 0.0
    router: str = "round_robin"  # or "least_loaded"
    name: str = ""
    # (level, {role: StepCost}) per calibration level: engines on shared cores run the same
    # batch faster or slower as the load changes, so a level runs with the costs seen
    # nearest to it. Empty: the groups' own costs at every level.
    costs_by_level: tuple = ()
    # Measured step time over fitted step time, one per calibration step: each simulated
    # step draws one, so steps vary as the real ones did (their slow tail included).
    step_ratios: tuple[float, ...] = ()
    # The same per role (prefill / decode / aggregated), when calibrated per role: a role's
    # steps draw from their own ratios (a decode step's tail is not a prefill step's).
    step_ratios_by_role: tuple[tuple[str, tuple[float, ...]], ...] = ()

    def group(self, role: str) -> WorkerGroup | None:
        return next((g for g in self.groups if g.role == role and g.count > 0), None)

    @property
    def disaggregated(self) -> bool:
        return self.group(PREFILL) is not None

    def gpus(self) -> int:
        return sum(g.count * g.tp for g in self.groups)

    def label(self) -> str:
        if self.name:
            return self.name
        return " + ".join(f"{g.count} {g.role} TP{g.tp}" for g in self.groups if g.count)

    def validate(self) -> None:
        """Raise UsageError for a deployment no engine could serve."""
        for g in self.groups:
            if g.role not in ROLES:
                raise UsageError(f"unknown worker role {g.role!r}",
                                 hint=f"Use one of {', '.join(ROLES)}.")
            if g.count < 0 or g.max_batch < 1 or g.token_budget < 1 or g.tp < 1:
                raise UsageError(f"{g.role} workers: count, TP, max batch and token budget must "
                                 "be positive", hint="Give at least 1 for each.")
        p, d, a = self.group(PREFILL), self.group(DECODE), self.group(AGGREGATED)
        if not (p or d or a):
            raise UsageError("the deployment has zero workers",
                             hint="Give --aggregated N, or --prefill N with --decode M "
                             "(N, M >= 1).")
        if a and (p or d):
            raise UsageError("a deployment is either aggregated or disaggregated, not both",
                             hint="Model them as two deployments (two runs of kvprof whatif).")
        if bool(p) != bool(d):
            missing = DECODE if p else PREFILL
            raise UsageError(f"a disaggregated deployment needs {missing} workers too",
                             hint="Give both --prefill N and --decode M (each >= 1).")


@dataclass(frozen=True)
class Load:
    """One aiperf level: C users in a closed loop, ``requests`` measured after ``warmup``."""

    concurrency: int
    requests: int
    isl: tuple[int, ...]  # per request, cycled
    osl: tuple[int, ...]
    warmup: int = 0
    # Open loop instead (aiperf --request-rate): Poisson arrivals at this rate, users unbounded.
    arrival_rate_per_s: float | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.requests < 1 or not self.isl or not self.osl:
            raise BadInputError(f"load at concurrency {self.concurrency}: needs >= 1 user, "
                                ">= 1 request and token lengths",
                                hint="Check the aiperf records (concurrency, isl, osl).")


@dataclass
class _Req:
    rid: int
    user: int
    isl: int
    osl: int
    sent: float
    warmup: bool
    overhead: tuple[float, float, float, float]
    remaining: int = 0
    first_token: float = math.nan
    prefill_worker: int = -1
    queued_ms: float = 0.0
    # Where its time went, in ms per simulated leg (LEGS), for the per-leg comparison.
    legs: dict = field(default_factory=dict)
    mark: float = 0.0  # when the current leg began


@dataclass
class _Engine:
    role: str
    index: int
    group: WorkerGroup
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    busy: bool = False
    outstanding: int = 0
    busy_ms: float = 0.0
    steps: int = 0
    kv_used: int = 0

    def kv_fits(self, need: int) -> bool:
        # An engine with nothing in its cache takes any request (vLLM would chunk or fail).
        cap = self.group.kv_blocks
        return cap is None or self.kv_used + need <= cap or self.kv_used == 0


@dataclass
class RequestResult:
    """One simulated request (times in ms from the level's start)."""

    concurrency: int
    isl: int
    osl: int
    sent_ms: float
    ttft_ms: float
    latency_ms: float
    warmup: bool
    legs: dict = field(default_factory=dict)


@dataclass
class SimResult:
    """Per-request results and per-engine busy time of one simulated level."""

    concurrency: int
    requests: list[RequestResult]
    duration_ms: float
    busy_fraction: dict[str, float]

    def ttft(self) -> list[float]:
        return [r.ttft_ms for r in self.requests if not r.warmup]


class Simulator:
    """Runs one deployment through loads in order; NIXL pair warmth persists across levels
    (the real engines stay up between aiperf levels)."""

    def __init__(self, deployment: Deployment, seed: int = 0) -> None:
        deployment.validate()
        self.dep = deployment
        self.rng = random.Random(seed)
        self.warm_pairs: set[tuple[int, int]] = set()

    def run(self, load: Load) -> SimResult:
        dep = self.dep
        if dep.costs_by_level:
            # Step costs measured at the calibration level nearest this one (log scale).
            near = min(dep.costs_by_level,
                       key=lambda lv: (abs(math.log(lv[0] / load.concurrency)), -lv[0]))[1]
            dep = replace(dep, groups=tuple(replace(g, cost=near.get(g.role, g.cost))
                                            for g in dep.groups))
        ratios_of = dict(dep.step_ratios_by_role)
        engines = {role: [_Engine(role, i, g) for i in range(g.count)]
                   for role in ROLES if (g := dep.group(role))}
        link_free = [0.0] * (len(engines.get(DECODE, [])))
        heap: list = []
        seq = itertools.count()
        rr = {role: itertools.cycle(range(len(es))) for role, es in engines.items()}
        done: list[RequestResult] = []
        total = load.warmup + load.requests
        overheads = dep.overheads.for_level(load.concurrency)
        sent = itertools.count()
        now = 0.0

        def push(t: float, kind: str, *payload) -> None:
            heapq.heappush(heap, (t, next(seq), kind, payload))

        def pick(role: str) -> _Engine:
            es = engines[role]
            if dep.router == "least_loaded":
                return min(es, key=lambda e: (e.outstanding, e.index))
            return es[next(rr[role])]

        def send(user: int, t: float) -> None:
            n = next(sent)
            if n >= total:
                return
            r = _Req(n, user, int(load.isl[n % len(load.isl)]), int(load.osl[n % len(load.osl)]),
                     t, n < load.warmup, overheads.draw(self.rng))
            first = pick(PREFILL if dep.disaggregated else AGGREGATED)
            first.outstanding += 1
            push(t + r.overhead[0], "arrive", first, r)

        def try_start(e: _Engine, t: float) -> None:
            if e.busy:
                return
            g = e.group
            admitted: list[_Req] = []
            tokens = 0
            if e.role == PREFILL:
                while e.waiting and len(admitted) < g.max_batch:
                    nxt = e.waiting[0]
                    if admitted and tokens + nxt.isl > g.token_budget:
                        break
                    if not e.kv_fits(g.blocks(nxt.isl + 1)):
                        break  # FCFS: the head waits for blocks, the rest behind it
                    admitted.append(e.waiting.popleft())
                    e.kv_used += g.blocks(nxt.isl + 1)
                    tokens += nxt.isl
                decodes = 0
            else:
                # vLLM's scheduler: running sequences first, then waiting ones while the
                # batch and the token budget allow (a decode step costs one token each).
                decodes = len(e.running)
                budget = g.token_budget - decodes
                while e.waiting and decodes + len(admitted) < g.max_batch:
                    nxt = e.waiting[0]
                    need = nxt.isl if e.role == AGGREGATED else 1
                    if need > budget and (admitted or decodes):
                        break
                    if not e.kv_fits(g.blocks(nxt.isl + nxt.osl)):
                        break
                    admitted.append(e.waiting.popleft())
                    e.kv_used += g.blocks(nxt.isl + nxt.osl)
                    budget -= need
                    tokens += need if e.role == AGGREGATED else 0
                if e.role == DECODE:
                    decodes += len(admitted)
            if not admitted and not decodes:
                return
            dt = g.cost.step_ms(tokens, decodes)
            ratios = ratios_of.get(e.role) or dep.step_ratios
            if ratios:
                dt *= ratios[self.rng.randrange(len(ratios))]
            for r in admitted:
                r.legs[f"{e.role}.queue"] = t - r.mark
                r.legs[f"{e.role}.compute"] = dt
            e.busy, e.busy_ms, e.steps = True, e.busy_ms + dt, e.steps + 1
            push(t + dt, "step_end", e, admitted)

        def finish_token(r: _Req, t: float, e: _Engine) -> None:
            if math.isnan(r.first_token):
                r.first_token = t + r.overhead[3]
                r.remaining = max(r.osl - 1, 0)
            else:
                r.remaining -= 1

        def step_end(e: _Engine, admitted: list[_Req], t: float) -> None:
            e.busy = False
            if e.role == PREFILL:
                for r in admitted:
                    e.outstanding -= 1
                    d = pick(DECODE)
                    d.outstanding += 1
                    r.prefill_worker = e.index
                    push(t + r.overhead[1], "kv_start", d, r, e)
            else:
                # This step decoded the running ones and started the admitted ones.
                still = []
                for r in [*e.running, *admitted]:
                    finish_token(r, t, e)
                    if r.remaining > 0:
                        still.append(r)
                    else:
                        e.outstanding -= 1
                        e.kv_used -= g_blocks(e, r.isl + r.osl)
                        complete(r, t)
                e.running = still
            try_start(e, t)

        def complete(r: _Req, t: float) -> None:
            end = max(t + r.overhead[3], r.first_token)
            legs = {"in": r.overhead[0], **r.legs, "out": r.overhead[3]}
            if dep.disaggregated:
                legs.update({"mid": r.overhead[1], "kv.fixed": r.overhead[2]})
            done.append(RequestResult(load.concurrency, r.isl, r.osl, r.sent,
                                      r.first_token - r.sent, end - r.sent, r.warmup, legs))
            if not load.arrival_rate_per_s:
                send(r.user, end)

        def g_blocks(e: _Engine, tokens: int) -> int:
            return e.group.blocks(tokens)

        def kv_start(d: _Engine, r: _Req, t: float, p: _Engine) -> None:
            pair = (r.prefill_worker, d.index)
            handshake = 0.0
            if pair not in self.warm_pairs:
                self.warm_pairs.add(pair)
                handshake = 0.0 if dep.link.prewarmed else dep.link.handshake_ms
            start = max(t + handshake, link_free[d.index])
            wire = dep.link.wire_ms(r.isl * dep.kv_bytes_per_token)
            link_free[d.index] = start + wire
            r.legs.update({"kv.handshake": handshake, "kv.link_wait": start - t - handshake,
                           "kv.wire": wire})
            # The decode side has pulled the KV (its post, wire and notice all done): the
            # prefill engine frees the blocks it held meanwhile (kv.hold).
            push(start + wire + r.overhead[2], "kv_free", p, g_blocks(p, r.isl + 1))
            push(start + wire + r.overhead[2], "arrive", d, r)

        if load.arrival_rate_per_s:
            t = 0.0
            for u in range(total):
                send(u, t)
                t += self.rng.expovariate(load.arrival_rate_per_s) * 1e3
        else:
            for u in range(load.concurrency):
                send(u, 0.0)
        while heap:
            now, _, kind, payload = heapq.heappop(heap)
            if kind == "arrive":
                e, r = payload
                r.mark = now
                e.waiting.append(r)
                # Scheduled after everything else at this instant: arrivals at the same
                # time share the engine's next step, as they share vLLM's next schedule().
                push(now, "schedule", e)
            elif kind == "schedule":
                try_start(payload[0], now)
            elif kind == "step_end":
                step_end(payload[0], payload[1], now)
            elif kind == "kv_free":
                payload[0].kv_used -= payload[1]
                push(now, "schedule", payload[0])
            else:
                kv_start(payload[0], payload[1], now, payload[2])
        busy = {f"{e.role}[{e.index}]": (e.busy_ms / now if now else 0.0)
                for es in engines.values() for e in es}
        return SimResult(load.concurrency, done, now, busy)
