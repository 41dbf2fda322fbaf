"""The wrapt wrappers put around vLLM's scheduler, model runner and KV connectors.

Every wrapper calls through with the original arguments and returns the original result
(the one exception: the prefill side's kv_transfer_params gain a ``traceparent`` key). What
it records is a tuple of timestamps and small ints handed to ``_EMIT``; any failure while
recording is swallowed and reported once, never raised into vLLM.
"""

from __future__ import annotations

import logging
from time import time_ns

from kvprof import semconv
from kvprof.probes import events as ev
from kvprof.probes.ids import external_request_id, format_traceparent, span_id_for, trace_id_for

log = logging.getLogger(__name__)


def _discard(event: tuple) -> None:
    return None


_EMIT = _discard  # replaced by the recorder's deque.append while instrumented
_failed: set[str] = set()
# id(SchedulerOutput) -> time schedule() started, for the step that produces a first token.
_STEP_START: dict[int, int] = {}
_SEEN_FIRST: set[str] = set()
# First KV block id -> request id, from the model runner's view of each step; connectors
# whose metadata has no request ids (ExampleConnector) are attributed through it.
_BLOCK_OWNER: dict[int, str] = {}
_SAVE_STEP: list[int] = []  # [first save_kv_layer start, last end] of the current step
_PARAM_KEYS = ("do_remote_decode", "do_remote_prefill", "remote_request_id", "remote_engine_id",
               "remote_host", semconv.TRACEPARENT_KEY)


def set_emit(emit) -> None:
    """Point every hook at a sink (the recorder's buffer append); None disconnects."""
    global _EMIT
    _EMIT = emit if emit is not None else _discard


def reset_state() -> None:
    """Forget per-step state (used when instrumentation is removed)."""
    _STEP_START.clear()
    _SEEN_FIRST.clear()
    _BLOCK_OWNER.clear()
    _SAVE_STEP.clear()


def _hook_failed(name: str) -> None:
    if name not in _failed:
        _failed.add(name)
        log.warning("kvprof: recording in hook %s failed; that hook records nothing more "
                    "useful until fixed (vLLM is unaffected)", name, exc_info=True)


# -- scheduler (EngineCore process) ------------------------------------------------------------
def scheduler_add_request(wrapped, instance, args, kwargs):
    try:
        request = args[0] if args else kwargs["request"]
        t = time_ns()
        arrival = getattr(request, "arrival_time", None)
        # arrival_time is the frontend's wall clock (s); older builds used monotonic time.
        arrival_ns = int(arrival * 1e9) if arrival and arrival > 1e9 else t
        kvp = getattr(request, "kv_transfer_params", None)
        params = {k: kvp[k] for k in _PARAM_KEYS if k in kvp} if kvp else None
        _EMIT((ev.ARRIVE, request.request_id, t, arrival_ns,
               getattr(request, "num_prompt_tokens", None), params))
    except Exception:
        _hook_failed("Scheduler.add_request")
    return wrapped(*args, **kwargs)


def scheduler_schedule(wrapped, instance, args, kwargs):
    t = time_ns()
    out = wrapped(*args, **kwargs)
    try:
        _STEP_START[id(out)] = t
        if len(_STEP_START) > 64:  # outputs never passed back (shutdown) must not pile up
            _STEP_START.pop(next(iter(_STEP_START)))
        for r in out.scheduled_new_reqs:
            _EMIT((ev.SCHEDULED, r.req_id, t))
    except Exception:
        _hook_failed("Scheduler.schedule")
    return out


def scheduler_update_from_output(wrapped, instance, args, kwargs):
    t = time_ns()
    out = wrapped(*args, **kwargs)
    try:
        sched_out = args[0] if args else kwargs.get("scheduler_output")
        step = _STEP_START.pop(id(sched_out), t)
        t_end = time_ns()
        seen = _SEEN_FIRST
        for outs in out.values():
            for o in outs.outputs:
                rid = o.request_id
                if o.new_token_ids and rid not in seen:
                    seen.add(rid)
                    _EMIT((ev.FIRST_TOKEN, rid, step, t))
                if o.finish_reason is not None:
                    seen.discard(rid)
                    _EMIT((ev.FINISH, rid, t_end))
    except Exception:
        _hook_failed("Scheduler.update_from_output")
    return out


def scheduler_finish_requests(wrapped, instance, args, kwargs):
    out = wrapped(*args, **kwargs)
    try:
        ids = args[0] if args else kwargs.get("request_ids")
        if ids is not None:
            t = time_ns()
            for rid in [ids] if isinstance(ids, str) else ids:
                _SEEN_FIRST.discard(rid)
                _EMIT((ev.FINISH, rid, t))
    except Exception:
        _hook_failed("Scheduler.finish_requests")
    return out


# -- model runner (worker process) -------------------------------------------------------------
def runner_execute_model(wrapped, instance, args, kwargs):
    try:
        sched_out = args[0] if args else kwargs.get("scheduler_output")
        owners = _BLOCK_OWNER
        for r in sched_out.scheduled_new_reqs:
            ids = r.block_ids
            if ids and ids[0]:
                owners[ids[0][0]] = r.req_id
        if len(owners) > 8192:
            owners.clear()
    except Exception:
        _hook_failed("GPUModelRunner.execute_model")
    return wrapped(*args, **kwargs)


# -- connector, scheduler side -----------------------------------------------------------------
def conn_get_num_new_matched_tokens(wrapped, instance, args, kwargs):
    out = wrapped(*args, **kwargs)
    try:
        count, load_async = out
        if load_async and count:
            request = args[0] if args else kwargs["request"]
            _EMIT((ev.KV_WAIT, request.request_id, time_ns(), int(count)))
    except Exception:
        _hook_failed("KVConnector.get_num_new_matched_tokens")
    return out


def conn_update_connector_output(wrapped, instance, args, kwargs):
    try:
        output = args[0] if args else kwargs["connector_output"]
        t = time_ns()
        for rid in output.finished_recving or ():
            _EMIT((ev.KV_READY, rid, t))
        for rid in output.finished_sending or ():
            _EMIT((ev.RELEASED, rid, t))
    except Exception:
        _hook_failed("KVConnector.update_connector_output")
    return wrapped(*args, **kwargs)


def conn_request_finished(wrapped, instance, args, kwargs):
    out = wrapped(*args, **kwargs)
    try:
        delay_free, params = out
        request = args[0] if args else kwargs["request"]
        if delay_free:
            _EMIT((ev.HOLD, request.request_id, time_ns()))
        if isinstance(params, dict) and semconv.TRACEPARENT_KEY not in params:
            # The decode engine gets these params back through the router: the traceparent
            # makes its spans children of this request's vllm.prefill span.
            key = external_request_id(request.request_id)
            params = dict(params)
            params[semconv.TRACEPARENT_KEY] = format_traceparent(
                trace_id_for(key), span_id_for(key, semconv.SPAN_PREFILL))
            return delay_free, params
    except Exception:
        _hook_failed("KVConnector.request_finished")
    return out


# -- connector, worker side --------------------------------------------------------------------
def conn_register_kv_caches(wrapped, instance, args, kwargs):
    out = wrapped(*args, **kwargs)
    try:
        kv_caches = args[0] if args else kwargs["kv_caches"]
        num_blocks = instance._kv_cache_config.num_blocks
        block_size = instance._vllm_config.cache_config.block_size
        # Layers are views into one allocation; two layers sharing the very same view
        # (hybrid allocators) are counted once.
        seen, total = set(), 0
        for tensor in kv_caches.values():
            view = (tensor.data_ptr(), tensor.nbytes)
            if view not in seen:
                seen.add(view)
                total += tensor.nbytes
        _EMIT((ev.KV_LAYOUT, total // num_blocks, block_size, len(kv_caches)))
    except Exception:
        _hook_failed("KVConnector.register_kv_caches")
    return out


def conn_transfer_results(wrapped, instance, args, kwargs):
    out = wrapped(*args, **kwargs)
    try:
        done = out.finished_recving
        if done:
            t = time_ns()
            for rid in done:
                _EMIT((ev.LOAD_DONE, rid, t))
    except Exception:
        _hook_failed("KVConnector.get_transfer_results")
    return out


def nixl_start_load_kv(wrapped, instance, args, kwargs):
    try:
        meta = instance._connector_metadata
        reqs = getattr(meta, "reqs_to_recv", None)
        if reqs:
            t = time_ns()
            worker = instance.connector_worker
            known = getattr(worker, "_remote_agents", {})
            for rid, m in reqs.items():
                ids = m.local_block_ids
                blocks = len(ids[0]) if ids and isinstance(ids[0], (list, tuple)) else len(ids)
                r = m.remote
                _EMIT((ev.LOAD_START, rid, t, blocks, r.request_id, r.engine_id, r.host,
                       r.engine_id not in known))
    except Exception:
        _hook_failed("NixlConnector.start_load_kv")
    return wrapped(*args, **kwargs)


def nixl_kv_connector_stats(wrapped, instance, args, kwargs):
    out = wrapped(*args, **kwargs)
    try:
        data = out.data if out is not None else None
        if data and data.get("bytes_transferred"):
            _EMIT((ev.XFER_STATS, time_ns(), list(data["bytes_transferred"]),
                   list(data.get("num_descriptors") or ()),
                   list(data.get("transfer_duration") or ())))
    except Exception:
        _hook_failed("NixlConnector.get_kv_connector_stats")
    return out


def nixl_handshake(wrapped, instance, args, kwargs):
    t0 = time_ns()
    ok = False
    try:
        out = wrapped(*args, **kwargs)
        ok = True
        return out
    finally:
        try:
            engine = args[3] if len(args) > 3 else kwargs.get("expected_engine_id")
            _EMIT((ev.HANDSHAKE, str(engine), t0, time_ns(), ok))
        except Exception:
            _hook_failed("NixlConnectorWorker._nixl_handshake")


def example_save_kv_layer(wrapped, instance, args, kwargs):
    t0 = time_ns()
    out = wrapped(*args, **kwargs)
    try:
        step = _SAVE_STEP
        if step:
            step[1] = time_ns()
        else:
            step.extend((t0, time_ns()))
    except Exception:
        _hook_failed("ExampleConnector.save_kv_layer")
    return out


def _file_requests(instance, store: bool):
    """(request id, tokens) of the ExampleConnector metadata entries that store / load."""
    meta = instance._connector_metadata
    block_size = instance._block_size
    for rm in getattr(meta, "requests", ()):
        if rm.is_store == store and len(rm.slot_mapping):
            rid = _BLOCK_OWNER.get(int(rm.slot_mapping[0]) // block_size)
            if rid is not None:
                yield rid, len(rm.slot_mapping)


def example_wait_for_save(wrapped, instance, args, kwargs):
    out = wrapped(*args, **kwargs)
    try:
        if _SAVE_STEP:
            t0, t1 = _SAVE_STEP
            _SAVE_STEP.clear()
            for rid, tokens in _file_requests(instance, store=True):
                _EMIT((ev.SERIALIZE, rid, t0, t1, None, tokens))
    except Exception:
        _hook_failed("ExampleConnector.wait_for_save")
    return out


def example_start_load_kv(wrapped, instance, args, kwargs):
    t0 = time_ns()
    out = wrapped(*args, **kwargs)
    try:
        t1 = time_ns()
        for rid, tokens in _file_requests(instance, store=False):
            _EMIT((ev.DESERIALIZE, rid, t0, t1, None, tokens))
    except Exception:
        _hook_failed("ExampleConnector.start_load_kv")
    return out


# Which connector methods each family gets (the scheduler-side set is common to all).
SCHEDULER_SIDE = {
    "get_num_new_matched_tokens": conn_get_num_new_matched_tokens,
    "update_connector_output": conn_update_connector_output,
    "request_finished": conn_request_finished,
    "request_finished_all_groups": conn_request_finished,
    "register_kv_caches": conn_register_kv_caches,
}
PROFILES = {
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
