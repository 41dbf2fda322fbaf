"""The probes put around vLLM's scheduler, model runner and KV connectors.

Each hook here is a factory: given the original function it returns the plain function the
instrumentor installs in its place (``probe(self, *args, **kwargs)``, one Python frame, no
proxy object per call; see instrumentor.py for why not wrapt's FunctionWrapper). A probe
calls through with the original arguments and returns the original result (the one
exception: the prefill side's kv_transfer_params gain a ``traceparent`` key). What it records
is a tuple of timestamps and small ints handed to ``_EMIT``; interpretation (ids, roles,
geometry, spans) happens later in the assembler, off vLLM's critical path. Any failure while
recording is swallowed and reported once, never raised into vLLM.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from time import monotonic_ns, time_ns
from typing import Any

from kvprof import semconv
from kvprof.probes.events import (
    ARRIVE,
    DESERIALIZE,
    FINISH,
    FIRST_TOKEN,
    HANDSHAKE,
    HOLD,
    KV_LAYOUT,
    KV_READY,
    KV_WAIT,
    LEASE_EXPIRED,
    LOAD_DONE,
    LOAD_START,
    RELEASED,
    REQ_TRACE,
    SCHEDULED,
    SERIALIZE,
    STEP,
    XFER_POLL,
    XFER_STATS,
    XFER_TELEMETRY,
)
from kvprof.probes.ids import (
    effective_trace,
    external_request_id,
    format_traceparent,
    span_id_for,
)

log = logging.getLogger(__name__)

try:  # the engine step record in C, built at install where a C compiler is (setup.py)
    from kvprof.probes._fastrec import step_begin as _c_step_begin
    from kvprof.probes._fastrec import step_end as _c_step_end
except ImportError:  # not built, or a build from before the step record: the Python here
    _c_step_begin = _c_step_end = None
if os.environ.get("KVPROF_PURE_PYTHON"):
    _c_step_begin = _c_step_end = None

Probe = Callable[..., Any]
HookFactory = Callable[[Callable[..., Any]], Probe]


def _discard(event: tuple) -> None:
    return None


_EMIT = _discard  # replaced by the recorder's deque.append while instrumented
_failed: set[str] = set()
# id(SchedulerOutput) -> (schedule() started, returned, running, waiting, KV blocks free,
# KV blocks total): the step's start (a first token's step) and the batch's surroundings.
_STEP_START: dict[int, tuple] = {}
# NIXL transfer handle -> request id, set around the worker's poll of its KV loads
# (_pop_done_transfers), read by the getXferTelemetry probe inside that poll.
_HANDLE_OWNER: dict[int, str] = {}
# Requests scheduled that have not produced a token yet: update_from_output looks at the
# step's outputs only while this is non-empty (steady decode steps skip the scan).
_AWAIT_FIRST: set[str] = set()
# (request id, time, status) freed inside the scheduler call now running; reported when that
# call returns, so a request that finishes on its first token reports the token first.
_FREED: list[tuple[str, int, str]] = []
# First KV block id -> request id, from the model runner's view of each step; connectors
# whose metadata has no request ids (ExampleConnector) are attributed through it.
_BLOCK_OWNER: dict[int, str] = {}
_SAVE_STEP: list[int] = []  # [first save_kv_layer start, last end] of the current step
_TRACEPARENT = semconv.TRACEPARENT_KEY


def set_emit(emit: Callable[[tuple], Any] | None) -> None:
    """Point every hook at a sink (the recorder's buffer append); None disconnects."""
    global _EMIT
    _EMIT = emit if emit is not None else _discard


def emit_target() -> Callable[[tuple], Any]:
    """The sink the hooks write into now."""
    return _EMIT


def reset_state() -> None:
    """Forget per-step state (used when instrumentation is removed)."""
    _STEP_START.clear()
    _HANDLE_OWNER.clear()
    _AWAIT_FIRST.clear()
    _FREED.clear()
    _BLOCK_OWNER.clear()
    _SAVE_STEP.clear()


def _hook_failed(name: str) -> None:
    if name not in _failed:
        _failed.add(name)
        log.warning("kvprof: recording in hook %s failed; that hook records nothing more "
                    "useful until fixed (vLLM is unaffected)", name, exc_info=True)


# -- scheduler (EngineCore process) ------------------------------------------------------------
def scheduler_add_request(wrapped: Callable[..., Any]) -> Probe:
    def add_request(self, *args, **kwargs):
        try:
            request = args[0] if args else kwargs["request"]
            t = time_ns()
            arrival = getattr(request, "arrival_time", None)
            # arrival_time is the frontend's wall clock (s); older builds used monotonic time.
            arrival_ns = int(arrival * 1e9) if arrival and arrival > 1e9 else t
            kvp = getattr(request, "kv_transfer_params", None)
            # The caller's trace (an HTTP traceparent handed down by the API server, or
            # Dynamo's): this request's spans join it.
            headers = getattr(request, "trace_headers", None)
            # A snapshot: the connector later flips do_remote_prefill in place. The assembler
            # picks out the keys it needs.
            _EMIT((ARRIVE, request.request_id, t, arrival_ns,
                   getattr(request, "num_prompt_tokens", None), dict(kvp) if kvp else None,
                   headers.get(_TRACEPARENT) if headers else None))
        except Exception:
            _hook_failed("Scheduler.add_request")
        return wrapped(self, *args, **kwargs)
    return add_request


def scheduler_schedule(wrapped: Callable[..., Any]) -> Probe:
    begin = _c_step_begin
    if begin is not None:
        # The same as the Python probe below, the step's part in one C call
        # (_fastrec.step_begin: the same tuple, into the same dict).
        def schedule_c(self, *args, **kwargs):
            t = time_ns()
            out = wrapped(self, *args, **kwargs)
            try:
                begin(_STEP_START, self, out, t)
                if out.scheduled_new_reqs:  # empty on most steps
                    _note_scheduled(out.scheduled_new_reqs, t)
            except Exception:
                _hook_failed("Scheduler.schedule")
            return out
        return schedule_c

    def schedule(self, *args, **kwargs):
        t = time_ns()
        out = wrapped(self, *args, **kwargs)
        try:
            # What the step's record needs from the scheduler at this moment; the batch
            # itself is read from `out` in the export thread. A flat tuple of ints, which the
            # garbage collector stops tracking at its first pass (the counts pair nested
            # inside would keep it tracked longer) while it waits for the export thread.
            try:
                pool = self.kv_cache_manager.block_pool
                running, waiting = self.get_request_counts()
                info = (t, time_ns(), running, waiting, pool.free_block_queue.num_free_blocks,
                        pool.num_gpu_blocks)
            except Exception:  # a scheduler without these: the step's timing alone
                info = (t, time_ns(), -1, -1, -1, -1)
            starts = _STEP_START
            starts[id(out)] = info
            if len(starts) > 64:  # outputs never passed back (shutdown) must not pile up
                del starts[next(iter(starts))]
            if out.scheduled_new_reqs:  # empty on most steps
                _note_scheduled(out.scheduled_new_reqs, t)
        except Exception:
            _hook_failed("Scheduler.schedule")
        return out
    return schedule


def _note_scheduled(new: Any, t: int) -> None:
    """The requests a step scheduled for the first time: their 'scheduled' event, and each
    awaits its first token."""
    for r in new:
        rid = r.req_id
        _AWAIT_FIRST.add(rid)
        _EMIT((SCHEDULED, rid, t))


def _report_freed() -> None:
    freed = _FREED[:]
    _FREED.clear()
    for rid, t, status in freed:
        _AWAIT_FIRST.discard(rid)
        _EMIT((FINISH, rid, t, status))


def scheduler_update_from_output(wrapped: Callable[..., Any]) -> Probe:
    end = _c_step_end

    def update_from_output(self, *args, **kwargs):
        t = time_ns()
        out = wrapped(self, *args, **kwargs)
        try:
            if len(args) == 2:  # how EngineCore calls it
                so, mro = args
            else:
                so = args[0] if args else kwargs.get("scheduler_output")
                mro = args[1] if len(args) > 1 else kwargs.get("model_runner_output")
            info = _STEP_START.pop(id(so), None)
            if end is not None:  # _fastrec.step_end: the same event, emitted in one C call
                end(_EMIT, STEP, info, t, so, mro)
            else:
                try:
                    kvo = mro.kv_connector_output
                except AttributeError:
                    kvo = None
                _EMIT((STEP, info, t, time_ns(), so, kvo))
            waiting = _AWAIT_FIRST
            if waiting:  # some request is still before its first token
                step = info[0] if info is not None else t
                for outs in out.values():
                    for o in outs.outputs:
                        rid = o.request_id
                        if rid in waiting and o.new_token_ids:
                            waiting.discard(rid)
                            _EMIT((FIRST_TOKEN, rid, step, t))
            if _FREED:
                _report_freed()
        except Exception:
            _hook_failed("Scheduler.update_from_output")
        return out
    return update_from_output


def scheduler_finish_requests(wrapped: Callable[..., Any]) -> Probe:
    # Aborts (client gone, engine shutdown) free their requests here, outside any step.
    def finish_requests(self, *args, **kwargs):
        out = wrapped(self, *args, **kwargs)
        try:
            if _FREED:
                _report_freed()
        except Exception:
            _hook_failed("Scheduler.finish_requests")
        return out
    return finish_requests


def scheduler_free_request(wrapped: Callable[..., Any]) -> Probe:
    # Once per finished request, stopped (in update_from_output) or aborted (in
    # finish_requests); the enclosing call's hook reports it.
    def _free_request(self, *args, **kwargs):
        out = wrapped(self, *args, **kwargs)
        try:
            # Timed after the call: the connector's request_finished (HOLD) comes first.
            request = args[0] if args else kwargs["request"]
            status = getattr(request, "status", None)
            _FREED.append((request.request_id, time_ns(), None if status is None else str(status)))
        except Exception:
            _hook_failed("Scheduler._free_request")
        return out
    return _free_request


# -- model runner (worker process) -------------------------------------------------------------
def runner_execute_model(wrapped: Callable[..., Any]) -> Probe:
    def execute_model(self, *args, **kwargs):
        try:
            sched_out = args[0] if args else kwargs.get("scheduler_output")
            new = sched_out.scheduled_new_reqs
            if new:
                owners = _BLOCK_OWNER
                for r in new:
                    ids = r.block_ids
                    if ids and ids[0]:
                        owners[ids[0][0]] = r.req_id
                    sp = r.sampling_params
                    extra = sp.extra_args if sp is not None else None
                    kvp = extra.get("kv_transfer_params") if extra else None
                    if kvp and kvp.get(_TRACEPARENT):
                        # The decode side's worker spans join the trace the prefill side named.
                        _EMIT((REQ_TRACE, r.req_id, kvp[_TRACEPARENT]))
                if len(owners) > 8192:
                    owners.clear()
        except Exception:
            _hook_failed("GPUModelRunner.execute_model")
        return wrapped(self, *args, **kwargs)
    return execute_model


# -- connector, scheduler side -----------------------------------------------------------------
def conn_get_num_new_matched_tokens(wrapped: Callable[..., Any]) -> Probe:
    def get_num_new_matched_tokens(self, *args, **kwargs):
        out = wrapped(self, *args, **kwargs)
        try:
            count, load_async = out
            if load_async and count:
                request = args[0] if args else kwargs["request"]
                _EMIT((KV_WAIT, request.request_id, time_ns(), count))
        except Exception:
            _hook_failed("KVConnector.get_num_new_matched_tokens")
        return out
    return get_num_new_matched_tokens


def conn_update_connector_output(wrapped: Callable[..., Any]) -> Probe:
    def update_connector_output(self, *args, **kwargs):
        try:
            output = args[0] if args else kwargs["connector_output"]
            recving, sending = output.finished_recving, output.finished_sending
            if recving or sending:
                t = time_ns()
                for rid in recving or ():
                    _EMIT((KV_READY, rid, t))
                for rid in sending or ():
                    _EMIT((RELEASED, rid, t))
        except Exception:
            _hook_failed("KVConnector.update_connector_output")
        return wrapped(self, *args, **kwargs)
    return update_connector_output


def conn_request_finished(wrapped: Callable[..., Any]) -> Probe:
    def request_finished(self, *args, **kwargs):
        out = wrapped(self, *args, **kwargs)
        try:
            delay_free, params = out
            request = args[0] if args else kwargs["request"]
            if delay_free:
                _EMIT((HOLD, request.request_id, time_ns()))
            if isinstance(params, dict) and _TRACEPARENT not in params:
                # The decode engine gets these params back through the router: the
                # traceparent makes its spans children of this request's vllm.prefill span.
                # The one piece of formatting done here, because it must ride the result.
                # The trace is the caller's when the request came with one.
                key = external_request_id(request.request_id)
                headers = getattr(request, "trace_headers", None)
                trace_id, _ = effective_trace(key, headers.get(_TRACEPARENT) if headers else None)
                params = dict(params)
                params[_TRACEPARENT] = format_traceparent(
                    trace_id, span_id_for(key, semconv.SPAN_PREFILL))
                return delay_free, params
        except Exception:
            _hook_failed("KVConnector.request_finished")
        return out
    return request_finished


# -- connector, worker side --------------------------------------------------------------------
def conn_register_kv_caches(wrapped: Callable[..., Any]) -> Probe:
    def register_kv_caches(self, *args, **kwargs):
        out = wrapped(self, *args, **kwargs)
        try:  # once per engine: not a hot path
            kv_caches = args[0] if args else kwargs["kv_caches"]
            num_blocks = self._kv_cache_config.num_blocks
            block_size = self._vllm_config.cache_config.block_size
            # Layers are views into one allocation; two layers sharing the very same view
            # (hybrid allocators) are counted once.
            seen, total = set(), 0
            for tensor in kv_caches.values():
                view = (tensor.data_ptr(), tensor.nbytes)
                if view not in seen:
                    seen.add(view)
                    total += tensor.nbytes
            _EMIT((KV_LAYOUT, total // num_blocks, block_size, len(kv_caches)))
        except Exception:
            _hook_failed("KVConnector.register_kv_caches")
        return out
    return register_kv_caches


def conn_transfer_results(wrapped: Callable[..., Any]) -> Probe:
    def get_transfer_results(self, *args, **kwargs):
        out = wrapped(self, *args, **kwargs)
        try:
            done = out.finished_recving
            if done:
                t = time_ns()
                # Failed receives are reported among the finished ones (vLLM then recomputes
                # or fails the request): their transfer must not look like a success.
                failed = getattr(out, "failed_recving", None) or ()
                for rid in done:
                    _EMIT((LOAD_DONE, rid, t, rid not in failed))
        except Exception:
            _hook_failed("KVConnector.get_transfer_results")
        return out
    return get_transfer_results


def nixl_reap_expired_send_leases(wrapped: Callable[..., Any]) -> Probe:
    # Prefill worker, once per get_transfer_results: releases KV whose send lease ran out,
    # into done_sending, whether or not a decode worker ever read it.
    def _reap_expired_send_leases(self, *args, **kwargs):
        pending = self._reqs_to_send
        if not pending:
            return wrapped(self, *args, **kwargs)
        done = args[0] if args else kwargs["done_sending"]
        try:
            before = set(done)
            counts = dict(self.consumer_notification_counts_by_req)
        except Exception:
            _hook_failed("NixlConnectorWorker._reap_expired_send_leases")
            return wrapped(self, *args, **kwargs)
        out = wrapped(self, *args, **kwargs)
        try:
            expired = done - before
            if expired:
                t = time_ns()
                for rid in expired:
                    _EMIT((LEASE_EXPIRED, rid, t, int(counts.get(rid, 0))))
        except Exception:
            _hook_failed("NixlConnectorWorker._reap_expired_send_leases")
        return out
    return _reap_expired_send_leases


def nixl_start_load_kv(wrapped: Callable[..., Any]) -> Probe:
    def start_load_kv(self, *args, **kwargs):
        try:
            reqs = self._connector_metadata.reqs_to_recv
            if reqs:
                t = time_ns()
                known = self.connector_worker._remote_agents
                for rid, m in reqs.items():  # once per request, not per step
                    ids = m.local_block_ids  # one list per KV cache group
                    blocks = len(ids[0]) if ids and isinstance(ids[0], (list, tuple)) else len(ids)
                    r = m.remote
                    _EMIT((LOAD_START, rid, t, blocks, r.request_id, r.engine_id, r.host,
                           r.engine_id not in known))
        except Exception:
            _hook_failed("NixlConnector.start_load_kv")
        return wrapped(self, *args, **kwargs)
    return start_load_kv


def nixl_kv_connector_stats(wrapped: Callable[..., Any]) -> Probe:
    def get_kv_connector_stats(self, *args, **kwargs):
        out = wrapped(self, *args, **kwargs)
        try:
            if out is not None:
                data = out.data
                if data and data.get("bytes_transferred"):
                    # Copies: the stats object is reset and reused by the connector.
                    _EMIT((XFER_STATS, time_ns(), list(data["bytes_transferred"]),
                           list(data.get("num_descriptors") or ()),
                           list(data.get("transfer_duration") or ())))
        except Exception:
            _hook_failed("NixlConnector.get_kv_connector_stats")
        return out
    return get_kv_connector_stats


def nixl_pop_done_transfers(wrapped: Callable[..., Any]) -> Probe:
    # Decode worker, every step: polls its KV loads' NIXL handles. Only while loads are in
    # flight does the probe do anything: it names each handle's request for the
    # getXferTelemetry probe, and notes the poll (which loads were still in flight).
    def _pop_done_transfers(self, *args, **kwargs):
        transfers = args[0] if args else kwargs.get("transfers")
        if not transfers or transfers is not getattr(self, "_recving_transfers", None):
            return wrapped(self, *args, **kwargs)
        owners = _HANDLE_OWNER
        try:
            for rid, handles in transfers.items():
                for h in handles:
                    owners[h] = rid
        except Exception:
            _hook_failed("NixlConnectorWorker._pop_done_transfers")
        try:
            return wrapped(self, *args, **kwargs)
        finally:
            try:
                owners.clear()
                _EMIT((XFER_POLL, time_ns(), tuple(transfers)))
            except Exception:
                _hook_failed("NixlConnectorWorker._pop_done_transfers")
    return _pop_done_transfers


def nixl_get_xfer_telemetry(wrapped: Callable[..., Any]) -> Probe:
    # nixl_agent.get_xfer_telemetry: vLLM asks once per finished handle; the probe keeps a
    # copy for the handle's request (known only inside the poll above).
    def get_xfer_telemetry(self, *args, **kwargs):
        out = wrapped(self, *args, **kwargs)
        try:
            rid = _HANDLE_OWNER.get(args[0] if args else kwargs.get("handle"))
            if rid is not None and out is not None:
                _EMIT((XFER_TELEMETRY, rid, time_ns(), monotonic_ns(), int(out.startTime),
                       int(out.postDuration), int(out.xferDuration), int(out.totalBytes),
                       int(out.descCount)))
        except Exception:
            _hook_failed("nixl_agent.get_xfer_telemetry")
        return out
    return get_xfer_telemetry


def nixl_handshake(wrapped: Callable[..., Any]) -> Probe:
    def _nixl_handshake(self, *args, **kwargs):
        t0 = time_ns()
        ok = False
        try:
            out = wrapped(self, *args, **kwargs)
            ok = True
            return out
        finally:
            try:
                engine = args[3] if len(args) > 3 else kwargs.get("expected_engine_id")
                _EMIT((HANDSHAKE, str(engine), t0, time_ns(), ok))
            except Exception:
                _hook_failed("NixlConnectorWorker._nixl_handshake")
    return _nixl_handshake


def example_save_kv_layer(wrapped: Callable[..., Any]) -> Probe:
    # Called once per layer per step: two clock reads and a list write, nothing else.
    def save_kv_layer(self, *args, **kwargs):
        t0 = time_ns()
        out = wrapped(self, *args, **kwargs)
        try:
            step = _SAVE_STEP
            if step:
                step[1] = time_ns()
            else:
                step += (t0, time_ns())
        except Exception:
            _hook_failed("ExampleConnector.save_kv_layer")
        return out
    return save_kv_layer


def _file_requests(instance: Any, store: bool):
    """(request id, tokens) of the ExampleConnector metadata entries that store / load."""
    meta = instance._connector_metadata
    block_size = instance._block_size
    for rm in getattr(meta, "requests", ()):
        if rm.is_store == store and len(rm.slot_mapping):
            rid = _BLOCK_OWNER.get(int(rm.slot_mapping[0]) // block_size)
            if rid is not None:
                yield rid, len(rm.slot_mapping)


def example_wait_for_save(wrapped: Callable[..., Any]) -> Probe:
    def wait_for_save(self, *args, **kwargs):
        out = wrapped(self, *args, **kwargs)
        try:
            if _SAVE_STEP:
                t0, t1 = _SAVE_STEP
                _SAVE_STEP.clear()
                for rid, tokens in _file_requests(self, store=True):
                    _EMIT((SERIALIZE, rid, t0, t1, None, tokens))
        except Exception:
            _hook_failed("ExampleConnector.wait_for_save")
        return out
    return wait_for_save


def example_start_load_kv(wrapped: Callable[..., Any]) -> Probe:
    def start_load_kv(self, *args, **kwargs):
        t0 = time_ns()
        out = wrapped(self, *args, **kwargs)
        try:
            if self._connector_metadata.requests:
                t1 = time_ns()
                for rid, tokens in _file_requests(self, store=False):
                    _EMIT((DESERIALIZE, rid, t0, t1, None, tokens))
        except Exception:
            _hook_failed("ExampleConnector.start_load_kv")
        return out
    return start_load_kv


# Which connector methods each family gets (the scheduler-side set is common to all).
SCHEDULER_SIDE: dict[str, HookFactory] = {
    "get_num_new_matched_tokens": conn_get_num_new_matched_tokens,
    "update_connector_output": conn_update_connector_output,
    "request_finished": conn_request_finished,
    "request_finished_all_groups": conn_request_finished,
    "register_kv_caches": conn_register_kv_caches,
}
PROFILES: dict[str, dict[str, HookFactory]] = {
    "nixl": {
        **SCHEDULER_SIDE,
        "start_load_kv": nixl_start_load_kv,
        "get_transfer_results": conn_transfer_results,
        "get_kv_connector_stats": nixl_kv_connector_stats,
    },
    "example": {
        **SCHEDULER_SIDE,
        "save_kv_layer": example_save_kv_layer,
        "wait_for_save": example_wait_for_save,
        "start_load_kv": example_start_load_kv,
    },
    "base": dict(SCHEDULER_SIDE),
}


def connector_profile(cls: type) -> str:
    """'nixl', 'example' or 'base' from a connector class's MRO."""
    names = {c.__name__ for c in cls.__mro__}
    if "NixlBaseConnector" in names or "NixlConnector" in names:
        return "nixl"
    if "ExampleConnector" in names or "SharedStorageConnector" in names:
        return "example"
    return "base"
