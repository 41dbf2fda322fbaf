"""Probe internals without vLLM: ids, span assembly, OTLP/JSON files, recorder, exporters."""

from __future__ import annotations

import json
import logging
import os
import socket

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from otlp_files import file_spans

from kvprof import semconv
from kvprof.probes import events as ev
from kvprof.probes import hooks
from kvprof.probes.assembler import ProcessFacts, SpanAssembler
from kvprof.probes.config import ProbeConfig
from kvprof.probes.export import OtlpJsonFileExporter, to_readable_spans
from kvprof.probes.ids import (
    external_request_id,
    format_traceparent,
    parse_traceparent,
    span_id_for,
    trace_id_for,
)
from kvprof.probes.recorder import Recorder

MS = 1_000_000


def test_ids_are_shared_by_both_sides_and_traceparent_round_trips():
    assert external_request_id("cmpl-req-0-0-92a805db") == "cmpl-req-0-0"
    assert external_request_id("plain") == "plain"
    assert trace_id_for("a") == trace_id_for("a") != trace_id_for("b")
    tp = format_traceparent(trace_id_for("a"), span_id_for("a", "vllm.prefill"))
    assert parse_traceparent(tp) == (trace_id_for("a"), span_id_for("a", "vllm.prefill"))
    assert parse_traceparent("garbage") is None
    assert parse_traceparent(None) is None
    assert parse_traceparent("00-" + "0" * 32 + "-" + "1" * 16 + "-01") is None


def _prefill_events(rid="r-1-abcdef01"):
    params = {"do_remote_decode": True}
    return [
        (ev.ARRIVE, rid, 1001 * MS, 1000 * MS, 40, params),
        (ev.SCHEDULED, rid, 1002 * MS),
        (ev.HOLD, rid, 1010 * MS),
        (ev.FIRST_TOKEN, rid, 1002 * MS, 1009 * MS),
        (ev.FINISH, rid, 1011 * MS),
        (ev.RELEASED, rid, 1030 * MS),
    ]


def test_prefill_side_spans_and_parentage():
    spans = {s.name: s for s in SpanAssembler(ProcessFacts(connector="NixlPullConnector"))
             .feed(_prefill_events())}
    assert set(spans) == {semconv.SPAN_PREFILL, semconv.SPAN_PREFILL_QUEUE,
                          semconv.SPAN_PREFILL_COMPUTE, semconv.SPAN_KV_HOLD}
    top = spans[semconv.SPAN_PREFILL]
    assert top.trace_id == trace_id_for("r-1")
    assert top.span_id == span_id_for("r-1", semconv.SPAN_PREFILL) and top.parent_id is None
    assert (top.start_ns, top.end_ns) == (1000 * MS, 1030 * MS)
    # The queue starts when the scheduler got the request, not at the frontend's arrival.
    assert spans[semconv.SPAN_PREFILL_QUEUE].end_ns - spans[
        semconv.SPAN_PREFILL_QUEUE].start_ns == 1 * MS
    assert spans[semconv.SPAN_KV_HOLD].start_ns == 1010 * MS
    for s in spans.values():
        if s is not top:
            assert s.parent_id == top.span_id and s.trace_id == top.trace_id
        assert s.attributes[semconv.ATTR_ROLE] == "prefill"
        assert s.attributes[semconv.ATTR_KV_CONNECTOR] == "NixlPullConnector"


def test_decode_side_joins_through_traceparent_and_handshake_only_when_paid():
    key = "r-1"
    tp = format_traceparent(trace_id_for(key), span_id_for(key, semconv.SPAN_PREFILL))
    sched = SpanAssembler(ProcessFacts(connector="NixlPullConnector", profile="nixl"))
    params = {"do_remote_prefill": True, "remote_request_id": "r-1-abcdef01",
              semconv.TRACEPARENT_KEY: tp}
    out = sched.feed([
        (ev.ARRIVE, "r-1-0000aaaa", 2000 * MS, 2000 * MS, 40, params),
        (ev.KV_WAIT, "r-1-0000aaaa", 2001 * MS, 40),
        (ev.KV_READY, "r-1-0000aaaa", 2100 * MS),
        (ev.SCHEDULED, "r-1-0000aaaa", 2102 * MS),
        (ev.FIRST_TOKEN, "r-1-0000aaaa", 2102 * MS, 2110 * MS),
    ])
    names = {s.name: s for s in out}
    assert set(names) == {semconv.SPAN_DECODE, semconv.SPAN_DECODE_QUEUE,
                          semconv.SPAN_DECODE_KV_WAIT, semconv.SPAN_DECODE_FIRST_TOKEN}
    wait = names[semconv.SPAN_DECODE_KV_WAIT]  # request known -> KV ready seen
    assert (wait.start_ns, wait.end_ns) == (2000 * MS, 2100 * MS)
    assert names[semconv.SPAN_DECODE].parent_id == span_id_for(key, semconv.SPAN_PREFILL)
    assert names[semconv.SPAN_DECODE].trace_id == trace_id_for(key)

    worker = SpanAssembler(ProcessFacts(connector="NixlPullConnector", profile="nixl"))
    spans = worker.feed([
        (ev.KV_LAYOUT, 8192, 32, 2),
        (ev.LOAD_START, "r-1-0000aaaa", 2003 * MS, 2, "r-1-abcdef01", "eng", "127.0.0.1", True),
        (ev.HANDSHAKE, "eng", 2004 * MS, 2090 * MS, True),
        (ev.LOAD_DONE, "r-1-0000aaaa", 2095 * MS),
        (ev.XFER_STATS, 2096 * MS, [16384], [8], [0.004]),
        (ev.LOAD_START, "r-2-0000bbbb", 3000 * MS, 1, "r-2-abcdef02", "eng", "127.0.0.1", False),
        (ev.LOAD_DONE, "r-2-0000bbbb", 3001 * MS),
    ]) + worker.flush(10_000 * MS)
    by = [(s.name, s.attributes[semconv.ATTR_REQUEST_ID]) for s in spans]
    assert (semconv.SPAN_KV_HANDSHAKE, "r-1-0000aaaa") in by
    assert (semconv.SPAN_KV_HANDSHAKE, "r-2-0000bbbb") not in by
    t1 = next(s for s in spans if s.name == semconv.SPAN_KV_TRANSFER
              and s.attributes[semconv.ATTR_REQUEST_ID] == "r-1-0000aaaa")
    assert t1.start_ns == 2090 * MS  # the transfer starts once the handshake is done
    assert t1.attributes[semconv.ATTR_KV_BYTES] == 2 * 8192
    assert t1.attributes[semconv.ATTR_KV_DESCRIPTORS] == 8
    assert t1.attributes[semconv.ATTR_KV_GBPS] == pytest.approx(16384 / 0.004 / 1e9)
    assert t1.attributes[semconv.ATTR_KV_PATH] == "loopback"
    assert t1.parent_id == span_id_for(key, semconv.SPAN_DECODE)


def test_aggregated_request_gets_comparable_spans():
    a = SpanAssembler(ProcessFacts())
    spans = a.feed([
        (ev.ARRIVE, "x-1", 10 * MS, 10 * MS, 5, None), (ev.SCHEDULED, "x-1", 11 * MS),
        (ev.FIRST_TOKEN, "x-1", 12 * MS, 15 * MS), (ev.FINISH, "x-1", 40 * MS),
    ])
    names = sorted(s.name for s in spans)
    assert names == sorted([semconv.SPAN_REQUEST, semconv.SPAN_PREFILL_QUEUE,
                            semconv.SPAN_PREFILL_COMPUTE, semconv.SPAN_DECODE_FIRST_TOKEN])


def test_malformed_event_is_skipped_not_fatal():
    a = SpanAssembler()
    spans = a.feed([(ev.ARRIVE, "only-two-fields"), *_prefill_events()])
    assert any(s.name == semconv.SPAN_PREFILL for s in spans)


def test_in_memory_exporter_receives_sdk_spans():
    records = SpanAssembler().feed(_prefill_events())
    mem = InMemorySpanExporter()
    mem.export(to_readable_spans(records, Resource.create({"service.name": "t"})))
    got = mem.get_finished_spans()
    assert {s.name for s in got} == {r.name for r in records}
    top = next(s for s in got if s.name == semconv.SPAN_PREFILL)
    child = next(s for s in got if s.name == semconv.SPAN_KV_HOLD)
    assert child.parent.span_id == top.context.span_id
    assert top.resource.attributes["service.name"] == "t"


def test_file_exporter_writes_otlp_json_lines_and_rotates(tmp_path):
    records = SpanAssembler().feed(_prefill_events())
    spans = to_readable_spans(records, Resource.create({"service.name": "vllm-prefill"}))
    exp = OtlpJsonFileExporter(tmp_path, "kvprof-test", max_bytes=4096)
    for _ in range(6):
        exp.export(spans)
    exp.shutdown()
    files = sorted(tmp_path.glob("*.jsonl"))
    assert len(files) > 1  # rotated
    for f in files:
        for line in f.read_text().splitlines():
            doc = json.loads(line)  # every line a whole ExportTraceServiceRequest
            rs = doc["resourceSpans"][0]
            sp = rs["scopeSpans"][0]["spans"]
            for s in sp:
                assert len(s["traceId"]) == 32 and int(s["traceId"], 16)
                assert len(s["spanId"]) == 16
                assert isinstance(s["startTimeUnixNano"], str)
                for a in s.get("attributes", []):
                    assert set(a["value"]) <= {"stringValue", "intValue", "doubleValue",
                                               "boolValue"}
    first = json.loads(files[0].read_text().splitlines()[0])
    top = next(s for s in first["resourceSpans"][0]["scopeSpans"][0]["spans"]
               if s["name"] == semconv.SPAN_PREFILL)
    assert top["traceId"] == f"{trace_id_for('r-1'):032x}"
    attrs = {a["key"]: a["value"] for a in top["attributes"]}
    assert attrs[semconv.ATTR_PROMPT_TOKENS] == {"intValue": "40"}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_exporter_down_drops_with_one_warning_and_a_count(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    cfg = ProbeConfig(enabled=True, exporter="otlp", stats_dir=str(tmp_path))
    rec = Recorder(cfg)
    with caplog.at_level(logging.WARNING, logger="kvprof.probes.recorder"):
        for i in range(2):
            for e in _prefill_events(f"r-{i}-abcdef01"):
                rec.emit(e)
            rec.flush()
    rec.shutdown()
    assert rec.exported == 0 and rec.dropped == 8
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1
    stats = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert stats["dropped"] == 8 and stats["destination"].startswith("otlp http")


def test_recorder_exports_to_files_and_counts(tmp_path):
    cfg = ProbeConfig(enabled=True, exporter="file", output=str(tmp_path / "t"),
                      stats_dir=str(tmp_path / "s"), flush_interval_s=0.05)
    rec = Recorder(cfg)
    rec.start()
    for e in _prefill_events():
        rec.emit(e)
    rec.shutdown()
    assert rec.exported == 4 and rec.dropped == 0
    assert list((tmp_path / "t").glob("*.jsonl"))
    stats = json.loads(next((tmp_path / "s").glob("*.json")).read_text())
    assert stats["exported"] == 4


def test_failing_recorder_never_reaches_the_host(caplog):
    def broken_emit(event):
        raise RuntimeError("recorder is broken")

    class Out:
        scheduled_new_reqs = [type("R", (), {"req_id": "a"})()]

    sentinel = Out()
    hooks.set_emit(broken_emit)
    hooks._failed.discard("Scheduler.schedule")
    try:
        with caplog.at_level(logging.WARNING, logger="kvprof.probes.hooks"):
            for _ in range(3):
                got = hooks.scheduler_schedule(lambda self: sentinel)(None)
                assert got is sentinel
    finally:
        hooks.set_emit(None)
        hooks.reset_state()
    assert sum("Scheduler.schedule" in r.getMessage() for r in caplog.records) == 1


def test_request_finished_adds_only_the_traceparent():
    events = []
    hooks.set_emit(events.append)
    req = type("Req", (), {"request_id": "cmpl-7-0-deadbeef"})()
    original = {"do_remote_prefill": True, "remote_block_ids": [1, 2]}
    try:
        delay, params = hooks.conn_request_finished(
            lambda self, r, b: (True, original))(None, req, [1, 2])
    finally:
        hooks.set_emit(None)
    assert delay is True and original == {"do_remote_prefill": True, "remote_block_ids": [1, 2]}
    assert {k: v for k, v in params.items() if k != semconv.TRACEPARENT_KEY} == original
    assert parse_traceparent(params[semconv.TRACEPARENT_KEY]) == (
        trace_id_for("cmpl-7-0"), span_id_for("cmpl-7-0", semconv.SPAN_PREFILL))
    assert events[0][:2] == (ev.HOLD, "cmpl-7-0-deadbeef")
    # No params (aggregated / decode side): result passes through untouched.
    out = (False, None)
    assert hooks.conn_request_finished(lambda self, r, b: out)(None, req, []) is out


def test_config_is_off_unless_enabled():
    assert not ProbeConfig.from_env({}).enabled
    cfg = ProbeConfig.from_env({semconv.ENV_ENABLED: "1", semconv.ENV_EXPORTER: "bogus"})
    assert cfg.enabled and cfg.exporter == "none"


def test_scheduler_probes_report_first_token_before_finish_and_aborts():
    """Through the installed probes: a request that ends on its first token, then an abort."""
    from types import SimpleNamespace as NS

    from kvprof.probes.instrumentor import VllmInstrumentor

    class Scheduler:
        def __init__(self):
            self.step = None

        def add_request(self, request):
            return None

        def schedule(self, throttle_prefills=False):
            return self.step

        def update_from_output(self, scheduler_output, model_runner_output):
            outs = model_runner_output
            for o in outs[0].outputs:
                if o.finish_reason is not None:
                    self._free_request(NS(request_id=o.request_id,
                                          status="FINISHED_LENGTH_CAPPED"))
            return outs

        def finish_requests(self, request_ids, finished_status):
            for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
                self._free_request(NS(request_id=rid, status="FINISHED_ABORTED"))
            return []

        def _free_request(self, request, delay_free_blocks=False):
            return None, None

    inst, events = VllmInstrumentor(), []
    hooks.set_emit(events.append)
    for name, factory in (("add_request", hooks.scheduler_add_request),
                          ("schedule", hooks.scheduler_schedule),
                          ("update_from_output", hooks.scheduler_update_from_output),
                          ("finish_requests", hooks.scheduler_finish_requests),
                          ("_free_request", hooks.scheduler_free_request)):
        assert inst._wrap(Scheduler, name, factory, name)
    try:
        s = Scheduler()
        for rid in ("one-1-0000aaaa", "two-1-0000bbbb"):
            s.add_request(NS(request_id=rid, arrival_time=1.7e9, num_prompt_tokens=7,
                             kv_transfer_params=None))
        s.step = NS(scheduled_new_reqs=[NS(req_id="one-1-0000aaaa"),
                                        NS(req_id="two-1-0000bbbb")])
        out = s.schedule()
        step = {0: NS(outputs=[NS(request_id="one-1-0000aaaa", new_token_ids=[3],
                                  finish_reason="length"),
                               NS(request_id="two-1-0000bbbb", new_token_ids=[4],
                                  finish_reason=None)])}
        assert s.update_from_output(out, step) is step
        s.step = NS(scheduled_new_reqs=[])
        s.update_from_output(s.schedule(), {0: NS(outputs=[])})  # steady step: no events
        # (a step record for each step, tests/test_probes_steps.py, left out here)
        n_steady = len([e for e in events if e[0] != ev.STEP])
        s.finish_requests("two-1-0000bbbb", "aborted")
    finally:
        hooks.set_emit(None)
        hooks.reset_state()
    kinds = [(e[0], e[1]) for e in events if e[0] != ev.STEP]
    assert kinds == [(ev.ARRIVE, "one-1-0000aaaa"), (ev.ARRIVE, "two-1-0000bbbb"),
                     (ev.SCHEDULED, "one-1-0000aaaa"), (ev.SCHEDULED, "two-1-0000bbbb"),
                     (ev.FIRST_TOKEN, "one-1-0000aaaa"), (ev.FIRST_TOKEN, "two-1-0000bbbb"),
                     (ev.FINISH, "one-1-0000aaaa"), (ev.FINISH, "two-1-0000bbbb")]
    assert n_steady == 7
    spans = SpanAssembler().feed(events)
    names = sorted(s.name for s in spans if s.attributes[semconv.ATTR_REQUEST_ID]
                   == "one-1-0000aaaa")
    assert names == sorted([semconv.SPAN_REQUEST, semconv.SPAN_PREFILL_QUEUE,
                            semconv.SPAN_PREFILL_COMPUTE, semconv.SPAN_DECODE_FIRST_TOKEN])
    # The finished request ends fine, the aborted one with an error status and the reason.
    tops = {s.attributes[semconv.ATTR_REQUEST_ID]: s for s in spans
            if s.name == semconv.SPAN_REQUEST}
    assert tops["one-1-0000aaaa"].error is None
    assert "FINISHED_ABORTED" in tops["two-1-0000bbbb"].error


def test_forked_child_exports_its_own_spans_to_its_own_file(tmp_path):
    """A fork (vLLM's EngineCore / workers where CUDA allows) gets its own recorder."""
    import multiprocessing
    import os

    from kvprof.probes import recorder as recorder_mod

    cfg = ProbeConfig(enabled=True, exporter="file", output=str(tmp_path / "t"),
                      stats_dir=str(tmp_path / "s"), service_name="fork")
    parent = Recorder(cfg)
    recorder_mod.set_recorder(parent)
    hooks.set_emit(parent.emit)
    parent.emit((ev.ARRIVE, "parent-only", 0, 1, 1, None))  # must not leak into the child
    try:
        def child():
            hooks.emit_target()((ev.ARRIVE, "c-1-0000aaaa", 0, 10 * MS, 5, None))
            for e in [(ev.SCHEDULED, "c-1-0000aaaa", 11 * MS),
                      (ev.FIRST_TOKEN, "c-1-0000aaaa", 11 * MS, 12 * MS),
                      (ev.FINISH, "c-1-0000aaaa", 13 * MS)]:
                hooks.emit_target()(e)

        proc = multiprocessing.get_context("fork").Process(target=child)
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0
    finally:
        hooks.set_emit(None)
        recorder_mod.set_recorder(None)
    stats = {json.loads(f.read_text())["pid"]: json.loads(f.read_text())
             for f in (tmp_path / "s").glob("*.json")}
    assert list(stats) == [proc.pid] and stats[proc.pid]["exported"] == 4
    names = [s["name"] for s in file_spans(tmp_path / "t")]
    assert sorted(names) == sorted([semconv.SPAN_REQUEST, semconv.SPAN_PREFILL_QUEUE,
                                    semconv.SPAN_PREFILL_COMPUTE,
                                    semconv.SPAN_DECODE_FIRST_TOKEN])
    assert parent.buffer and os.getpid() != proc.pid  # the parent's event stayed here


def test_drain_request_writes_out_what_only_an_exit_would_and_answers(tmp_path):
    """The launcher's stop drain: a request still open (which only the exit flush would
    write, and an engine killed at once never gets) goes out, and the stats file answers."""
    import time

    from kvprof.probes import drain

    stats = tmp_path / "s"
    cfg = ProbeConfig(enabled=True, exporter="file", output=str(tmp_path / "t"),
                      stats_dir=str(stats), flush_interval_s=0.05)
    rec = Recorder(cfg)
    rec.start()
    try:
        now = time.time_ns()  # recent: an ordinary flush forgets requests idle for minutes
        rec.emit((ev.ARRIVE, "r-9-abcdef09", now, now, 40, {"do_remote_decode": True}))
        rec.emit((ev.SCHEDULED, "r-9-abcdef09", now + MS))  # and never finished
        deadline = time.monotonic() + 10
        while (rec.buffer or not list(stats.glob("*.json"))) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # a few ordinary flushes: they keep the open request open
        assert rec.exported == 0 and not rec.buffer
        token = drain.request(str(stats))
        asked, left, _ = drain.wait(str(stats), token, 10.0)
        assert (asked, left) == (1, [])
        assert json.loads(next(stats.glob("*.json")).read_text())["drained"] == token
        spans = {s["name"]: s for s in file_spans(tmp_path / "t")}
        assert semconv.SPAN_PREFILL in spans, spans
        assert spans[semconv.SPAN_PREFILL]["status"]["code"] == 2  # error: it was cut short
        assert drain.pending(str(stats), token) == []
        assert drain.pending(str(stats), "another-token") == [os.getpid()]
    finally:
        rec.shutdown()
