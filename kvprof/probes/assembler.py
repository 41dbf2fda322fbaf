"""Fold hot-path events into finished spans (plain records), one request at a time."""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from kvprof import semconv
from kvprof.probes import api_hooks as A
from kvprof.probes import events as ev
from kvprof.probes.ids import effective_trace, external_request_id, span_id_for, trace_id_for

log = logging.getLogger(__name__)

# A request whose closing event never comes (aborted mid-transfer, engine killed) is dropped
# after this long so a long-running engine does not grow without bound.
STALE_AFTER_NS = 600 * 1_000_000_000
# A finished transfer waits this long for the NIXL stats of its step before it is emitted
# without them.
STATS_WAIT_NS = 1_000_000_000
# ... and this long for its trace: the decode request reaches the worker (with the
# traceparent the prefill side named) only when it is scheduled, after its KV arrived.
TRACE_WAIT_NS = 5_000_000_000
# Engine step spans share one trace per this many steps of a process (a trace viewer copes).
STEPS_PER_TRACE = 1000


@dataclass
class SpanRecord:
    """One finished span, independent of any OpenTelemetry SDK object."""

    name: str
    trace_id: int
    span_id: int
    parent_id: int | None
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # set: the span ends with an error status and this reason


@dataclass
class _Request:
    req_id: str
    arrival: int | None = None  # the frontend's arrival_time (its clock)
    core_arrive: int | None = None  # when the scheduler got the request
    traceparent: str | None = None  # from the request's trace headers (the caller's trace)
    prompt_tokens: int | None = None
    params: dict | None = None
    scheduled: int | None = None
    step_start: int | None = None
    first_token: int | None = None
    kv_wait: int | None = None
    kv_ready: int | None = None
    hold: int | None = None
    emitted_first: bool = False
    finished: bool = False
    touched: int = 0
    error: str | None = None  # the request ended badly (aborted, errored)


@dataclass
class _Load:
    req_id: str
    start: int
    blocks: int
    remote_req: str | None
    remote_engine: str | None
    remote_host: str | None
    handshake: bool
    done: int | None = None
    ok: bool = True
    stats: tuple[int, int, float] | None = None
    stats_seen: bool = False  # the step's NIXL stats came (matched 1:1 or not)
    # NIXL's getXferTelemetry per finished handle: (wall - steady clock offset ns, start_us,
    # post_us, xfer_us, bytes, descriptors); the last worker poll that saw it in flight.
    telemetry: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    last_inflight_poll: int | None = None


@dataclass
class ProcessFacts:
    """What this process knows about its engine: connector, KV layout, role."""

    connector: str | None = None
    profile: str = "none"  # "nixl" | "example" | "base" | "none"
    kv_role: str | None = None
    engine_id: str | None = None
    bytes_per_block: int | None = None
    block_size: int | None = None
    layers: int | None = None
    forced_role: str = "auto"
    static_attrs: dict[str, Any] = field(default_factory=dict)
    # Roles this engine's requests played (from their kv_transfer_params): what an engine
    # configured kv_both (NVIDIA Dynamo starts every worker so) really is.
    observed_roles: set[str] = field(default_factory=set)


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Events whose second field is a scheduler request id or a KV load's request id.
_PER_REQUEST = frozenset({ev.ARRIVE, ev.SCHEDULED, ev.FIRST_TOKEN, ev.FINISH, ev.KV_WAIT,
                          ev.KV_READY, ev.HOLD, ev.RELEASED, ev.LOAD_START, ev.LOAD_DONE})


class SpanAssembler:
    """Turns the events of one process into SpanRecords as soon as each span's end is known."""

    def __init__(self, facts: ProcessFacts | None = None):
        self.facts = facts or ProcessFacts()
        self._reqs: dict[str, _Request] = {}
        self._loads: dict[str, _Load] = {}
        self._handshakes: dict[str, tuple[int, int, bool]] = {}
        self._done_loads: list[_Load] = []
        self._traces: dict[str, str] = {}  # worker: request id -> traceparent to join
        # API server: HTTP records (api_hooks) emitted on arrival, until their response ends.
        self._api_open: list[list] = []
        # API server: the requests in flight when its EngineCore died (ENGINE_DEAD), and
        # when it did (a response running then ends with the error).
        self.in_flight_at_death: list[str] = []
        self._deaths: list[int] = []
        # Requests ended by close_open (a stop drain): a step already under way may still
        # report them, which must not open them again under the same span ids.
        self._closed: set[str] = set()
        self._out: list[SpanRecord] = []
        self._steps = 0  # EngineCore steps seen (vllm.engine.step index)

    # -- public -----------------------------------------------------------------------------
    def feed(self, events: list[tuple], taken_ns: int | None = None) -> list[SpanRecord]:
        """Apply events in order; return the spans they completed. ``taken_ns``: when the
        events were taken from the buffer; an HTTP response that ended later waits for the
        next feed, which holds any engine death before its end."""
        for e in events:
            try:
                self._apply(e)
            except Exception:  # a malformed event must not stop the others
                log.debug("kvprof: could not apply event %r", e[:2], exc_info=True)
        if self._done_loads and events:
            self._release_loads(max(e[2] if len(e) > 2 and isinstance(e[2], int) else 0
                                    for e in events))
        if self._api_open:
            self._close_api_records(taken_ns)
        return self._take()

    def _release_loads(self, now_ns: int, final: bool = False) -> None:
        """Emit finished transfers once their stats and trace are known (or waited for)."""
        keep = []
        for load in self._done_loads:
            waited = now_ns - (load.done or now_ns)
            stats_ok = load.stats_seen or waited >= STATS_WAIT_NS
            trace_ok = load.req_id in self._traces or waited >= TRACE_WAIT_NS
            if final or (stats_ok and trace_ok):
                self._emit_load(load, load.stats)
            else:
                keep.append(load)
        self._done_loads = keep

    def flush(self, now_ns: int, final: bool = False) -> list[SpanRecord]:
        """Emit transfers still waiting for stats, and forget stale requests."""
        self._release_loads(now_ns, final)
        for rid, r in list(self._reqs.items()):
            if now_ns - r.touched > STALE_AFTER_NS:
                del self._reqs[rid]
        for rid, load in list(self._loads.items()):
            if now_ns - load.start > STALE_AFTER_NS:
                del self._loads[rid]
        if len(self._traces) > 8192:
            self._traces.clear()
        return self._take()

    def open_requests(self) -> list[str]:
        """Requests this process has seen start and not yet finish (for crash reports)."""
        return sorted({*self._reqs, *self._loads})

    def close_open(self, now_ns: int, reason: str) -> list[SpanRecord]:
        """End every request still open with an error span: the process is going away.

        The scheduler's requests get their top span (and what is known of their phases); a
        KV load never finished becomes a failed kv.transfer. Nothing is dropped silently.
        """
        if len(self._closed) > 8192:
            self._closed.clear()
        self._closed.update(self._loads)
        self._closed.update(self._reqs)
        for load in list(self._loads.values()):
            load.done, load.ok = now_ns, False
            self._emit_load(load, None, error=reason)
        self._loads.clear()
        for r in list(self._reqs.values()):
            role = self._role(r)
            if role == semconv.ROLE_DECODE and r.emitted_first:
                continue  # its spans are out: vllm.decode ends at the first token
            key, trace_id, top, parent = self._ids(r, role)
            if r.hold is not None:
                self._child(semconv.SPAN_KV_HOLD, trace_id, top, r.hold, now_ns,
                            self._base_attrs(role, r.req_id), key, error=reason)
            name = {semconv.ROLE_PREFILL: semconv.SPAN_PREFILL,
                    semconv.ROLE_DECODE: semconv.SPAN_DECODE}.get(role, semconv.SPAN_REQUEST)
            attrs = self._top_attrs(r, role)
            attrs[semconv.ATTR_FAILURE] = "process_exit"
            self._span(name, trace_id, top, parent, r.arrival or r.core_arrive or now_ns,
                       now_ns, attrs, error=reason)
        self._reqs.clear()
        return self._take()

    # -- roles and ids ----------------------------------------------------------------------
    def _role(self, r: _Request) -> str:
        if self.facts.forced_role in (semconv.ROLE_PREFILL, semconv.ROLE_DECODE):
            return self.facts.forced_role
        p = r.params or {}
        if p.get("do_remote_decode"):
            return semconv.ROLE_PREFILL
        if p.get("do_remote_prefill"):
            return semconv.ROLE_DECODE
        if self.facts.kv_role == "kv_producer":
            return semconv.ROLE_PREFILL
        if self.facts.kv_role == "kv_consumer":
            return semconv.ROLE_DECODE
        return semconv.ROLE_AGGREGATED

    @staticmethod
    def _key(req_id: str, remote_req: str | None) -> str:
        # The prefill side's external id keys the whole trace (see ids.py).
        return external_request_id(remote_req or req_id)

    def _base_attrs(self, role: str, req_id: str) -> dict[str, Any]:
        a: dict[str, Any] = {semconv.ATTR_ROLE: role, semconv.ATTR_REQUEST_ID: req_id}
        if self.facts.connector:
            a[semconv.ATTR_KV_CONNECTOR] = self.facts.connector
        return a

    def _span(self, name, trace_id, span_id, parent, start, end, attrs,
              error: str | None = None) -> None:
        if start is None or end is None:
            return
        self._out.append(SpanRecord(name, trace_id, span_id, parent, int(start),
                                    int(max(end, start)), attrs, error))

    def _child(self, name, trace_id, parent, start, end, attrs, key: str,
               error: str | None = None) -> None:
        self._span(name, trace_id, span_id_for(key + "/" + attrs.get(
            semconv.ATTR_REQUEST_ID, ""), name), parent, start, end, attrs, error)

    def _take(self) -> list[SpanRecord]:
        out, self._out = self._out, []
        return out

    # -- event handling ---------------------------------------------------------------------
    def _req(self, rid: str, t: int) -> _Request:
        r = self._reqs.get(rid)
        if r is None:
            r = self._reqs[rid] = _Request(rid)
        r.touched = t
        return r

    def _apply(self, e: tuple) -> None:
        kind = e[0]
        if kind in _PER_REQUEST and e[1] in self._closed:
            return
        if kind == ev.ARRIVE:
            rid, t, arrival, prompt, params = e[1:6]
            r = self._req(rid, t)
            r.arrival = arrival or t
            r.core_arrive = t
            r.prompt_tokens = prompt
            r.params = params
            self._observe(params)
            r.traceparent = e[6] if len(e) > 6 else None
            if r.traceparent:
                # A model runner in this same process (one-GPU topology) joins it too.
                self._traces[rid] = r.traceparent
        elif kind == ev.SCHEDULED:
            r = self._req(e[1], e[2])
            if r.scheduled is None:
                r.scheduled = e[2]
        elif kind == ev.FIRST_TOKEN:
            r = self._req(e[1], e[3])
            if r.first_token is None:
                r.step_start, r.first_token = e[2], e[3]
                self._on_first_token(r)
        elif kind == ev.FINISH:
            r = self._reqs.get(e[1])
            if r is not None:
                r.touched = e[2]
                status = e[3] if len(e) > 3 else None
                if status in _FAILED_STATUSES:
                    r.error = f"the engine ended the request {status} (aborted or failed)"
                self._on_finish(r, e[2])
        elif kind == ev.KV_WAIT:
            r = self._req(e[1], e[2])
            if r.kv_wait is None:
                r.kv_wait = e[2]
        elif kind == ev.KV_READY:
            r = self._req(e[1], e[2])
            r.kv_ready = e[2]
        elif kind == ev.HOLD:
            self._req(e[1], e[2]).hold = e[2]
        elif kind == ev.RELEASED:
            r = self._reqs.get(e[1])
            if r is not None:
                self._on_released(r, e[2])
        elif kind == ev.LOAD_START:
            _, rid, t, blocks, remote_req, remote_engine, remote_host, handshake = e
            if rid not in self._loads:
                self._loads[rid] = _Load(rid, t, blocks, remote_req, remote_engine,
                                         remote_host, handshake)
                self.facts.observed_roles.add(semconv.ROLE_DECODE)
        elif kind == ev.LOAD_DONE:
            load = self._loads.pop(e[1], None)
            if load is not None:
                load.done = e[2]
                load.ok = bool(e[3]) if len(e) > 3 else True
                self._done_loads.append(load)
        elif kind == ev.REQ_TRACE:
            self._traces[e[1]] = e[2]
        elif kind == ev.LEASE_EXPIRED:
            self._on_lease_expired(*e[1:])
        elif kind == ev.API:
            self._on_api_event(e)
        elif kind == ev.ENGINE_DEAD:
            self._on_engine_dead(e[1])
        elif kind == ev.HANDSHAKE:
            self._handshakes[e[1]] = (e[2], e[3], e[4])
        elif kind == ev.STEP:
            self._on_step(*e[1:])
        elif kind == ev.XFER_TELEMETRY:
            load = self._loads.get(e[1])
            if load is not None:
                load.telemetry.append((e[2] - e[3], *e[4:9]))
        elif kind == ev.XFER_POLL:
            for rid in e[2]:
                load = self._loads.get(rid)
                if load is not None:
                    load.last_inflight_poll = e[1]
        elif kind == ev.XFER_STATS:
            self._on_stats(e[1], e[2], e[3], e[4])
        elif kind in (ev.SERIALIZE, ev.DESERIALIZE):
            self._on_file_io(kind, *e[1:])
        elif kind == ev.CONNECTOR:
            _, name, profile, kv_role, engine_id = e
            self.facts.connector, self.facts.profile = name, profile
            self.facts.kv_role, self.facts.engine_id = kv_role, engine_id
        elif kind == ev.KV_LAYOUT:
            _, self.facts.bytes_per_block, self.facts.block_size, self.facts.layers = e

    # -- scheduler-side spans ---------------------------------------------------------------
    def _ids(self, r: _Request, role: str) -> tuple[str, int, int, int | None]:
        """(key, trace_id, top span id, top span parent) for a request seen by the scheduler."""
        return _request_ids(r.req_id, role, r.params, r.traceparent)

    def _top_attrs(self, r: _Request, role: str) -> dict[str, Any]:
        a = self._base_attrs(role, r.req_id)
        a.update(self.facts.static_attrs)
        if r.prompt_tokens is not None:
            a[semconv.ATTR_PROMPT_TOKENS] = int(r.prompt_tokens)
        if self.facts.engine_id:
            a[semconv.ATTR_ENGINE_ID] = self.facts.engine_id
        p = r.params or {}
        if p.get("remote_request_id"):
            a[semconv.ATTR_REMOTE_REQUEST_ID] = str(p["remote_request_id"])
        if p.get("remote_engine_id"):
            a[semconv.ATTR_KV_REMOTE_ENGINE_ID] = str(p["remote_engine_id"])
        if p.get("remote_host"):
            a[semconv.ATTR_KV_REMOTE_HOST] = str(p["remote_host"])
        return a

    def _on_first_token(self, r: _Request) -> None:
        role = self._role(r)
        key, trace_id, top, parent = self._ids(r, role)
        attrs = self._base_attrs(role, r.req_id)
        if role in (semconv.ROLE_PREFILL, semconv.ROLE_AGGREGATED):
            self._child(semconv.SPAN_PREFILL_QUEUE, trace_id, top, r.core_arrive or r.arrival,
                        r.scheduled, dict(attrs), key)
            self._child(semconv.SPAN_PREFILL_COMPUTE, trace_id, top, r.scheduled,
                        r.first_token, dict(attrs), key)
            if role == semconv.ROLE_AGGREGATED:
                self._child(semconv.SPAN_DECODE_FIRST_TOKEN, trace_id, top, r.step_start,
                            r.first_token, dict(attrs), key)
            return
        # Decode: the KV wait as the scheduler sees it stands in for kv.transfer only for
        # connectors whose worker side has no finer hooks.
        if self.facts.profile == "base" and r.kv_wait is not None and r.kv_ready is not None:
            a = dict(attrs)
            a["kvprof.source"] = "scheduler"
            self._child(semconv.SPAN_KV_TRANSFER, trace_id, top, r.kv_wait, r.kv_ready, a, key)
        if r.kv_ready is not None:
            # The hand-over as the decode scheduler sees it: request known -> KV ready.
            self._child(semconv.SPAN_DECODE_KV_WAIT, trace_id, top,
                        r.core_arrive or r.kv_wait, r.kv_ready, dict(attrs), key)
        # Waiting to be scheduled: after the KV is ready (asynchronous load), else from
        # arrival (the KV, if any, is read synchronously inside the first step).
        self._child(semconv.SPAN_DECODE_QUEUE, trace_id, top,
                    r.kv_ready if r.kv_ready is not None else r.core_arrive, r.scheduled,
                    dict(attrs), key)
        self._child(semconv.SPAN_DECODE_FIRST_TOKEN, trace_id, top,
                    r.scheduled or r.step_start, r.first_token, dict(attrs), key)
        self._span(semconv.SPAN_DECODE, trace_id, top, parent, _first(r.arrival, r.core_arrive)
                   or r.scheduled, r.first_token, self._top_attrs(r, role))
        r.emitted_first = True

    def _on_finish(self, r: _Request, t: int) -> None:
        if r.finished:
            return
        r.finished = True
        role = self._role(r)
        if role == semconv.ROLE_PREFILL:
            if r.hold is not None:
                return  # vllm.prefill ends when the decode side has read the blocks
            key, trace_id, top, parent = self._ids(r, role)
            self._span(semconv.SPAN_PREFILL, trace_id, top, parent,
                       _first(r.arrival, r.core_arrive), t, self._top_attrs(r, role),
                       error=r.error)
        elif role == semconv.ROLE_AGGREGATED:
            key, trace_id, top, parent = self._ids(r, role)
            self._span(semconv.SPAN_REQUEST, trace_id, top, parent,
                       _first(r.arrival, r.core_arrive), t, self._top_attrs(r, role),
                       error=r.error)
        self._reqs.pop(r.req_id, None)

    def _on_released(self, r: _Request, t: int) -> None:
        role = self._role(r)
        key, trace_id, top, parent = self._ids(r, role)
        if r.hold is not None:
            self._child(semconv.SPAN_KV_HOLD, trace_id, top, r.hold, t,
                        self._base_attrs(role, r.req_id), key)
        self._span(semconv.SPAN_PREFILL, trace_id, top, parent,
                   _first(r.arrival, r.core_arrive), t, self._top_attrs(r, role))
        self._reqs.pop(r.req_id, None)

    # -- worker-side spans ------------------------------------------------------------------
    def _on_stats(self, t: int, nbytes: list, descs: list, durs: list) -> None:
        ready = [x for x in self._done_loads if (x.done or 0) <= t and not x.stats_seen]
        if not ready:
            return
        # NIXL reports one entry per completed transfer; a 1:1 match attributes them exactly,
        # otherwise the step's totals are left off rather than guessed per request.
        if len(ready) == len(nbytes):
            for load, b, d, s in zip(ready, nbytes, descs, durs, strict=False):
                load.stats = (int(b), int(d), float(s))
        for load in ready:
            load.stats_seen = True

    def _emit_load(self, load: _Load, stats: tuple[int, int, float] | None,
                   error: str | None = None) -> None:
        role = semconv.ROLE_DECODE
        key = self._key(load.req_id, load.remote_req)
        trace_id, _ = effective_trace(key, self._traces.pop(load.req_id, None))
        parent = span_id_for(key, semconv.SPAN_DECODE)
        if error is None and not load.ok:
            error = "NIXL reported the KV receive as failed"
        base = self._base_attrs(role, load.req_id)
        if load.remote_engine:
            base[semconv.ATTR_KV_REMOTE_ENGINE_ID] = load.remote_engine
        if load.remote_host:
            base[semconv.ATTR_KV_REMOTE_HOST] = load.remote_host
        start = load.start
        hs = self._handshakes.get(load.remote_engine or "")
        if load.handshake and hs is not None:
            a = dict(base)
            a["kvprof.handshake.ok"] = bool(hs[2])
            self._child(semconv.SPAN_KV_HANDSHAKE, trace_id, parent, hs[0], hs[1], a, key)
            start = max(start, hs[1])
        a = dict(base)
        a[semconv.ATTR_KV_BLOCKS] = int(load.blocks)
        if self.facts.bytes_per_block:
            a[semconv.ATTR_KV_BYTES] = int(load.blocks) * int(self.facts.bytes_per_block)
        if self.facts.layers:
            # vLLM's NIXL plan: one descriptor per (layer, K|V, block).
            a[semconv.ATTR_KV_DESCRIPTORS] = 2 * int(self.facts.layers) * int(load.blocks)
        seconds = (load.done - start) / 1e9 if load.done else 0.0
        if stats is not None:
            a["nixl.bytes_transferred"], a["nixl.descriptors"] = stats[0], stats[1]
            a["nixl.transfer_duration_s"] = stats[2]
            if stats[2] > 0:
                seconds = stats[2]
        split = self._split(load, start) if error is None and load.done else None
        if split is not None:
            # NIXL's own figures for this very request, not the step's matched 1:1.
            a["nixl.bytes_transferred"], a["nixl.descriptors"] = split[3], split[4]
            a["nixl.transfer_duration_s"] = (split[1] - split[0]) / 1e9
            seconds = (split[1] - split[0]) / 1e9
        if a.get(semconv.ATTR_KV_BYTES) and seconds > 0:
            a[semconv.ATTR_KV_GBPS] = a[semconv.ATTR_KV_BYTES] / seconds / 1e9
        if _is_loopback(load.remote_host):
            a[semconv.ATTR_KV_PATH] = "loopback"
        if error is not None:
            a[semconv.ATTR_FAILURE] = "transfer_failed" if load.done else "process_exit"
        self._child(semconv.SPAN_KV_TRANSFER, trace_id, parent, start, load.done, a, key,
                    error=error)
        if split is not None:
            self._emit_split(load, split, start, trace_id, key, base, a)

    @staticmethod
    def _split(load: _Load, start: int) -> tuple[int, int, float, int, int, bool] | None:
        """(NIXL started, NIXL saw it done, post seconds, bytes, descriptors, done inside
        the post call) on the wall clock, from the telemetry of the load's handles; None
        without telemetry."""
        if not load.telemetry:
            return None
        off = load.telemetry[0][0]
        t0 = min(x[1] for x in load.telemetry) * 1000 + off
        t1 = max(x[1] + x[3] for x in load.telemetry) * 1000 + off
        post_s = max(x[2] for x in load.telemetry) / 1e6
        done = int(load.done or t1)
        # Both clocks were read a few hundred ns apart: keep the split inside the span.
        t0 = min(max(int(t0), start), done)
        t1 = min(max(int(t1), t0), done)
        return (t0, t1, post_s, sum(x[4] for x in load.telemetry),
                sum(x[5] for x in load.telemetry),
                all(x[3] <= x[2] for x in load.telemetry))

    def _emit_split(self, load: _Load, split: tuple, start: int, trace_id: int, key: str,
                    base: dict[str, Any], xfer_attrs: dict[str, Any]) -> None:
        """kv.transfer.post / .wire / .notice: consecutive children of the kv.transfer."""
        t0, t1, post_s, nbytes, descs, in_post = split
        parent = span_id_for(key + "/" + load.req_id, semconv.SPAN_KV_TRANSFER)
        wire = dict(base)
        wire["nixl.bytes_transferred"], wire["nixl.descriptors"] = int(nbytes), int(descs)
        wire["nixl.post_duration_s"] = float(post_s)
        wire["nixl.transfer_duration_s"] = (t1 - t0) / 1e9
        if xfer_attrs.get(semconv.ATTR_KV_GBPS) is not None:
            wire[semconv.ATTR_KV_GBPS] = xfer_attrs[semconv.ATTR_KV_GBPS]
        poll = load.last_inflight_poll
        if not in_post:
            # NIXL learns of a completion when the worker polls (once per step): the bytes
            # were in flight until the last poll that saw them so (else the start), and
            # landed at some point after it: up to this much of the wire is that wait.
            since = poll if poll is not None and t0 <= poll <= t1 else t0
            wire[semconv.ATTR_NIXL_POLL_GAP_MS] = (t1 - since) / 1e6
        for name, s0, s1, attrs in ((semconv.SPAN_KV_POST, start, t0, dict(base)),
                                    (semconv.SPAN_KV_WIRE, t0, t1, wire),
                                    (semconv.SPAN_KV_NOTICE, t1, load.done, dict(base))):
            self._span(name, trace_id, span_id_for(key + "/" + load.req_id, name), parent,
                       s0, s1, attrs)

    # -- engine steps -------------------------------------------------------------------------
    def _on_step(self, info: tuple | None, t_update: int, t_end: int, so: Any,
                 kvo: Any) -> None:
        """One vllm.engine.step span: the step's timing and its batch."""
        n = self._steps
        self._steps += 1
        sched = so.num_scheduled_tokens or {}
        meta = getattr(so, "kv_connector_metadata", None)
        recv = getattr(meta, "reqs_to_recv", None)
        if not sched and not recv and not (kvo is not None and kvo.finished_recving):
            # An idle step (a decode engine spins through thousands while it waits for KV):
            # not recorded; the index counts it, so a gap in the index is such steps.
            return
        prefill = decode = 0
        for v in sched.values():
            if v > 1:
                prefill += v
            else:
                decode += 1
        p = semconv.STEP_ATTR_PREFIX
        a: dict[str, Any] = {p + "index": n, p + "prefill_tokens": prefill,
                             p + "decode_seqs": decode, p + "num_reqs": len(sched),
                             p + "tokens": int(so.total_num_scheduled_tokens),
                             p + "request_ids": ",".join(sched),
                             p + "preempted": len(getattr(so, "preempted_req_ids", None) or ()),
                             p + "output_ms": (t_end - t_update) / 1e6}
        if recv is not None:
            a[p + "kv_loads_started"] = len(recv)
        if kvo is not None:
            a[p + "kv_loads_finished"] = len(kvo.finished_recving or ())
        start = t_update
        if info is not None:
            start, t_sched, running, waiting, free, total = info
            a[p + "schedule_ms"] = (t_sched - start) / 1e6
            a[p + "execute_ms"] = (t_update - t_sched) / 1e6
            a[p + "running"], a[p + "waiting"] = int(running), int(waiting)
            a[p + "kv_blocks_free"], a[p + "kv_blocks_total"] = int(free), int(total)
        if self.facts.engine_id:
            a[semconv.ATTR_ENGINE_ID] = self.facts.engine_id
        key = f"steps/{self.facts.engine_id or ''}/{os.getpid()}/{n // STEPS_PER_TRACE}"
        self._span(semconv.SPAN_ENGINE_STEP, trace_id_for(key), span_id_for(key, str(n)), None,
                   start, t_end, a)

    def _on_file_io(self, kind: int, rid: str, t0: int, t1: int, nbytes: int, tokens: int):
        serialize = kind == ev.SERIALIZE
        role = semconv.ROLE_PREFILL if serialize else semconv.ROLE_DECODE
        key = external_request_id(rid)
        top = semconv.SPAN_PREFILL if serialize else semconv.SPAN_DECODE
        a = self._base_attrs(role, rid)
        if nbytes is None and self.facts.bytes_per_block and self.facts.block_size:
            # The connector copies exactly these tokens of every layer's K and V.
            nbytes = int(tokens) * int(self.facts.bytes_per_block) // int(self.facts.block_size)
        if nbytes is not None:
            a[semconv.ATTR_KV_BYTES] = int(nbytes)
        a["kvprof.tokens"] = int(tokens)
        if self.facts.block_size:
            a[semconv.ATTR_KV_BLOCKS] = -(-int(tokens) // int(self.facts.block_size))
        a[semconv.ATTR_KV_PATH] = "file"
        name = semconv.SPAN_KV_SERIALIZE if serialize else semconv.SPAN_KV_DESERIALIZE
        trace_id, _ = effective_trace(key, self._traces.get(rid))
        self._child(name, trace_id, span_id_for(key, top), t0, t1, a, key)

    def _on_lease_expired(self, rid: str, t: int, retrieved_by: int) -> None:
        key = external_request_id(rid)
        trace_id, _ = effective_trace(key, self._traces.get(rid))
        a = self._base_attrs(semconv.ROLE_PREFILL, rid)
        a[semconv.ATTR_LEASE_RETRIEVED_BY] = int(retrieved_by)
        a[semconv.ATTR_FAILURE] = "lease_expired"
        self._child(semconv.SPAN_KV_LEASE_EXPIRED, trace_id, span_id_for(key, semconv.SPAN_PREFILL),
                    t, t, a, key,
                    error=f"NIXL send lease expired: KV released after {retrieved_by} decode "
                          "worker(s) read it")

    # -- API-server spans ---------------------------------------------------------------------
    def _on_api_event(self, e: list) -> None:
        """A record of api_hooks: an HTTP request, kept until its response has ended (its end
        time is the hooks' last write to it), or a call with no HTTP response around it,
        complete when it comes."""
        if e[A.T_RECV] is not None:
            self._api_open.append(e)
        else:
            self._api_calls(e, None)

    def _close_api_records(self, taken_ns: int | None = None) -> None:
        """Spans of the HTTP requests whose responses have ended since the last look (by
        ``taken_ns``: an engine death before such an end is in the events fed so far, the
        hooks noting both on one thread, the death first)."""
        still = []
        for h in self._api_open:
            end = h[A.T_END]
            if end is None or (taken_ns is not None and end > taken_ns):
                still.append(h)
                continue
            try:
                xid = h[A.XID]
                hit = any(h[A.T_RECV] <= t <= end for t in self._deaths)
                http = (h[A.T_RECV], h[A.T_FIRST_BYTES], end, 599 if hit else h[A.STATUS],
                        xid.decode("latin-1") if isinstance(xid, bytes) else xid, h[A.PATH])
                self._api_calls(h, http)
            except Exception:  # a malformed record must not stop the others
                log.debug("kvprof: could not apply API record %r", h[:4], exc_info=True)
        self._api_open = still

    def _api_calls(self, record: list, http: tuple | None) -> None:
        for c in A.calls_of(record):
            self._on_api(c[A.RID], c[A.T_INPUT], c[A.T_HANDOFF], c[A.T_FIRST_OUTPUT], c[A.OK],
                         c[A.INTERNAL], A.kv_transfer_params(c), A.call_traceparent(c), http)

    def _on_engine_dead(self, t: int) -> None:
        """The HTTP requests that had arrived and not ended at t: what the engine's death
        hit. Exact, where a snapshot of open requests (written every flush) may be a flush
        interval old by the time a crash report reads it."""
        self._deaths.append(t)
        hit = set(self.in_flight_at_death)
        for h in self._api_open:
            end = h[A.T_END]
            if h[A.T_RECV] <= t and (end is None or end >= t):
                hit.update(_api_names(h))
        self.in_flight_at_death = sorted(hit)

    def api_in_flight(self) -> list[str]:
        """Request ids (or client ids) of the HTTP requests the API server was serving when
        its events were last fed (for crash reports)."""
        out = []
        for h in self._api_open:
            if h[A.T_END] is None:
                out.extend(_api_names(h))
        return out

    def _on_api(self, rid: str, t_input: int, t_handoff: int | None, t_first: int | None,
                ok: bool, internal: str | None, params: dict | None, traceparent: str | None,
                http: tuple | None) -> None:
        """The frontend's legs of one request, children of the engine's request span."""
        p = params or {}
        self._observe(p)
        role = self._api_role(p)
        key, trace_id, top, _ = _request_ids(rid, role, p, traceparent)
        a = self._base_attrs(role, internal or rid)
        t_recv = t_bytes = t_end = status = xid = None
        if http is not None:
            t_recv, t_bytes, t_end, status, xid, path = http
            a[semconv.ATTR_HTTP_ROUTE] = path
            if xid:
                a[semconv.ATTR_X_REQUEST_ID] = xid
            if status is not None:
                a[semconv.ATTR_HTTP_STATUS] = int(status)
        failed = (status is not None and int(status) >= 400) or not ok
        # 599: kvprof's mark for a 200 stream that ended with an error event.
        error = ("the response stream ended with an error event" if status == 599 else
                 f"HTTP {status}" if status is not None and int(status) >= 400 else
                 "no output from the EngineCore" if not ok else None)
        # When the answer's first bytes went to the server: for the prefill engine's one-message
        # JSON answer that is the whole response (the app returns a moment later, possibly
        # after the router has read it), for a stream the first token's event.
        answered = t_bytes or t_end
        child = [(semconv.SPAN_API_INPUT, t_recv, t_input),
                 (semconv.SPAN_API_TO_CORE, t_input, t_handoff),
                 (semconv.SPAN_API_WAIT, t_handoff, t_first),
                 (semconv.SPAN_API_RESPOND, t_first, answered if t_first else None)]
        for name, start, end in child:
            self._child(name, trace_id, top, start, end, dict(a), key)
        if t_recv is not None:
            self._child(semconv.SPAN_API_REQUEST, trace_id, top, t_recv, t_end, dict(a), key,
                        error=error if failed else None)

    def _observe(self, params: dict | None) -> None:
        if params and (params.get("do_remote_decode") or params.get("do_remote_prefill")):
            self.facts.observed_roles.add(semconv.ROLE_PREFILL if params.get("do_remote_decode")
                                          else semconv.ROLE_DECODE)

    def _api_role(self, params: dict) -> str:
        if self.facts.forced_role in (semconv.ROLE_PREFILL, semconv.ROLE_DECODE):
            return self.facts.forced_role
        if params.get("do_remote_decode"):
            return semconv.ROLE_PREFILL
        if params.get("do_remote_prefill"):
            return semconv.ROLE_DECODE
        return semconv.ROLE_AGGREGATED


_TOP_SPAN = {semconv.ROLE_PREFILL: semconv.SPAN_PREFILL, semconv.ROLE_DECODE: semconv.SPAN_DECODE}
_FAILED_STATUSES = {"FINISHED_ABORTED", "FINISHED_ERROR"}


def _request_ids(req_id: str, role: str, params: dict | None,
                 traceparent: str | None) -> tuple[str, int, int, int | None]:
    """(key, trace_id, top span id, top span parent) of a request on this engine.

    The key is the prefill side's external id (the decode side learns it from
    remote_request_id), so every process derives the same span ids. The trace is the
    caller's (trace headers), else the one the prefill side named in kv_transfer_params,
    else derived from the key.
    """
    p = params or {}
    decode = role == semconv.ROLE_DECODE
    key = external_request_id((p.get("remote_request_id") if decode else None) or req_id)
    kv_tp = p.get(semconv.TRACEPARENT_KEY) if decode else None
    trace_id, parent = effective_trace(key, traceparent, kv_tp)
    if parent is None and decode:
        parent = span_id_for(key, semconv.SPAN_PREFILL)
    return key, trace_id, span_id_for(key, _TOP_SPAN.get(role, semconv.SPAN_REQUEST)), parent


def _first(*times: int | None) -> int | None:
    """The earliest of the times given (None when none is)."""
    known = [t for t in times if t is not None]
    return min(known) if known else None


def _api_names(h: list) -> list[str]:
    """An HTTP record's engine request ids, else the client's X-Request-Id."""
    calls = A.calls_of(h)
    names = [c[A.RID] for c in calls]
    xid = h[A.XID]
    if not calls and xid:
        names.append(xid.decode("latin-1") if isinstance(xid, bytes) else xid)
    return names
