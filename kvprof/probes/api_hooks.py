"""Probes in an engine's API-server process: HTTP receive -> input -> EngineCore -> response.

Where a request spends its time before the EngineCore sees it and after its first token
leaves it: vLLM's OpenAI server (ASGI app, AsyncLLM) or a Dynamo worker hosting AsyncLLM
directly (no HTTP: only the AsyncLLM part). Four hook points:

* the ASGI app (outermost, wrapped when Starlette builds its middleware stack): request
  received (before the body is read), response complete; and the first response bytes
  written, noted by uvicorn's own ``RequestResponseCycle.send`` (a copy with the recording
  statements first: a stream of N tokens sends N messages, and a wrapper around ``send``
  would add a Python call to each, 35-80 ns a token in the bench) or, under another server,
  by a wrapper around the ``send`` the app gets (in C a relay, one C call a message);
* ``AsyncLLM.add_request``: the serving layer is done (validated, tokenized);
* ``AsyncMPClient.add_request_async``: the request is handed to the EngineCore;
* ``OutputProcessor.process_outputs``: the first output is back from the EngineCore.

This runs on the frontend's event loop for every request, so it is written for cost
(bench/api_overhead.py measures it). Measured there, the cost is the code run cold (every
request's code evicts the last one's from the CPU's caches) and the memory kept (below):
so the work of each hook is one call into C where kvprof/probes/_fastrec.c is built
(setup.py, where a C compiler is at install), and the Python functions below, which do the
same, run where it is not (KVPROF_PURE_PYTHON=1 forces them; tests run both). In C the
ASGI wrapper is C too, and the record ends with the response (uvicorn's request cycle calls
its on_response, wrapped; elsewhere the relay sees the last message), so no coroutine of
ours stands around the app. On the request path the hooks take timestamps and references
to objects that exist anyway, into one flat record per HTTP request.
The record is the event: emitted when the request arrives and filled in afterwards, it is
kept by the export thread until the response's end time is in it (the last write), so it
is also the list of requests in flight (for crash reports) and nothing is emitted when the
response ends. Decoding the X-Request-Id, the status and error handling, ids, roles
and attributes happen in the export thread (assembler.SpanAssembler._on_api_event).

What a record keeps alive until the export thread has read it (up to a flush interval) is
kept small on purpose: memory a request frees is what the next one allocates, still in the
CPU's caches, and every object held back makes later allocations land on cold memory. So a
record holds the request's extra_args (its kv_transfer_params), not its params, and the
X-Request-Id's bytes, not the headers. The one header decoded on the path is the
traceparent: the EngineCore request must carry it when it leaves. The C recordings go
further (one object where the list is six int objects more; in the bench their memory kept
cost about as much as their work): a ``_fastrec.Record``, whose times are plain integers
and which keeps of the parameters only the kv_transfer_params fields the export thread
reads (KV_FIELDS; its ``extra_args`` reads back as {"kv_transfer_params": those}). It reads
as the list does (record[i], len, slices), so the export thread treats both alike.

The record (a list, or a Record; the position constants below name its fields):

    [API, t_recv, t_first_bytes, t_end, status, x_request_id (bytes), traceparent, path,
     request_id, t_input, extra_args, call_traceparent, t_handoff, internal_id,
     t_first_output, ok,   extra call, extra call, ...]

``t_end`` is None while the response runs. ``extra_args``: the SamplingParams' own dict,
which holds the kv_transfer_params (read off the path). ``call_traceparent``: set only when
the call brought trace headers of its own; else the HTTP request's counts. A response
running when AsyncLLM's output handler failed (the EngineCore died: an ENGINE_DEAD event
with its time) ends with an error, also a stream that already said 200: the export thread
tells from the times, so the request path keeps no count.

The HTTP request's first engine call (AsyncLLM.add_request; an n > 1 fan-out is one call)
is written into the record itself. A further call of the same HTTP request gets a list of
its own, of the same length and positions, with no HTTP part and None for the kind,
appended to the record. A call with no HTTP response around it (Dynamo, LLM) gets such a
list with the kind set, emitted at its first output.

A contextvar carries the record from the ASGI layer down to AsyncLLM (the endpoint runs in
the same task, or in a child task, which starts with a copy of the context). Only a call
with a list of its own sets a second one, for the hand-off probe of the task that made it
(between the two hooks are awaits, where other tasks run, some of the same HTTP request).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextvars import ContextVar
from time import time_ns
from typing import Any

from kvprof import semconv
from kvprof.probes import hooks
from kvprof.probes.events import API, ENGINE_DEAD
from kvprof.probes.method_probes import _as_coroutine_function, method_probe

try:  # the request-path work in C, built at install where a C compiler is (setup.py)
    from kvprof.probes import _fastrec
except ImportError:  # else the Python versions here, which do the same
    _fastrec = None

log = logging.getLogger(__name__)

_TRACEPARENT = semconv.TRACEPARENT_KEY
# Positions in the record (the hot path writes the numbers: a global name costs a lookup).
T_RECV, T_FIRST_BYTES, T_END, STATUS, XID, HTTP_TRACEPARENT, PATH = range(1, 8)
RID, T_INPUT, EXTRA_ARGS, TRACEPARENT, T_HANDOFF, INTERNAL, T_FIRST_OUTPUT, OK = range(8, 16)
EXTRA_CALLS = 16
# The kv_transfer_params fields the export thread reads (role, the prefill side's request id
# and trace): what a C record keeps of the request's parameters.
KV_FIELDS = ("do_remote_decode", "do_remote_prefill", "remote_request_id", _TRACEPARENT)

# Requests waiting for their first output, by the EngineCore's request id.
_AWAIT: dict[str, list] = {}
# The ASGI servers' send functions that note the status and first bytes themselves (probes
# of uvicorn's RequestResponseCycle.send): a response through one of them needs no wrapper.
_SEND_PROBES: set = set()
# The attribute of a server's request cycle that holds the HTTP record until the response's
# first bytes are out (the instrumentor gives the class a None default). The request path
# spells it out (``._kvprof_http``): an attribute read, not a getattr call.
CYCLE_ATTR = "_kvprof_http"
_AWAIT_LIMIT = 4096  # calls whose output never comes (aborted) must not pile up
_HTTP: ContextVar[list | None] = ContextVar("kvprof_http", default=None)
_CALL: ContextVar[list | None] = ContextVar("kvprof_call", default=None)


def reset_state() -> None:
    """Forget calls in flight (instrumentation removed)."""
    _AWAIT.clear()
    _SEND_PROBES.clear()


def calls_of(record: list) -> list[list]:
    """The engine calls in an HTTP record (the record itself holds the first)."""
    return ([record] if record[RID] is not None else []) + record[EXTRA_CALLS:]


def call_traceparent(call: list) -> str | None:
    """The traceparent a call's spans join: its own trace headers', else its HTTP
    request's (the record's own call leaves its slot empty then)."""
    return call[TRACEPARENT] or call[HTTP_TRACEPARENT]


def kv_transfer_params(call: list) -> dict | None:
    extra = call[EXTRA_ARGS]
    kvp = extra.get("kv_transfer_params") if isinstance(extra, dict) else None
    return kvp if isinstance(kvp, dict) else None


def output_processor_propagate_error(wrapped: Callable[..., Any]) -> hooks.Probe:
    # AsyncLLM's output handler failed (the EngineCore died): every request being served
    # gets the error. Only the time is noted: the export thread knows which responses were
    # running then (none of this is on a request's path).
    def propagate_error(self, *args, **kwargs):
        try:
            hooks._EMIT((ENGINE_DEAD, time_ns()))
        except Exception:
            hooks._hook_failed("OutputProcessor.propagate_error")
        return wrapped(self, *args, **kwargs)
    return propagate_error


# -- ASGI --------------------------------------------------------------------------------------
def asgi_wrap(app: Callable[..., Any]) -> Callable[..., Any]:
    """The ASGI app with kvprof's timing outermost; GETs and non-HTTP scopes pass straight on.
    In C (_fastrec.Hooks.wrap_asgi: the record ends with the response, through uvicorn's
    request cycle or a ``send`` of its own, so the server awaits the app's own coroutine),
    else in Python (a coroutine of ours ends it when the app returns)."""
    wrapper = _asgi_wrap_py(app) if _C is None else _as_coroutine_function(_C.wrap_asgi(app))
    wrapper.__kvprof_asgi__ = True  # type: ignore[attr-defined]
    return wrapper


def _asgi_wrap_py(app: Callable[..., Any]) -> Callable[..., Any]:
    # Read on the request path as closure cells, made together here, rather than as the
    # module's globals, whose entries lie apart (about 0.15 us a request in the bench).
    # ``emitter`` is the hooks module: its _EMIT is looked up on each use (set_emit).
    clock, kind, http, emitter, waiting, rev, sends = (
        time_ns, API, _HTTP, hooks, _AWAIT, reversed, _SEND_PROBES)

    async def kvprof_asgi(scope, receive, send):
        # Only HTTP scopes have a method (websocket and lifespan ones have none).
        if scope.get("method") != "POST":
            return await app(scope, receive, send)
        t = clock()
        xid = tp = None
        try:
            # The one pass over the headers: from the last (a header sent twice counts with
            # its last value) until both are found, which is soon when the router or caller
            # added them after the client library's own headers, and all of them otherwise.
            # A Python loop: cheaper than dict(headers), which hashes every (new) name. The
            # traceparent is decoded now (the EngineCore request takes a str), the
            # X-Request-Id later, off the path.
            for k, v in rev(scope["headers"]):
                if k == b"traceparent":
                    if tp is None:
                        tp = v
                        if xid is not None:
                            break
                elif k == b"x-request-id" and xid is None:
                    xid = v
                    if tp is not None:
                        break
            if tp is not None:
                tp = tp.decode("latin-1")
        except Exception:
            hooks._hook_failed("ASGI request headers")
        h = [kind, t, None, None, None, xid, tp, scope.get("path", ""),
             None, None, None, None, None, None, None, True]
        try:
            # uvicorn's send, probed: it notes the status and the first bytes itself.
            if send.__func__ in sends:
                send.__self__._kvprof_http = h
                out = send
            else:
                out = _relay(h, send)
        except AttributeError:  # not a bound method: another server's send
            out = _relay(h, send)
        try:
            emitter._EMIT(h)
            # Set and not reset: the server runs each request in a task of its own, whose
            # context goes with it; should one reuse a task, add_request sees the record
            # ended. Not set when the record could not go out (its calls report alone).
            http.set(h)
        except Exception:
            hooks._hook_failed("ASGI request")
        try:
            return await app(scope, receive, out)
        finally:
            # The app returns once its last message is with the server.
            t_end = clock()
            if waiting:
                _stop_waiting(h)
            # Last: once the export thread sees the end time, the record is complete.
            h[3] = t_end

    return kvprof_asgi


def _stop_waiting(h: list) -> None:
    """The response has ended: its calls whose first output never came stop waiting."""
    try:
        for c in calls_of(h):
            if c[14] is None and c[13] is not None:
                _AWAIT.pop(c[13], None)
    except Exception:
        hooks._hook_failed("ASGI response")


def _note_response(h: list, message: Any) -> bool:
    """A response message seen by the server's send: the status from the first one
    (http.response.start), the time of the first body bytes; True once those are out."""
    if h[4] is None:
        h[4] = message.get("status")
    elif message.get("body"):
        h[2] = time_ns()
        return True
    return False


def _relay(h: list, send: Callable[..., Any]) -> Callable[..., Any]:
    """The ``send`` the app gets under a server kvprof does not probe: notes the response
    until its first bytes are out, then one test of a closure cell per message. Not a
    coroutine: it returns the server's own awaitable, so no frame of ours is awaited."""
    first = True

    def relay(message):
        nonlocal first
        if first:
            try:
                first = not _note_response(h, message)
            except Exception:
                hooks._hook_failed("ASGI send")
        return send(message)
    return relay


def _on_send(cycle: Any, message: Any) -> None:
    # _note_response written out: this runs first in uvicorn's send, where a call of
    # ours for each of a response's first two messages costs more than the test that
    # every message pays (one attribute read, until the first bytes are out).
    if cycle._kvprof_http is not None:
        try:
            h = cycle._kvprof_http
            if h[4] is None:
                h[4] = message.get("status")
            elif message.get("body"):
                h[2] = time_ns()
                cycle._kvprof_http = None
        except Exception:
            hooks._hook_failed("uvicorn RequestResponseCycle.send")


def uvicorn_cycle_send(wrapped: Callable[..., Any]) -> hooks.Probe:
    """uvicorn's RequestResponseCycle.send (every HTTP implementation of it), noting the
    status and the first body bytes of a response the ASGI wrapper registered."""
    probe = method_probe(wrapped, _on_send if _C is None else _on_send_c,
                         (("self", 0), ("message", 1)))
    _SEND_PROBES.add(probe)
    return probe


def starlette_build_middleware_stack(wrapped: Callable[..., Any]) -> hooks.Probe:
    def build_middleware_stack(self, *args, **kwargs):
        app = wrapped(self, *args, **kwargs)
        try:
            if not getattr(app, "__kvprof_asgi__", False):
                return asgi_wrap(app)
        except Exception:
            hooks._hook_failed("Starlette.build_middleware_stack")
        return app
    return build_middleware_stack


# -- AsyncLLM ----------------------------------------------------------------------------------
def _on_add_request(request_id: str, params: Any, trace_headers: Any) -> None:
    try:
        t = time_ns()
        try:
            # The request's own dict (its kv_transfer_params are read by the export thread
            # once the record is out: the API server does not change them after this).
            extra = params.extra_args  # SamplingParams; PoolingParams have none
        except AttributeError:
            extra = None
        tp = None
        if trace_headers and isinstance(trace_headers, dict):
            tp = trace_headers.get(_TRACEPARENT)
        h = _HTTP.get()
        if h is None or h[3] is not None:  # no HTTP request around it, or one that ended
            c = [API, None, None, None, None, None, None, None,
                 request_id, t, extra, tp, None, None, None, True]
            _CALL.set(c)
            if len(_AWAIT) > _AWAIT_LIMIT:
                # Only such calls can wait for ever: an HTTP response's end ends its waits.
                _prune_waits()
        elif h[8] is None:  # the HTTP request's first call: into its record
            h[8] = request_id
            h[9] = t
            h[10] = extra
            if tp is not None:
                h[11] = tp
        else:
            c = [None, None, None, None, None, None, None, None,
                 request_id, t, extra, h[6] if tp is None else tp, None, None, None, True]
            h.append(c)
            _CALL.set(c)
    except Exception:
        hooks._hook_failed("AsyncLLM.add_request")


def _prune_waits() -> None:
    """Calls whose output never came (aborted, with no HTTP response to end them) must
    not pile up: the older half goes."""
    for old in list(_AWAIT)[: _AWAIT_LIMIT // 2]:
        del _AWAIT[old]


def async_llm_add_request(wrapped: Callable[..., Any]) -> hooks.Probe:
    # The recording runs in the task that awaits add_request (first thing in the copy's
    # coroutine; in a probe, before it returns AsyncLLM's coroutine), so the contextvar it
    # sets is the one add_request_async sees.
    return method_probe(
        wrapped, _on_add_request if _C is None else _on_add_request_c,
        (("request_id", 1), ("params", 3), ("trace_headers", None)))


def _on_handoff(request: Any) -> None:
    try:
        # The call is the HTTP record's own while the record holds no other (this task
        # made it: a call comes before its hand-off). Else the one this task made: a call
        # with a list of its own set _CALL in its task, while the record's own call sets
        # nothing, so the task that made that one sees _CALL unset (a task starts with a
        # copy of its parent's context).
        h = _HTTP.get()
        if h is not None and h[3] is None and len(h) == 16:
            c = h
        else:
            c = _CALL.get()
            if c is None and h is not None and h[3] is None:
                c = h
        if c is not None and c[8] is not None and c[12] is None:
            # the first hand-off of the call (n > 1 makes several)
            c[12] = time_ns()
            c[13] = rid = request.request_id
            _AWAIT[rid] = c
            tp = c[11] or c[6]
            if tp and not request.trace_headers:
                # AsyncLLM drops trace headers unless vLLM's own tracing is on; the
                # EngineCore needs them so its spans join the caller's trace.
                request.trace_headers = {_TRACEPARENT: tp}
    except Exception:
        hooks._hook_failed("EngineCoreClient.add_request_async")


def core_client_add_request_async(wrapped: Callable[..., Any]) -> hooks.Probe:
    return method_probe(wrapped, _on_handoff if _C is None else _on_handoff_c,
                        (("request", 1),))


def _on_outputs(engine_core_outputs: Any) -> None:
    try:
        aw = _AWAIT
        t = time_ns()
        for o in engine_core_outputs:
            c = aw.pop(o.request_id, None)
            if c is not None:
                tokens = o.new_token_ids
                if not tokens and o.finish_reason is None:
                    aw[o.request_id] = c  # not an output yet (no token, not finished)
                    continue
                c[14] = t
                c[15] = True if tokens else False
                if c[1] is None and c[0] is not None:
                    # No HTTP response around it to wait for (Dynamo, LLM): out now.
                    hooks._EMIT(c)
    except Exception:
        hooks._hook_failed("OutputProcessor.process_outputs")


def output_processor_process_outputs(wrapped: Callable[..., Any]) -> hooks.Probe:
    # Called every engine step: the outputs are looked at only while some request waits
    # for its first one (the truth of _AWAIT, the first test in the hooked function).
    return method_probe(wrapped, _on_outputs if _C is None else _on_outputs_c,
                        (("engine_core_outputs", 1),), only_if=_AWAIT)


# -- the same in C -----------------------------------------------------------------------------
# The recordings above, each one call into _fastrec (the hooked functions run these bodies
# first, as they run the Python ones). The C functions raise where the Python ones would
# have reported a failure; so do these.
def _on_add_request_c(request_id: str, params: Any, trace_headers: Any) -> None:
    try:
        _c_add_request(request_id, params, trace_headers)
    except Exception:
        hooks._hook_failed("AsyncLLM.add_request")


def _on_handoff_c(request: Any) -> None:
    try:
        _c_handoff(request)
    except Exception:
        hooks._hook_failed("EngineCoreClient.add_request_async")


def _on_send_c(cycle: Any, message: Any) -> None:
    if cycle._kvprof_http is not None:
        try:
            _c_send(cycle, message)
        except Exception:
            hooks._hook_failed("uvicorn RequestResponseCycle.send")


def _on_outputs_c(engine_core_outputs: Any) -> None:
    try:
        _c_outputs(engine_core_outputs)
    except Exception:
        hooks._hook_failed("OutputProcessor.process_outputs")


def _c_hooks() -> Any:
    """This module's state in a _fastrec.Hooks; None where the module is not built or
    KVPROF_PURE_PYTHON is set (the Python versions then)."""
    if _fastrec is None or os.environ.get("KVPROF_PURE_PYTHON"):
        return None
    try:
        return _fastrec.Hooks(_HTTP, _CALL, _AWAIT, _SEND_PROBES, hooks, API, _TRACEPARENT,
                              _AWAIT_LIMIT, CYCLE_ATTR, _prune_waits, hooks._hook_failed,
                              KV_FIELDS)
    except Exception:  # a build of another kvprof version: the Python recordings then
        log.warning("kvprof: %s does not match this kvprof; the API-server hooks run "
                    "their Python versions", _fastrec.__file__, exc_info=True)
        return None


_C = _c_hooks()
_c_add_request = _c_handoff = _c_outputs = _c_send = None
if _C is not None:
    _c_add_request, _c_handoff, _c_outputs, _c_send = (
        _C.on_add_request, _C.on_handoff, _C.on_outputs, _C.on_send)


def implementation() -> str:
    """Which implementation the hooks installed from now on use: "c" or "python"."""
    return "python" if _C is None else "c"
