"""Probes of the TTFT legs without a vLLM engine: API-server hooks through a real Starlette
app, trace adoption, the decode hand-over, failed and expired transfers, crash reports."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace as NS

import pytest

from kvprof import semconv
from kvprof.probes import api_hooks, hooks, lifecycle
from kvprof.probes import events as ev
from kvprof.probes.assembler import ProcessFacts, SpanAssembler
from kvprof.probes.ids import format_traceparent, parse_traceparent, span_id_for, trace_id_for
from kvprof.probes.instrumentor import VllmInstrumentor

MS = 1_000_000
ROUTER_TRACE = 0x1234_5678_9ABC_DEF0_1234_5678_9ABC_DEF0
ROUTER_SPAN = 0x0BAD_CAFE_0000_0001
ROUTER_TP = format_traceparent(ROUTER_TRACE, ROUTER_SPAN)


class FakeAsyncLLM:
    """The two AsyncLLM-side calls the API hooks wrap, with vLLM 0.32's signatures."""

    def __init__(self, client):
        self.client = client

    async def add_request(self, request_id, prompt, params, arrival_time=None,
                          lora_request=None, tokenization_kwargs=None, trace_headers=None):
        request = NS(request_id=request_id + "-0000abcd", trace_headers=None)
        await self.client.add_request_async(request)
        return request


class FakeCoreClient:
    def __init__(self):
        self.sent = []

    async def add_request_async(self, request):
        self.sent.append(request)


class FakeOutputProcessor:
    def process_outputs(self, engine_core_outputs, engine_core_timestamp=None,
                        iteration_stats=None):
        return engine_core_outputs

    def propagate_error(self, e):
        return None


@pytest.fixture
def api_probes():
    """The API-server hooks installed on the fakes (and Starlette), events collected."""
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
    if stream:  # decode: first bytes, before the stream's end
        assert respond.end_ns < req.end_ns
    else:  # prefill: its whole answer
        assert respond.end_ns == req.end_ns
    assert req.attributes[semconv.ATTR_HTTP_STATUS] == 200 and req.error is None


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
    (event,) = [e for e in api_probes if e[0] == ev.API]
    spans = {s.name: s for s in SpanAssembler(ProcessFacts()).feed([event])}
    assert "error event" in spans[semconv.SPAN_API_REQUEST].error


def test_gets_and_health_checks_pass_untouched(api_probes):
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    app = Starlette(routes=[Route("/health", lambda r: PlainTextResponse("ok"))])
    with TestClient(app) as tc:
        assert tc.get("/health").text == "ok"
    assert api_probes == []


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
    deaths, inflight = lifecycle.death_report(tmp_path)
    assert [(d.pid, d.signal) for d in deaths] == [(100, "SIGILL"), (200, "SIGKILL")]
    assert deaths[0].stack[0] == '"attn.py", line 7 in forward'  # the faulting thread
    assert "VLLM::Worker (pid 100, vllm-decode, decode) died from SIGILL" in deaths[0].describe()
    assert inflight == ["cmpl-a-0-0000aaaa", "cmpl-b-0-0000bbbb"]
    # A SIGKILL after kvprof attach began stopping its command is part of the stop.
    later = json.loads((tmp_path / "exit-200.json").read_text())["t"] - 1
    assert [d.pid for d in lifecycle.death_report(tmp_path, stopping_since=later)[0]] == [100]
