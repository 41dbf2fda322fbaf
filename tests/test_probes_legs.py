"""Probes of the TTFT legs without a vLLM engine: API-server hooks through a real Starlette
app, trace adoption, the decode hand-over, failed and expired transfers, crash reports."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import inspect
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
from probes.api_fakes import FakeAsyncLLM, FakeCoreClient, FakeCycle, FakeOutputProcessor

from kvprof import semconv
from kvprof.probes import api_hooks, hooks, lifecycle, method_probes
from kvprof.probes import events as ev
from kvprof.probes.assembler import ProcessFacts, SpanAssembler
from kvprof.probes.ids import format_traceparent, parse_traceparent, span_id_for, trace_id_for
from kvprof.probes.instrumentor import VllmInstrumentor

MS = 1_000_000
ROUTER_TRACE = 0x1234_5678_9ABC_DEF0_1234_5678_9ABC_DEF0
ROUTER_SPAN = 0x0BAD_CAFE_0000_0001
ROUTER_TP = format_traceparent(ROUTER_TRACE, ROUTER_SPAN)


@pytest.fixture(params=["c", "python"])
def api_probes(request, monkeypatch):
    """The API-server hooks installed on the fakes (and Starlette), events collected; once
    with the request-path recordings in C (kvprof/probes/_fastrec.c), once in Python."""
    if request.param == "python":
        monkeypatch.setattr(api_hooks, "_C", None)
    elif api_hooks._C is None:
        pytest.skip("kvprof.probes._fastrec is not built here (no C compiler at install)")
    inst, events = VllmInstrumentor(), []
    hooks.set_emit(events.append)
    from starlette.applications import Starlette

    for owner, name, factory in (
            (FakeAsyncLLM, "add_request", api_hooks.async_llm_add_request),
            (FakeCoreClient, "add_request_async", api_hooks.core_client_add_request_async),
            (FakeOutputProcessor, "process_outputs",
             api_hooks.output_processor_process_outputs),
            (FakeOutputProcessor, "propagate_error",
             api_hooks.output_processor_propagate_error),
            (Starlette, "build_middleware_stack", api_hooks.starlette_build_middleware_stack)):
        assert inst._wrap(owner, name, factory, name)
    inst.is_instrumented = True
    try:
        yield events
    finally:
        inst.uninstrument()


def _app(role_params: dict, stream: bool):
    """A Starlette app whose endpoint does what vLLM's does: add_request, then wait for
    the first output, then stream (or return) the answer."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    client, outputs = FakeCoreClient(), FakeOutputProcessor()
    engine = FakeAsyncLLM(client)

    async def completions(request):
        await request.body()
        params = NS(extra_args={"kv_transfer_params": role_params} if role_params else None)
        sent = await engine.add_request("cmpl-xid-7-0", {"prompt": "p"}, params)
        await asyncio.sleep(0.002)
        outputs.process_outputs([NS(request_id=sent.request_id, new_token_ids=[5],
                                    finish_reason=None)])
        if not stream:
            return JSONResponse({"ok": True})

        async def chunks():
            yield b"data: first\n\n"
            await asyncio.sleep(0.002)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])]), client


def _post(app, headers):
    from starlette.testclient import TestClient

    with TestClient(app) as tc:
        return tc.post("/v1/completions", json={"prompt": "p"}, headers=headers)


@pytest.mark.parametrize("role,params,stream", [
    (semconv.ROLE_PREFILL, {"do_remote_decode": True}, False),
    (semconv.ROLE_DECODE, {"do_remote_prefill": True, "remote_request_id": "cmpl-xid-7-0-beef0001"},
     True),
])
def test_api_server_legs_through_a_real_asgi_app(api_probes, role, params, stream):
    app, client = _app(params, stream)
    r = _post(app, {"X-Request-Id": "xid-7", "traceparent": ROUTER_TP})
    assert r.status_code == 200
    # The EngineCore gets the caller's trace even though vLLM's own tracing is off.
    assert client.sent[0].trace_headers == {"traceparent": ROUTER_TP}
    (event,) = [e for e in api_probes if e[0] == ev.API]
    spans = {s.name: s for s in SpanAssembler(ProcessFacts()).feed([event])}
    assert set(spans) == set(semconv.API_SPANS)
    key = "cmpl-xid-7-0"
    top = span_id_for(key, semconv.SPAN_PREFILL if role == semconv.ROLE_PREFILL
                      else semconv.SPAN_DECODE)
    for s in spans.values():
        assert s.trace_id == ROUTER_TRACE and s.parent_id == top
        assert s.attributes[semconv.ATTR_ROLE] == role
        assert s.attributes[semconv.ATTR_X_REQUEST_ID] == "xid-7"
        assert s.end_ns >= s.start_ns
    req, inp, to_core = (spans[n] for n in (semconv.SPAN_API_REQUEST, semconv.SPAN_API_INPUT,
                                            semconv.SPAN_API_TO_CORE))
    wait, respond = spans[semconv.SPAN_API_WAIT], spans[semconv.SPAN_API_RESPOND]
    assert req.start_ns == inp.start_ns and inp.end_ns == to_core.start_ns
    assert to_core.end_ns == wait.start_ns and wait.end_ns == respond.start_ns
    assert wait.end_ns - wait.start_ns >= 2 * MS  # the endpoint's wait for its first output
    # The answer's first bytes (for the prefill engine's one-message JSON, all of it) go to
    # the server before the app returns: the request span ends at or after them.
    assert respond.end_ns <= req.end_ns
    if stream:
        assert req.end_ns - respond.end_ns >= 2 * MS  # the rest of the stream came later
    assert req.attributes[semconv.ATTR_HTTP_STATUS] == 200 and req.error is None


@contextlib.contextmanager
def _uvicorn(app, http_impl: str):
    """A real uvicorn serving ``app`` on 127.0.0.1 with kvprof's probes of its request
    cycle (as the instrumentor puts them into vLLM's API server); yields the port."""
    import importlib
    import threading

    import uvicorn

    inst = VllmInstrumentor()
    inst.is_instrumented = True
    targets = [t for t in inst.targets() if t.module.startswith("uvicorn.protocols.http.")
               and t.module.endswith(("httptools_impl", "h11_impl"))]
    for t in targets:
        inst._apply(t, importlib.import_module(t.module))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, http=http_impl,
                                           log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            threading.Event().wait(0.05)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        inst.uninstrument()
    # Uninstrumented: uvicorn's classes and modules are as they were.
    for t in targets:
        module = importlib.import_module(t.module)
        assert not hasattr(module.RequestResponseCycle, api_hooks.CYCLE_ATTR)
        assert not getattr(module.RequestResponseCycle.send, "__kvprof_probe__", False)
        assert not [n for n in vars(module) if n.startswith("_kvprof_")]


def _ended(api_probes, timeout_s: float = 10.0) -> list:
    """The HTTP record, once its end time is in (the server ends it after the app)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = [e for e in api_probes if e[0] == ev.API]
        if records and records[0][api_hooks.T_END] is not None:
            return records[0]
        time.sleep(0.02)
    raise AssertionError(f"the record never ended: {api_probes}")


@pytest.mark.parametrize("http_impl", ["httptools", "h11"])
def test_uvicorn_notes_the_first_bytes_itself(api_probes, http_impl, monkeypatch):
    """Under a real uvicorn (the server vLLM's API server runs on), its own
    RequestResponseCycle.send, probed, notes the status and the first body bytes: the app
    gets uvicorn's send unwrapped (no Python call added per streamed message), and the legs
    are the same as through the wrapper."""
    import http.client

    relays = []
    monkeypatch.setattr(api_hooks, "_relay", lambda *a: relays.append(a) or a[1])
    c_relays = api_hooks._C.relays if api_hooks._C is not None else 0
    app, client = _app({"do_remote_prefill": True, "remote_request_id": "p-1"}, stream=True)
    with _uvicorn(app, http_impl) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/completions", body=b'{"prompt": "p"}',
                     headers={"X-Request-Id": "xid-7", "traceparent": ROUTER_TP,
                              "content-type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
        conn.request("GET", "/health")  # a GET passes the probed send untouched
        conn.getresponse().read()
        conn.close()
    assert resp.status == 200 and body.startswith(b"data: first")
    assert relays == [], "the app got uvicorn's own send, no wrapper"
    if api_hooks._C is not None:
        assert api_hooks._C.relays == c_relays, "the app got uvicorn's own send, no relay"
    (event,) = [e for e in api_probes if e[0] == ev.API]
    assert event[api_hooks.STATUS] == 200 and event[api_hooks.T_FIRST_BYTES] is not None
    spans = {s.name: s for s in SpanAssembler(ProcessFacts()).feed([event])}
    respond, req = spans[semconv.SPAN_API_RESPOND], spans[semconv.SPAN_API_REQUEST]
    assert spans[semconv.SPAN_API_WAIT].end_ns == respond.start_ns <= respond.end_ns
    assert req.end_ns - respond.end_ns >= 2 * MS  # the rest of the stream came later
    assert req.trace_id == ROUTER_TRACE and client.sent[0].trace_headers == {
        "traceparent": ROUTER_TP}


def _stalling_app(after_first: str):
    """A streaming endpoint that sends its first chunk, then either waits for the client
    to leave ("wait") or fails ("raise")."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    engine, outputs = FakeAsyncLLM(FakeCoreClient()), FakeOutputProcessor()

    async def completions(request):
        sent = await engine.add_request("cmpl-xid-9-0", {"prompt": "p"}, NS(extra_args=None))
        outputs.process_outputs([NS(request_id=sent.request_id, new_token_ids=[5],
                                    finish_reason=None)])

        async def chunks():
            yield b"data: first\n\n"
            if after_first == "raise":
                raise RuntimeError("the stream failed")
            await asyncio.sleep(30)
            yield b"data: never\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])


@pytest.mark.parametrize("http_impl", ["httptools", "h11"])
@pytest.mark.parametrize("after_first", ["wait", "raise"])
def test_uvicorn_ends_a_response_that_never_completes(api_probes, http_impl, after_first):
    """A client that leaves mid-stream, or an app that fails after its first bytes: uvicorn
    never calls the cycle's on_response, and the record still ends, when the app has
    returned, with nothing left waiting."""
    import socket

    with _uvicorn(_stalling_app(after_first), http_impl) as port:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: t\r\nx-request-id: xid-9\r\n"
                     b"content-length: 2\r\n\r\n{}")
        got = b""
        while b"data: first" not in got:
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk
        t_left = time.time_ns()
        sock.close()  # leave (after a failure the server has closed it already)
        record = _ended(api_probes)
    assert b"data: first" in got
    assert record[api_hooks.STATUS] == 200
    assert record[api_hooks.T_RECV] < record[api_hooks.T_FIRST_BYTES] <= t_left
    if after_first == "wait":
        assert record[api_hooks.T_END] >= t_left  # when the app saw the client go
    assert record[api_hooks.T_END] >= record[api_hooks.T_FIRST_BYTES]
    assert api_hooks._AWAIT == {}


def test_api_span_errors_when_the_engine_dies_under_a_streaming_answer(api_probes):
    """The stream already said 200: the engine's death (AsyncLLM propagating the error to
    every request) marks the span failed."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    client = FakeCoreClient()
    engine = FakeAsyncLLM(client)

    async def completions(request):
        await engine.add_request("cmpl-bad-0", {"prompt": "p"}, NS(extra_args=None))

        async def chunks():
            FakeOutputProcessor().propagate_error(RuntimeError("EngineCore died"))
            yield b'data: {"error": {"message": "EngineDeadError"}}\n\n'

        return StreamingResponse(chunks(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
    assert _post(app, {"X-Request-Id": "bad"}).status_code == 200
    assert [e[0] for e in api_probes] == [ev.API, ev.ENGINE_DEAD]
    spans = {s.name: s for s in SpanAssembler(ProcessFacts()).feed(list(api_probes))}
    assert "error event" in spans[semconv.SPAN_API_REQUEST].error


def _two_call_record(impl: str, monkeypatch) -> tuple[list, list]:
    """One POST whose endpoint makes two engine calls (as an n > 1 fan-out does), decode
    side (kv_transfer_params naming the prefill request and trace), through the hooks in
    ``impl``; the API events and the spans they make."""
    with monkeypatch.context() as mp:
        if impl == "python":
            mp.setattr(api_hooks, "_C", None)
        inst, events = VllmInstrumentor(), []
        hooks.set_emit(events.append)
        from starlette.applications import Starlette
        from starlette.responses import StreamingResponse
        from starlette.routing import Route

        for owner, name, factory in (
                (FakeAsyncLLM, "add_request", api_hooks.async_llm_add_request),
                (FakeCoreClient, "add_request_async",
                 api_hooks.core_client_add_request_async),
                (FakeOutputProcessor, "process_outputs",
                 api_hooks.output_processor_process_outputs),
                (Starlette, "build_middleware_stack",
                 api_hooks.starlette_build_middleware_stack)):
            assert inst._wrap(owner, name, factory, name)
        inst.is_instrumented = True
        engine, outputs = FakeAsyncLLM(FakeCoreClient()), FakeOutputProcessor()
        kvp = {"do_remote_prefill": True, "remote_request_id": "cmpl-p-9-0",
               "remote_engine_id": "e-1", "remote_block_ids": [1, 2, 3],
               semconv.TRACEPARENT_KEY: ROUTER_TP}

        async def completions(request):
            sent = [await engine.add_request(f"cmpl-xid-7-{i}", {"prompt": "p"},
                                             NS(extra_args={"kv_transfer_params": kvp}))
                    for i in range(2)]
            outputs.process_outputs([NS(request_id=r.request_id, new_token_ids=[5],
                                        finish_reason=None) for r in sent])

            async def chunks():
                yield b"data: first\n\n"
                yield b"data: [DONE]\n\n"

            return StreamingResponse(chunks(), media_type="text/event-stream")

        app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
        try:
            asyncio.run(_serve_in_process(app, [(b"x-request-id", b"xid-7"),
                                                (b"traceparent", ROUTER_TP.encode())]))
        finally:
            inst.uninstrument()
            hooks.set_emit(None)
    records = [e for e in events if e[0] == ev.API]
    return records, SpanAssembler(ProcessFacts()).feed(records)


def test_the_c_record_reads_as_the_python_list(monkeypatch):
    """The C recordings' record (one object, times as integers, of the parameters only the
    kv_transfer_params fields the export thread reads) reads as the Python list does: the
    same values in the same positions, the same length and slices, the same spans."""
    if api_hooks._C is None:
        pytest.skip("kvprof.probes._fastrec is not built here (no C compiler at install)")
    (c,), c_spans = _two_call_record("c", monkeypatch)
    (py,), py_spans = _two_call_record("python", monkeypatch)
    assert type(c).__name__ == "Record" and type(py) is list
    assert len(c) == len(py) == api_hooks.EXTRA_CALLS + 1  # the second call
    times = {api_hooks.T_RECV, api_hooks.T_FIRST_BYTES, api_hooks.T_END, api_hooks.T_INPUT,
             api_hooks.T_HANDOFF, api_hooks.T_FIRST_OUTPUT}
    for a, b in [(c, py), (c[-1], py[-1])]:
        for i in range(api_hooks.EXTRA_CALLS):
            if i in times:
                assert (a[i] is None) == (b[i] is None), i
                assert a[i] is None or isinstance(a[i], int) and a[i] > 0, i
            elif i == api_hooks.EXTRA_ARGS:
                kept = {k: v for k, v in api_hooks.kv_transfer_params(b).items()
                        if k in api_hooks.KV_FIELDS}
                assert api_hooks.kv_transfer_params(a) == kept and len(kept) == 3
            else:
                assert a[i] == b[i], i
    assert c[api_hooks.XID] == b"xid-7" and c[api_hooks.RID] == "cmpl-xid-7-0"
    assert c[-1][api_hooks.RID] == "cmpl-xid-7-1" and c[-1][0] is None
    assert c[:api_hooks.STATUS] == [ev.API, *c[api_hooks.T_RECV:api_hooks.STATUS]]
    assert len(api_hooks.calls_of(c)) == 2 and "Record([30" in repr(c)
    with pytest.raises(IndexError):
        c[len(c)]

    def shape(spans):
        return sorted((s.name, s.trace_id, s.span_id, s.parent_id,
                       tuple(sorted(s.attributes.items()))) for s in spans)
    assert shape(c_spans) == shape(py_spans) and len(c_spans) == 10  # 5 a call


class _FalsyFails:
    """A body whose truth cannot be told: the recording of the response fails on it."""

    def __bool__(self):
        raise RuntimeError("no truth")


def _raw_app(messages: list, seen: list):
    """An ASGI app (no framework) that sends ``messages``, noting the API records emitted
    so far after each (``seen`` is the event list the hooks emit into)."""
    snapshots = []

    async def app(scope, receive, send):
        await receive()
        for m in messages:
            await send(m)
            records = [e for e in seen if e[0] == ev.API]
            snapshots.append(records[0][api_hooks.T_END] if records else "none")
    return app, snapshots


async def _send_nothing(message):
    return None


def _run_raw(app) -> None:
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [],
             "asgi": {"version": "3.0", "spec_version": "2.3"}}

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    asyncio.run(api_hooks.asgi_wrap(app)(scope, receive, _send_nothing))


def test_a_response_whose_recording_fails_still_ends_with_the_reason_logged(
        api_probes, monkeypatch, caplog):
    """The server's send carries a message the recording cannot read: the failure is
    logged once with its traceback, the response goes on, and the record still ends (a
    record with no end would count as in flight for ever)."""
    monkeypatch.setattr(hooks, "_failed", set())
    app, _ = _raw_app([{"type": "http.response.start", "status": 200, "headers": []},
                       {"type": "http.response.body", "body": _FalsyFails(),
                        "more_body": True},
                       {"type": "http.response.body", "body": b"", "more_body": False}],
                      api_probes)
    with caplog.at_level("WARNING", logger="kvprof.probes.hooks"):
        _run_raw(app)
    (record,) = [e for e in api_probes if e[0] == ev.API]
    assert record[api_hooks.STATUS] == 200 and record[api_hooks.T_END] is not None
    (warning,) = [r for r in caplog.records if "ASGI send" in r.getMessage()]
    assert warning.exc_info is not None and "no truth" in str(warning.exc_info[1])


def test_the_relay_ends_a_response_only_at_its_last_body(api_probes):
    """Messages that are not the body (an extension's, trailers) do not end the response
    early; the last body message (more_body false) does."""
    app, snapshots = _raw_app(
        [{"type": "http.response.start", "status": 201, "headers": []},
         {"type": "http.response.body", "body": b"a", "more_body": True},
         {"type": "http.response.debug", "info": {}},
         {"type": "http.response.body", "body": b"b", "more_body": False}], api_probes)
    _run_raw(app)
    assert snapshots[:3] == [None, None, None]
    if api_hooks._C is not None:  # the relay ends it there; Python's when the app returns
        assert snapshots[3] is not None
    (record,) = [e for e in api_probes if e[0] == ev.API]
    assert record[api_hooks.STATUS] == 201
    assert record[api_hooks.T_RECV] <= record[api_hooks.T_FIRST_BYTES] <= record[api_hooks.T_END]


def test_the_c_field_reads_follow_the_type_and_refuse_a_foreign_descriptor():
    """The C part reads vLLM's msgspec fields at their slot offsets: a field whose class
    changed is read the way Python reads it now, and a member descriptor copied from
    another class is refused as getattr refuses it (read at that class's offset, it would
    be memory past the object's end)."""
    if api_hooks._C is None:
        pytest.skip("kvprof.probes._fastrec is not built here (no C compiler at install)")
    from contextvars import copy_context

    import msgspec

    class Params(msgspec.Struct, dict=True):
        extra_args: dict | None = None

    def kept(params) -> dict | None:
        def run():
            api_hooks._C.on_add_request("cmpl-f-0", params, None)
            return api_hooks.kv_transfer_params(api_hooks._CALL.get())
        return copy_context().run(run)

    decode = {"kv_transfer_params": {"do_remote_decode": True}}
    assert kept(Params(extra_args=decode)) == {"do_remote_decode": True}
    assert kept(Params(extra_args=None)) is None
    Params.extra_args = property(lambda self: {"kv_transfer_params": {
        "do_remote_prefill": True}})
    assert kept(Params(extra_args=decode)) == {"do_remote_prefill": True}

    class Big:
        __slots__ = ("a", "b", "c", "d", "e", "f", "g", "h")

    class Small:
        __slots__ = ()

    Small.extra_args = Big.__dict__["h"]
    with pytest.raises(TypeError):
        kept(Small())


def test_gets_and_health_checks_pass_untouched(api_probes):
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    app = Starlette(routes=[Route("/health", lambda r: PlainTextResponse("ok"))])
    with TestClient(app) as tc:
        assert tc.get("/health").text == "ok"
    assert api_probes == []


async def _serve_in_process(app, headers: list[tuple[bytes, bytes]]) -> None:
    """One POST through the ASGI interface in a task of its own, as uvicorn runs it."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "POST", "path": "/v1/completions",
             "raw_path": b"/v1/completions", "query_string": b"", "headers": headers,
             "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000),
             "root_path": ""}
    messages = [{"type": "http.request", "body": b"{}", "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)  # until the response is done

    async def send(message):
        return None

    await asyncio.get_running_loop().create_task(app(scope, receive, send))


def test_the_c_recordings_are_built_where_a_compiler_is():
    """`make install` builds kvprof/probes/_fastrec.c (setup.py) where a C compiler is; its
    absence (where one is) would pass every test above on the Python versions alone."""
    import shutil
    import sysconfig

    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc}) here: the hooks run their Python versions")
    assert api_hooks._fastrec is not None, "kvprof/probes/_fastrec.c was not built (setup.py)"
    assert api_hooks.implementation() == "c"


def test_the_c_recordings_leak_nothing():
    """Reference counts in kvprof/probes/_fastrec.c: 2,000 requests (a probed uvicorn-like
    cycle and a plain server's send, a streamed answer, trace headers, an n > 1 call)
    leave no memory behind."""
    if api_hooks._C is None:
        pytest.skip("kvprof.probes._fastrec is not built here (no C compiler at install)")
    import tracemalloc

    inst, events = VllmInstrumentor(), []
    hooks.set_emit(events.append)
    from starlette.applications import Starlette

    class Cycle(FakeCycle):
        pass

    Cycle._kvprof_http = None
    for owner, name, factory in (
            (FakeAsyncLLM, "add_request", api_hooks.async_llm_add_request),
            (FakeCoreClient, "add_request_async", api_hooks.core_client_add_request_async),
            (FakeOutputProcessor, "process_outputs",
             api_hooks.output_processor_process_outputs),
            (Cycle, "send", api_hooks.uvicorn_cycle_send),
            (Starlette, "build_middleware_stack", api_hooks.starlette_build_middleware_stack)):
        assert inst._wrap(owner, name, factory, name)
    inst.is_instrumented = True
    app, client = _app({"do_remote_decode": True}, stream=True)
    headers = [(b"host", b"h"), (b"x-request-id", b"xid-7"),
               (b"traceparent", ROUTER_TP.encode())]
    on_response_calls = []

    async def serve(n):
        for i in range(n):
            scope = {"type": "http", "method": "POST", "path": "/v1/completions",
                     "headers": list(headers), "query_string": b"", "root_path": "",
                     "asgi": {"version": "3.0", "spec_version": "2.3"}}
            if i % 2:
                await _serve_in_process(app, list(headers))
            else:
                sent = False

                async def receive():
                    nonlocal sent
                    if not sent:
                        sent = True
                        return {"type": "http.request", "body": b"{}", "more_body": False}
                    await asyncio.sleep(3600)

                cycle = Cycle(lambda: on_response_calls.append(1))
                await asyncio.get_running_loop().create_task(
                    cycle.run_asgi(app, scope, receive))
            assert len(events) == 1 and events[0][api_hooks.T_END] is not None
            events.clear()
            client.sent.clear()

    try:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(serve(200))
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        loop.run_until_complete(serve(2000))
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        loop.close()
    finally:
        inst.uninstrument()
        hooks.set_emit(None)
    assert len(on_response_calls) == 1100  # uvicorn's own on_response still runs
    on_response_calls.clear()
    assert api_hooks._AWAIT == {}
    assert grown < 16_000, f"{grown} bytes kept by 2,000 requests"


def _qualname(obj) -> str:
    # Some objects (torch's op namespaces) answer any attribute, with something not a str.
    try:
        name = getattr(obj, "__qualname__", "")
    except Exception:
        return ""
    return name if isinstance(name, str) else ""


def test_api_records_are_freed_without_the_garbage_collector(api_probes):
    """No reference cycle among the per-request records: refcounting frees them (and the
    request's params) once the export thread lets go of the event, so the probes do not
    make the collector run."""
    app, _ = _app({"do_remote_decode": True}, stream=True)
    gc.collect()
    gc.disable()
    try:
        asyncio.run(_serve_in_process(app, [(b"x-request-id", b"xid-7")]))
        assert [e[0] for e in api_probes] == [ev.API]
        record = api_probes[0]
        assert record[api_hooks.T_END] is not None
        api_probes.clear()  # the export thread is done with it
        # Nothing else holds the record (the C recordings keep it out of the collector's
        # sight, where a cycle through it would leak: there is none).
        assert sys.getrefcount(record) == 2  # this name and the call's argument
        del record
        left = [o for o in gc.get_objects()
                if type(o) is list and len(o) >= api_hooks.EXTRA_CALLS
                and o[api_hooks.RID] == "cmpl-xid-7-0"
                or _qualname(o).endswith("_relay.<locals>.relay")
                or type(o).__name__ == "Ending"]
    finally:
        gc.enable()
    assert left == []
    assert api_hooks._AWAIT == {}


def test_a_call_after_an_ended_response_in_the_same_task_is_reported_on_its_own(api_probes):
    """A server that reused a task would leave the last HTTP record in its context: a later
    call outside any request is not filed under it (it would never be reported)."""
    client, outputs = FakeCoreClient(), FakeOutputProcessor()
    engine = FakeAsyncLLM(client)
    app, _ = _app(None, stream=False)

    async def main():
        await app({"type": "http", "method": "POST", "path": "/v1/completions",
                   "headers": [], "query_string": b""},
                  _once({"type": "http.request", "body": b"{}", "more_body": False}),
                  _ignore)
        # vLLM calls add_request with keywords; the probe takes them as the original does.
        sent = await engine.add_request(request_id="cmpl-late-0", prompt={"prompt": "p"},
                                        params=NS(extra_args=None),
                                        trace_headers={"traceparent": ROUTER_TP})
        outputs.process_outputs([NS(request_id=sent.request_id, new_token_ids=[1],
                                    finish_reason=None)])

    asyncio.run(main())
    late = [e for e in api_probes if e[0] == ev.API and e[api_hooks.RID] == "cmpl-late-0"]
    assert len(late) == 1
    # Its own trace, no HTTP part; out at its first output.
    assert late[0][api_hooks.TRACEPARENT] == ROUTER_TP and late[0][api_hooks.T_RECV] is None
    assert late[0][api_hooks.T_FIRST_OUTPUT] is not None
    assert client.sent[-1].trace_headers == {"traceparent": ROUTER_TP}
    # No HTTP request: the legs between AsyncLLM and the EngineCore only.
    assert {s.name for s in SpanAssembler(ProcessFacts()).feed(late)} == {
        semconv.SPAN_API_TO_CORE, semconv.SPAN_API_WAIT}


def test_concurrent_requests_and_their_child_tasks_keep_their_own_calls(api_probes):
    """Requests served at once, one of them fanning its prompts out to child tasks (as vLLM's
    merge_async_iterators does), with awaits between each call and its hand-off: every call
    ends up in its own request's record with its own hand-off (its EngineCore id)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    client, outputs = FakeCoreClient(), FakeOutputProcessor()

    class SlowAsyncLLM(FakeAsyncLLM):
        async def add_request(self, request_id, prompt, params, arrival_time=None,
                              lora_request=None, tokenization_kwargs=None, trace_headers=None):
            await asyncio.sleep(prompt["wait"])  # tokenizing: other tasks run meanwhile
            request = NS(request_id=request_id + "-0000abcd", trace_headers=None)
            await self.client.add_request_async(request)
            return request

    inst = VllmInstrumentor()
    assert inst._wrap(SlowAsyncLLM, "add_request", api_hooks.async_llm_add_request, "x")
    engine = SlowAsyncLLM(client)

    async def completions(request):
        xid = request.headers["x-request-id"]
        waits = [0.004, 0.001, 0.002] if xid == "batch" else [0.001]

        async def one(i, wait):
            sent = await engine.add_request(f"cmpl-{xid}-{i}", {"wait": wait},
                                            NS(extra_args=None))
            await asyncio.sleep(0.001)
            outputs.process_outputs([NS(request_id=sent.request_id, new_token_ids=[1],
                                        finish_reason=None)])

        await asyncio.gather(*(asyncio.get_running_loop().create_task(one(i, w))
                               for i, w in enumerate(waits)))
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])

    async def main():
        await asyncio.gather(*(_serve_in_process(app, [(b"x-request-id", xid)])
                               for xid in (b"a", b"batch", b"b")))

    try:
        asyncio.run(main())
    finally:
        inst.uninstrument()
    records = {e[api_hooks.XID]: e for e in api_probes if e[0] == ev.API}
    assert set(records) == {b"a", b"batch", b"b"}
    for xid, record in records.items():
        calls = api_hooks.calls_of(record)
        n = 3 if xid == b"batch" else 1
        assert sorted(c[api_hooks.RID] for c in calls) == [
            f"cmpl-{xid.decode()}-{i}" for i in range(n)]
        for c in calls:
            assert c[api_hooks.INTERNAL] == c[api_hooks.RID] + "-0000abcd"
            assert c[api_hooks.T_INPUT] <= c[api_hooks.T_HANDOFF] <= c[api_hooks.T_FIRST_OUTPUT]
    spans = SpanAssembler(ProcessFacts()).feed(list(records.values()))
    assert sum(s.name == semconv.SPAN_API_REQUEST for s in spans) == 5  # one per call
    assert api_hooks._AWAIT == {}


def test_requests_are_in_flight_until_their_response_ends(api_probes):
    """The record goes out when the request arrives; the export thread lists it as in flight
    (crash reports) until the response's end time is written, then makes its spans."""
    seen = {}
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    a = SpanAssembler(ProcessFacts())
    client = FakeCoreClient()
    engine = FakeAsyncLLM(client)

    async def completions(request):
        seen["before call"] = (a.feed(list(api_probes)), a.api_in_flight())
        await engine.add_request("cmpl-live-0", {"prompt": "p"}, NS(extra_args=None))
        seen["after call"] = (a.feed([]), a.api_in_flight())
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
    asyncio.run(_serve_in_process(app, [(b"x-request-id", b"live")]))
    assert seen["before call"] == ([], ["live"])  # the client's id until a call is made
    assert seen["after call"] == ([], ["cmpl-live-0"])
    spans = a.feed([])
    assert {s.name for s in spans} == {semconv.SPAN_API_REQUEST, semconv.SPAN_API_INPUT,
                                       semconv.SPAN_API_TO_CORE}  # no output came
    assert a.api_in_flight() == []


def test_only_responses_running_when_the_engine_dies_end_with_its_error(api_probes):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    engine = FakeAsyncLLM(FakeCoreClient())

    async def completions(request):
        xid = request.headers["x-request-id"]
        await engine.add_request(f"cmpl-{xid}-0", {"prompt": "p"}, NS(extra_args=None))
        if xid == "running":
            FakeOutputProcessor().propagate_error(RuntimeError("EngineCore died"))
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
    FakeOutputProcessor().propagate_error(RuntimeError("an earlier death"))  # before all

    async def main():
        await _serve_in_process(app, [(b"x-request-id", b"before")])
        await _serve_in_process(app, [(b"x-request-id", b"running")])
        await _serve_in_process(app, [(b"x-request-id", b"after")])

    asyncio.run(main())
    spans = SpanAssembler(ProcessFacts()).feed(list(api_probes))
    errors = {s.attributes[semconv.ATTR_X_REQUEST_ID]: s.error for s in spans
              if s.name == semconv.SPAN_API_REQUEST}
    assert errors["before"] is None and errors["after"] is None
    assert "error event" in errors["running"]


@pytest.mark.parametrize("headers", [
    [(b"x-request-id", b"xid-7"), (b"traceparent", ROUTER_TP.encode()), (b"host", b"h"),
     (b"accept", b"*/*")],
    [(b"host", b"h"), (b"traceparent", b"00-" + b"0" * 32 + b"-" + b"1" * 16 + b"-01"),
     (b"x-request-id", b"xid-7"), (b"traceparent", ROUTER_TP.encode())],
])
def test_the_last_x_request_id_and_traceparent_count_wherever_they_are(api_probes, headers):
    app, client = _app({"do_remote_decode": True}, stream=False)
    asyncio.run(_serve_in_process(app, headers))
    (record,) = api_probes
    assert record[api_hooks.XID] == b"xid-7" and record[api_hooks.HTTP_TRACEPARENT] == ROUTER_TP
    assert client.sent[0].trace_headers == {"traceparent": ROUTER_TP}


def _once(message):
    sent = []

    async def receive():
        if not sent:
            sent.append(message)
            return message
        await asyncio.sleep(3600)
    return receive


async def _ignore(message):
    return None


_DEFAULT = ["shared default"]


def test_method_probes_take_the_originals_own_parameters():
    """The method probes mirror the original's parameters (every kind, the same default
    objects), pass every argument on as it came and raise what the original raises."""
    seen = []

    def original(self, a, /, b, c=_DEFAULT, *args, d, e=5, **kw):
        return a, b, c, args, d, e, kw

    probe = method_probes.forwarding_probe(original, lambda *x: seen.append(x),
                                        (("b", None), ("e", None), ("absent", 1)))
    assert inspect.signature(probe) == inspect.signature(original)
    assert probe("s", 0, 1, d=4) == original("s", 0, 1, d=4)
    assert probe("s", 0, 1, d=4)[2] is _DEFAULT
    assert probe("s", 0, 1, 2, 3, d=4, e=6, x=9) == (0, 1, 2, (3,), 4, 6, {"x": 9})
    assert seen[0] == (1, 5, 0)  # by name, else by position (self is 0)
    with pytest.raises(TypeError):
        probe("s", 0, 1)  # d missing, as for the original
    gated = method_probes.forwarding_probe(original, lambda *x: seen.append(x),
                                        (("b", None),), only_if={})
    seen.clear()
    gated("s", 0, 1, d=4)
    assert seen == []  # recorded only while the gate is true


_SEEN: list = []


def _note(a, c):
    try:
        _SEEN.append((a, c))
    except Exception:
        pass


def _note_request(request):
    _SEEN.append(request)


def _sample(self, a, /, b, c=_DEFAULT, *args, d, e=5, **kw):
    """The original's docstring."""
    if a is None:
        raise ValueError("no a")
    return a, b, c, args, d, e, kw


async def _sample_async(self, request, extra=None):
    await asyncio.sleep(0)
    return request, extra


class _Base:
    def greet(self, who):
        return "hi " + who


class _Sub(_Base):
    def greet(self, who):
        return super().greet(who)  # needs the class cell: cannot be copied


def test_a_hooked_method_is_its_own_code_with_the_recording_first():
    """The cheapest hook: vLLM's function compiled again from its source with the recording
    statements first, the same in every other way (signature, default objects, docstring,
    line numbers, what it returns and raises); recording only while the gate is open."""
    gate: dict = {}
    copy = method_probes.with_prologue(_sample, _note, (("a", 1), ("d", None)), only_if=gate)
    assert copy is not None and copy.__code__ is not _sample.__code__
    assert inspect.signature(copy) == inspect.signature(_sample)
    assert copy.__doc__ == _sample.__doc__ and copy.__qualname__ == _sample.__qualname__
    assert copy("s", 1, 2, d=4) == _sample("s", 1, 2, d=4)
    assert copy("s", 1, 2, d=4)[2] is _DEFAULT  # the original's own default objects
    assert copy("s", 1, 2, 3, 9, d=4, e=6, x=1) == _sample("s", 1, 2, 3, 9, d=4, e=6, x=1)
    _SEEN.clear()
    copy("s", 1, 2, d=4)
    assert _SEEN == []  # gate closed
    gate["waiting"] = True
    copy("s", 1, 2, d=4)
    assert _SEEN == [(1, 4)]
    with pytest.raises(ValueError) as raised:
        copy("s", None, 2, d=4)
    frame = raised.traceback[-1]
    assert frame.path == Path(__file__) and frame.lineno + 1 == _sample.__code__.co_firstlineno + 3
    with pytest.raises(TypeError):
        copy("s", 1, 2)  # d missing, as for the original

    acopy = method_probes.with_prologue(_sample_async, _note_request, (("request", 1),))
    assert inspect.iscoroutinefunction(acopy)
    _SEEN.clear()
    assert asyncio.run(acopy("s", "r", extra=2)) == ("r", 2) and _SEEN == ["r"]


def test_what_cannot_be_copied_faithfully_gets_a_wrapper(tmp_path, monkeypatch):
    assert method_probes.with_prologue(_Sub.greet, _note_request, (("who", 1),)) is None

    # The source on disk is not what was loaded (upgraded in place, say).
    import importlib
    import linecache

    (tmp_path / "kvprof_sample_mod.py").write_text(
        "import os\n\n\ndef f(self, x):\n    return os.path.join(x, 'a')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("kvprof_sample_mod")
    assert method_probes.with_prologue(mod.f, _note_request, (("x", 1),)) is not None
    (tmp_path / "kvprof_sample_mod.py").write_text(
        "import os\n\n\ndef f(self, x):\n    return os.path.join(x, 'b')\n")
    linecache.clearcache()
    assert method_probes.with_prologue(mod.f, _note_request, (("x", 1),)) is None

    @functools.wraps(_sample)
    def decorated(*args, **kwargs):
        return _sample(*args, **kwargs)

    assert method_probes.with_prologue(decorated, _note, (("a", 1), ("d", None))) is None
    # The installer's choice: a probe with the same parameters, recording inlined.
    _SEEN.clear()
    probe = method_probes.method_probe(_Sub.greet, _note_request, (("who", 1),))
    assert probe(_Sub(), "you") == "hi you" and _SEEN == ["you"]
    assert inspect.signature(probe) == inspect.signature(_Sub.greet)


def test_vllms_own_api_server_methods_get_the_cheapest_hook():
    pytest.importorskip("vllm")
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.core_client import AsyncMPClient
    from vllm.v1.engine.output_processor import OutputProcessor

    for method, factory in ((AsyncLLM.add_request, api_hooks.async_llm_add_request),
                            (AsyncMPClient.add_request_async,
                             api_hooks.core_client_add_request_async),
                            (OutputProcessor.process_outputs,
                             api_hooks.output_processor_process_outputs)):
        hooked = factory(method)
        assert hooked.__code__.co_filename == method.__code__.co_filename, method
        assert hooked.__code__.co_firstlineno == method.__code__.co_firstlineno
        assert inspect.signature(hooked) == inspect.signature(method)


def test_engine_core_joins_the_callers_trace_and_hands_it_to_the_decode_side():
    # Prefill EngineCore: trace headers from the API server -> spans in the router's trace,
    # and the traceparent given to the decode side names that trace.
    rid = "cmpl-xid-7-0-0000aaaa"
    spans = SpanAssembler(ProcessFacts(connector="NixlPullConnector")).feed([
        (ev.ARRIVE, rid, 1001 * MS, 1000 * MS, 40, {"do_remote_decode": True}, ROUTER_TP),
        (ev.SCHEDULED, rid, 1002 * MS), (ev.HOLD, rid, 1010 * MS),
        (ev.FIRST_TOKEN, rid, 1002 * MS, 1009 * MS), (ev.FINISH, rid, 1011 * MS),
        (ev.RELEASED, rid, 1030 * MS)])
    top = next(s for s in spans if s.name == semconv.SPAN_PREFILL)
    assert top.trace_id == ROUTER_TRACE and top.parent_id == ROUTER_SPAN
    assert {s.trace_id for s in spans} == {ROUTER_TRACE}

    finished = hooks.conn_request_finished(lambda self, req, blocks: (True, {"remote": 1}))
    _, params = finished(None, NS(request_id=rid, trace_headers={"traceparent": ROUTER_TP}), [])
    assert parse_traceparent(params["traceparent"]) == (
        ROUTER_TRACE, span_id_for("cmpl-xid-7-0", semconv.SPAN_PREFILL))


def test_decode_worker_spans_wait_for_the_trace_the_prefill_side_named():
    key = "cmpl-xid-7-0"
    tp = format_traceparent(ROUTER_TRACE, span_id_for(key, semconv.SPAN_PREFILL))
    worker = SpanAssembler(ProcessFacts(connector="NixlPullConnector", profile="nixl"))
    rid = "cmpl-xid-7-0-0000bbbb"
    out = worker.feed([
        (ev.LOAD_START, rid, 2000 * MS, 2, key + "-0000aaaa", "eng", "127.0.0.1", False),
        (ev.LOAD_DONE, rid, 2010 * MS, True),
        (ev.XFER_STATS, 2011 * MS, [4096], [4], [0.001])])
    assert out == []  # the request reaches the worker only when it is scheduled
    out = worker.feed([(ev.REQ_TRACE, rid, tp)])
    (xfer,) = out
    assert xfer.name == semconv.SPAN_KV_TRANSFER and xfer.trace_id == ROUTER_TRACE
    assert xfer.parent_id == span_id_for(key, semconv.SPAN_DECODE) and xfer.error is None
    # Without a trace it still comes out, in the derived trace, once it waited long enough.
    late = worker.feed([(ev.LOAD_START, "r2-0000cccc", 3000 * MS, 1, "r2-0000dddd", "eng",
                         "127.0.0.1", False), (ev.LOAD_DONE, "r2-0000cccc", 3001 * MS, True)])
    late += worker.flush(10_000 * MS)
    assert [s.trace_id for s in late] == [trace_id_for("r2")]


def test_failed_receive_and_expired_lease_end_as_errors():
    worker = SpanAssembler(ProcessFacts(connector="NixlPullConnector", profile="nixl"))
    spans = worker.feed([
        (ev.LOAD_START, "r-1-0000aaaa", 10 * MS, 1, "r-1-0000bbbb", "eng", "10.0.0.1", False),
        (ev.LOAD_DONE, "r-1-0000aaaa", 12 * MS, False)]) + worker.flush(10_000 * MS)
    (xfer,) = spans
    assert "failed" in xfer.error and xfer.attributes[semconv.ATTR_FAILURE] == "transfer_failed"

    prefill_worker = SpanAssembler(ProcessFacts(connector="NixlPullConnector"))
    (expired,) = prefill_worker.feed([(ev.LEASE_EXPIRED, "r-1-0000bbbb", 30_000 * MS, 0)])
    assert expired.name == semconv.SPAN_KV_LEASE_EXPIRED
    assert "lease expired" in expired.error and "0 decode" in expired.error
    assert expired.parent_id == span_id_for("r-1", semconv.SPAN_PREFILL)
    assert expired.attributes[semconv.ATTR_LEASE_RETRIEVED_BY] == 0


def test_lease_reaper_hook_reports_only_what_expired():
    emitted = []
    hooks.set_emit(emitted.append)

    def reap(self, done_sending):
        for rid in list(self._reqs_to_send):
            done_sending.add(rid)
            del self._reqs_to_send[rid]

    probe = hooks.nixl_reap_expired_send_leases(reap)
    worker = NS(_reqs_to_send={"a": 1.0}, consumer_notification_counts_by_req={"a": 0})
    try:
        done = {"finished-normally"}
        probe(worker, done)
        probe(NS(_reqs_to_send={}, consumer_notification_counts_by_req={}), set())
    finally:
        hooks.set_emit(None)
    assert [(e[0], e[1], e[3]) for e in emitted] == [(ev.LEASE_EXPIRED, "a", 0)]


def test_requests_open_at_exit_end_with_the_reason():
    a = SpanAssembler(ProcessFacts(connector="NixlPullConnector", profile="nixl"))
    a.feed([(ev.ARRIVE, "d-1-0000aaaa", 10 * MS, 10 * MS, 5,
             {"do_remote_prefill": True, "remote_request_id": "p-1-0000bbbb"}),
            (ev.KV_WAIT, "d-1-0000aaaa", 11 * MS, 5)])
    assert a.open_requests() == ["d-1-0000aaaa"]
    (top,) = a.close_open(50 * MS, "VLLM::Worker (pid 9) died from SIGILL")
    assert top.name == semconv.SPAN_DECODE and "SIGILL" in top.error
    assert top.attributes[semconv.ATTR_FAILURE] == "process_exit"
    assert a.open_requests() == []
    # Closed at a stop drain, the process goes on a moment: a step already under way still
    # reports the request, which must not open it again (same span ids, twice).
    late = [(ev.KV_READY, "d-1-0000aaaa", 51 * MS), (ev.SCHEDULED, "d-1-0000aaaa", 52 * MS),
            (ev.FIRST_TOKEN, "d-1-0000aaaa", 52 * MS, 53 * MS),
            (ev.FINISH, "d-1-0000aaaa", 54 * MS, "FINISHED_ABORTED")]
    assert a.feed(late) == [] and a.open_requests() == []
    # Other requests are untouched.
    later = a.feed([(ev.ARRIVE, "d-2-0000cccc", 60 * MS, 60 * MS, 5, None),
                    (ev.SCHEDULED, "d-2-0000cccc", 61 * MS),
                    (ev.FIRST_TOKEN, "d-2-0000cccc", 61 * MS, 62 * MS)])
    assert semconv.SPAN_PREFILL_COMPUTE in [s.name for s in later]


def test_the_api_server_names_the_requests_an_engine_death_hit():
    """Records of HTTP requests: one done before the death, one open across it, one whose
    error response ended right after it, one that arrived after it. The death hit the two
    in between, whatever the state of the records when the export thread reads them."""
    a = SpanAssembler(ProcessFacts())

    def record(rid, t_recv, t_end):
        h = [ev.API, t_recv, None, t_end, 200, b"x-" + rid.encode(), None, "/v1/completions",
             rid, t_recv + 1, None, None, t_recv + 2, rid + "-0000aaaa", None, True]
        assert len(h) == api_hooks.EXTRA_CALLS
        return h

    done, across, ended_after, later = (record("cmpl-done-0", 10 * MS, 20 * MS),
                                        record("cmpl-open-0", 30 * MS, None),
                                        record("cmpl-err-0", 35 * MS, 45 * MS),
                                        record("cmpl-late-0", 50 * MS, 51 * MS))
    a.feed([done, across, ended_after, (ev.ENGINE_DEAD, 40 * MS), later])
    assert a.in_flight_at_death == ["cmpl-err-0", "cmpl-open-0"]


def test_propagate_error_marks_the_death_once_per_call():
    emitted = []
    hooks.set_emit(emitted.append)
    try:
        probe = api_hooks.output_processor_propagate_error(lambda self, e: None)
        probe(object(), RuntimeError("EngineCore died"))
    finally:
        hooks.set_emit(None)
    assert [e[0] for e in emitted] == [ev.ENGINE_DEAD] and isinstance(emitted[0][1], int)


def test_death_report_reads_fault_files_and_reaped_exit_codes(tmp_path):
    (tmp_path / "100.json").write_text(json.dumps(
        {"pid": 100, "name": "VLLM::Worker", "service": "vllm-decode", "role": "decode",
         "inflight": ["cmpl-a-0-0000aaaa"], "clean_exit": False}))
    (tmp_path / "100.fault").write_text(
        "Fatal Python error: Illegal instruction\n\nThread 0x1 (most recent call first):\n"
        '  File "t.py", line 1 in monitor\n\nCurrent thread 0x2 (most recent call first):\n'
        '  File "attn.py", line 7 in forward\n  File "runner.py", line 3 in execute_model\n')
    (tmp_path / "200.json").write_text(json.dumps(
        {"pid": 200, "name": "VLLM::EngineCor", "clean_exit": False,
         "open_at_exit": ["cmpl-b-0-0000bbbb"]}))
    lifecycle.record_child_exit(str(tmp_path), 200, -9)
    (tmp_path / "300.json").write_text(json.dumps({"pid": 300, "clean_exit": False}))
    lifecycle.record_child_exit(str(tmp_path), 300, -15)  # a stop, not a crash
    deaths, inflight, exact = lifecycle.death_report(tmp_path)
    assert [(d.pid, d.signal) for d in deaths] == [(100, "SIGILL"), (200, "SIGKILL")]
    assert deaths[0].stack[0] == '"attn.py", line 7 in forward'  # the faulting thread
    assert "VLLM::Worker (pid 100, vllm-decode, decode) died from SIGILL" in deaths[0].describe()
    assert inflight == ["cmpl-a-0-0000aaaa", "cmpl-b-0-0000bbbb"] and not exact
    # An API server that outlived the death named what it hit: that list wins.
    (tmp_path / "400.json").write_text(json.dumps(
        {"pid": 400, "clean_exit": True, "inflight_at_death": ["cmpl-c-0"]}))
    assert lifecycle.death_report(tmp_path)[1:] == (["cmpl-c-0"], True)
    # A SIGKILL after kvprof attach began stopping its command is part of the stop.
    later = json.loads((tmp_path / "exit-200.json").read_text())["t"] - 1
    assert [d.pid for d in lifecycle.death_report(tmp_path, stopping_since=later)[0]] == [100]


def test_a_kv_both_engine_takes_its_role_from_what_its_requests_do():
    from kvprof.probes.config import ProbeConfig
    from kvprof.probes.recorder import engine_role, resource_attributes

    cfg = ProbeConfig(enabled=True)
    a = SpanAssembler(ProcessFacts(kv_role="kv_both"))
    assert engine_role(cfg, a.facts) == "kv_both"  # nothing seen yet
    a.feed([(ev.ARRIVE, "p-1-0000aaaa", 10 * MS, 10 * MS, 5, {"do_remote_decode": True})])
    assert engine_role(cfg, a.facts) == semconv.ROLE_PREFILL
    assert resource_attributes(cfg, a.facts)[semconv.RES_SERVICE_NAME] == "vllm-prefill"
    d = SpanAssembler(ProcessFacts(kv_role="kv_both"))  # a decode worker's process
    d.feed([(ev.LOAD_START, "d-1-0000bbbb", 10 * MS, 1, "p-1-0000aaaa", "e", "h", False)])
    assert engine_role(cfg, d.facts) == semconv.ROLE_DECODE
