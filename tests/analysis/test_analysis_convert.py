"""`kvprof traces convert`: OTLP <-> Jaeger <-> Perfetto round trips and the CLI."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES, run_kvprof

from kvprof.analysis.convert import convert_records
from kvprof.analysis.loaders.jaeger import jaeger_to_records
from kvprof.analysis.loaders.otlp import otlp_to_records
from kvprof.analysis.loaders.perfetto import perfetto_to_records
from kvprof.analysis.loaders.traces import load_records

KEEP = ("trace_id", "span_id", "parent_span_id", "name", "kind", "start_ns", "end_ns",
        "attributes", "resource", "status")


def _same(a: list[dict], b: list[dict]) -> None:
    key = lambda r: r["span_id"]  # noqa: E731
    a, b = sorted(a, key=key), sorted(b, key=key)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for k in KEEP:
            assert x[k] == y[k], (k, x[k], y[k])


def test_otlp_jaeger_otlp_keeps_ids_names_times_attributes(golden):
    records, _ = load_records(golden.traces)
    assert len(records) == 24 * 12
    jaeger = convert_records(records, "jaeger")
    back = list(jaeger_to_records(jaeger))
    _same(records, back)  # scenario times are whole microseconds, Jaeger's unit
    again = list(otlp_to_records(convert_records(back, "otlp")))
    _same(records, again)
    attrs = next(r for r in again if r["name"] == "kv.transfer")["attributes"]
    assert attrs["kv.bytes"] == 524_288_000 and isinstance(attrs["kv.bytes"], int)


def test_jaeger_fixture_round_trips_through_otlp():
    records, _ = load_records(FIXTURES / "jaeger_ui_testTraceNormal.json")
    back = list(jaeger_to_records(convert_records(list(otlp_to_records(
        convert_records(records, "otlp"))), "jaeger")))
    _same(records, back)
    kinds = {r["span_id"]: r["kind"] for r in back}
    assert kinds["e821b549888cbc3b"] == 2  # span.kind=server became OTLP SERVER and back


def test_otlp_fixture_to_jaeger_keeps_scope_and_kind():
    records, _ = load_records(FIXTURES / "otlp_opentelemetry-proto_examples_trace.json")
    jaeger = convert_records(records, "jaeger")
    span = jaeger["data"][0]["spans"][0]
    tags = {t["key"]: t["value"] for t in span["tags"]}
    assert tags["span.kind"] == "server" and tags["otel.scope.name"] == "my.library"
    assert span["startTime"] == 1544712660000000 and span["duration"] == 1_000_000
    assert jaeger["data"][0]["processes"]["p1"]["serviceName"] == "my.service"


def test_sub_microsecond_times_survive_otlp_but_jaeger_floors_them():
    rec = {"trace_id": "ab" * 16, "span_id": "cd" * 8, "parent_span_id": "", "name": "x",
           "kind": 1, "start_ns": 1_000_000_001_234, "end_ns": 1_000_000_005_678,
           "attributes": {"k": 1.5}, "resource": {"service.name": "s"}, "scope": {},
           "status": {"code": 0, "message": ""}, "events": []}
    assert list(otlp_to_records(convert_records([rec], "otlp")))[0]["start_ns"] == rec["start_ns"]
    back = list(jaeger_to_records(convert_records([rec], "jaeger")))[0]
    assert back["start_ns"] == 1_000_000_001_000 and back["attributes"] == {"k": 1.5}


def test_perfetto_has_a_track_per_process_and_phase_and_reads_back(golden):
    records, _ = load_records(golden.traces)
    doc = convert_records(records, "perfetto")
    meta = [e for e in doc["traceEvents"] if e["ph"] == "M"]
    procs = {e["args"]["name"] for e in meta if e["name"] == "process_name"}
    threads = {(e["pid"], e["args"]["name"]) for e in meta if e["name"] == "thread_name"}
    assert len(procs) == 6  # 2 prefill + 4 decode engines
    assert ("kv.transfer" in {name for _, name in threads})
    x = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert len(x) == len(records)
    _same(records, list(perfetto_to_records(doc)))


def test_cli_convert_to_stdout_and_file(golden, tmp_path):
    r = run_kvprof("traces", "convert", golden.traces / "prefill-0.jsonl", "--to", "jaeger")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert sum(len(t["spans"]) for t in doc["data"]) == 12 * 5
    out = tmp_path / "t.perfetto.json"
    r = run_kvprof("traces", "convert", golden.traces, "--to", "perfetto", "--out", out)
    assert r.returncode == 0 and "Converted 288 spans" in r.stderr
    assert json.loads(out.read_text())["displayTimeUnit"] == "ms"


@pytest.mark.parametrize("args, code, words", [
    (["--to", "zipkin"], 2, "--to 'zipkin'"),
    (["--to", "otlp"], 3, "bad.json"),
])
def test_cli_convert_errors(tmp_path, args, code, words):
    (tmp_path / "bad.json").write_text("{oops")
    r = run_kvprof("traces", "convert", tmp_path / "bad.json", *args)
    assert r.returncode == code
    assert words in r.stderr and r.stderr.startswith("Error:") and "Traceback" not in r.stderr
