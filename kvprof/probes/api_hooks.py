"""Probes in an engine's API-server process: HTTP receive -> input -> EngineCore -> response.

Where a request spends its time before the EngineCore sees it and after its first token
leaves it: vLLM's OpenAI server (ASGI app, AsyncLLM) or a Dynamo worker hosting AsyncLLM
directly (no HTTP: only the AsyncLLM part). Four hook points, each a few attribute writes:

* the ASGI app (outermost, wrapped when Starlette builds its middleware stack): request
  received (before the body is read), first response bytes written, response complete;
* ``AsyncLLM.add_request``: the serving layer is done (validated, tokenized);
* ``AsyncMPClient.add_request_async``: the request is handed to the EngineCore;
* ``OutputProcessor.process_outputs``: the first output is back from the EngineCore.

One event per engine request leaves through ``hooks._EMIT`` when its HTTP response is
complete (or at its first output when there is no HTTP server around it). A contextvar
carries the HTTP record from the ASGI layer down to AsyncLLM: the endpoint runs in the same
task (or a child task, which copies the context).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from contextvars import ContextVar
from time import time_ns
from typing import Any

from kvprof import semconv
from kvprof.probes import hooks
from kvprof.probes.events import API

_TRACEPARENT = semconv.TRACEPARENT_KEY
# Requests waiting for their first output, by the EngineCore's request id.
_AWAIT: dict[str, _Call] = {}
_AWAIT_LIMIT = 4096  # calls whose output never comes (aborted) must not pile up


class _Http:
    """One HTTP request seen at the ASGI layer."""

    __slots__ = ("t_recv", "t_first_bytes", "t_end", "status", "xid", "traceparent", "path",
                 "calls", "stream_error")

    def __init__(self, t_recv: int, path: str) -> None:
        self.t_recv = t_recv
        self.path = path
        self.t_first_bytes: int | None = None
        self.t_end: int | None = None
        self.status: int | None = None
        self.xid: str | None = None
        self.traceparent: str | None = None
        self.calls: list[_Call] = []
        self.stream_error = False


def _timed_send(h: _Http, send: Callable[..., Any]) -> Callable[..., Any]:
    """The ``send`` the app gets: notes the status and when the first body bytes go out;
    after that one flag test per message (a stream sends one per token). Not a coroutine:
    it returns the server's own awaitable, so no frame of ours is awaited."""
    seen = False

    def timed(message):
        nonlocal seen
        if not seen:
            if message["type"] == "http.response.start":
                h.status = message.get("status")
            elif message.get("body"):
                h.t_first_bytes = time_ns()
                seen = True
        return send(message)

    return timed


class _Call:
    """One engine request (AsyncLLM.add_request) and its hand-off / first-output times."""

    __slots__ = ("rid", "t_input", "t_handoff", "t_first_output", "ok", "internal", "params",
                 "traceparent", "http")

    def __init__(self, rid: str, t_input: int, params: Any, traceparent: str | None,
                 http: _Http | None) -> None:
        self.rid = rid
        self.t_input = t_input
        self.params = params
        self.traceparent = traceparent
        self.http = http
        self.t_handoff: int | None = None
        self.t_first_output: int | None = None
        self.ok = True
        self.internal: str | None = None


_HTTP: ContextVar[_Http | None] = ContextVar("kvprof_http", default=None)
# HTTP requests being served, for crash reports (what was in flight when a process died).
_LIVE: dict[int, _Http] = {}
_CALL: ContextVar[_Call | None] = ContextVar("kvprof_call", default=None)


def reset_state() -> None:
    """Forget calls in flight (instrumentation removed)."""
    _AWAIT.clear()
    _LIVE.clear()


def output_processor_propagate_error(wrapped: Callable[..., Any]) -> hooks.Probe:
    # AsyncLLM's output handler failed (the EngineCore died): every request being served
    # gets the error; their streams, which already said 200, end with an error event.
    def propagate_error(self, *args, **kwargs):
        try:
            for h in list(_LIVE.values()):
                h.stream_error = True
        except Exception:
            hooks._hook_failed("OutputProcessor.propagate_error")
        return wrapped(self, *args, **kwargs)
    return propagate_error


def in_flight() -> list[str]:
    """Request ids (or client ids) of the HTTP requests this process is serving now."""
    out = []
    for h in list(_LIVE.values()):
        out.extend(c.rid for c in h.calls)
        if not h.calls and h.xid:
            out.append(h.xid)
    return out


def _kv_params(params: Any) -> dict | None:
    extra = getattr(params, "extra_args", None)
    kvp = extra.get("kv_transfer_params") if extra else None
    # The request's own dict: the API server does not change it after add_request.
    return kvp if isinstance(kvp, dict) else None


def _emit_call(c: _Call) -> None:
    h = c.http
    http = None if h is None else (h.t_recv, h.t_first_bytes, h.t_end,
                                   599 if h.stream_error else h.status, h.xid, h.path)
    hooks._EMIT((API, c.rid, c.t_input, c.t_handoff, c.t_first_output, c.ok, c.internal,
                 _kv_params(c.params), c.traceparent or (h.traceparent if h else None), http))


# -- ASGI --------------------------------------------------------------------------------------
def asgi_wrap(app: Callable[..., Any]) -> Callable[..., Any]:
    """The ASGI app with kvprof's timing outermost; GETs and non-HTTP scopes pass straight on."""

    async def kvprof_asgi(scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST":
            return await app(scope, receive, send)
        h = _Http(time_ns(), scope.get("path", ""))
        try:
            for k, v in scope.get("headers") or ():
                if k == b"x-request-id":
                    h.xid = v.decode("latin-1")
                elif k == b"traceparent":
                    h.traceparent = v.decode("latin-1")
        except Exception:
            hooks._hook_failed("ASGI request headers")
        token = _HTTP.set(h)
        _LIVE[id(h)] = h
        try:
            return await app(scope, receive, _timed_send(h, send))
        finally:
            # The app returns once its last message is with the server.
            h.t_end = time_ns()
            _HTTP.reset(token)
            _LIVE.pop(id(h), None)
            try:
                for c in h.calls:
                    if c.internal is not None:
                        _AWAIT.pop(c.internal, None)
                    _emit_call(c)
            except Exception:
                hooks._hook_failed("ASGI response")

    kvprof_asgi.__kvprof_asgi__ = True  # type: ignore[attr-defined]
    return kvprof_asgi


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
def _arg_index(func: Callable[..., Any], name: str) -> int | None:
    """Position of parameter ``name`` in func's call (self excluded), None if absent."""
    try:
        params = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return None
    return params.index(name) - 1 if name in params else None


def async_llm_add_request(wrapped: Callable[..., Any]) -> hooks.Probe:
    # Resolved once: vLLM versions differ in the positions of these parameters.
    i_params = _arg_index(wrapped, "params")
    i_trace = _arg_index(wrapped, "trace_headers")

    # A plain function returning AsyncLLM's own coroutine (awaited by the caller): no
    # coroutine frame of ours per request. It runs in the caller's task, so the contextvar
    # it sets is the one add_request_async sees.
    def add_request(self, request_id, *args, **kwargs):
        try:
            t = time_ns()
            params = kwargs.get("params")
            if params is None and i_params is not None and len(args) >= i_params:
                params = args[i_params - 1]
            headers = kwargs.get("trace_headers")
            if headers is None and i_trace is not None and len(args) >= i_trace:
                headers = args[i_trace - 1]
            h = _HTTP.get()
            c = _Call(request_id, t, params,
                      headers.get(_TRACEPARENT) if isinstance(headers, dict) else None, h)
            if h is not None:
                h.calls.append(c)
            _CALL.set(c)
        except Exception:
            hooks._hook_failed("AsyncLLM.add_request")
        return wrapped(self, request_id, *args, **kwargs)
    return _as_coroutine_function(add_request)


def _as_coroutine_function(func: Callable[..., Any]) -> Callable[..., Any]:
    """Keep ``inspect.iscoroutinefunction`` true for a probe that returns the original's
    coroutine (code that checks it before awaiting sees what it saw before)."""
    mark = getattr(inspect, "markcoroutinefunction", None)  # Python >= 3.12
    if mark is not None:
        return mark(func)
    func._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]
    return func


def core_client_add_request_async(wrapped: Callable[..., Any]) -> hooks.Probe:
    def add_request_async(self, request, *args, **kwargs):
        try:
            c = _CALL.get()
            if c is not None and c.t_handoff is None:
                c.t_handoff = time_ns()
                c.internal = request.request_id
                aw = _AWAIT
                aw[c.internal] = c
                if len(aw) > _AWAIT_LIMIT:
                    for rid in list(aw)[: _AWAIT_LIMIT // 2]:
                        del aw[rid]
                tp = c.traceparent or (c.http.traceparent if c.http else None)
                if tp and not getattr(request, "trace_headers", None):
                    # AsyncLLM drops trace headers unless vLLM's own tracing is on; the
                    # EngineCore needs them so its spans join the caller's trace.
                    request.trace_headers = {_TRACEPARENT: tp}
        except Exception:
            hooks._hook_failed("EngineCoreClient.add_request_async")
        return wrapped(self, request, *args, **kwargs)
    return _as_coroutine_function(add_request_async)


def output_processor_process_outputs(wrapped: Callable[..., Any]) -> hooks.Probe:
    def process_outputs(self, engine_core_outputs, *args, **kwargs):
        aw = _AWAIT
        if aw:  # only while some request waits for its first output
            try:
                t = time_ns()
                for o in engine_core_outputs:
                    c = aw.get(o.request_id)
                    if c is not None and (o.new_token_ids or o.finish_reason is not None):
                        del aw[o.request_id]
                        c.t_first_output = t
                        c.ok = bool(o.new_token_ids)
                        if c.http is None:  # no HTTP response to wait for (Dynamo, LLM)
                            _emit_call(c)
            except Exception:
                hooks._hook_failed("OutputProcessor.process_outputs")
        return wrapped(self, engine_core_outputs, *args, **kwargs)
    return process_outputs
