"""Real OTel SDK exporters (gRPC, HTTP/protobuf) and raw OTLP/JSON posts into a real receiver;
what it stores is read back with kvprof's own loader."""

from __future__ import annotations

import gzip
import json
import urllib.request

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace.export import SpanExportResult
from receiver_helpers import (
    assert_files_complete,
    loaded_spans,
    make_spans,
    sent_spans,
    summary_of,
)

from kvprof import otlp_json
from kvprof.analysis.loaders.traces import load_spans

pytestmark = pytest.mark.timeout(120)


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def test_grpc_sdk_exporter_plain_and_gzip(receiver_factory):
    rec = receiver_factory()
    plain = make_spans(5, service="dynamo-frontend")
    zipped = make_spans(5, service="dynamo-worker")
    assert GrpcExporter(endpoint=rec.grpc, insecure=True).export(plain) \
        is SpanExportResult.SUCCESS
    assert GrpcExporter(endpoint=rec.grpc, insecure=True,
                        compression=grpc.Compression.Gzip).export(zipped) \
        is SpanExportResult.SUCCESS
    rc, out, err = rec.stop()
    assert rc == 0, err
    summary = summary_of(out)
    assert summary["spans_received"] == summary["spans_written"] == 30
    assert summary["payloads_rejected"] == 0
    assert "stopped (SIGTERM): 30 spans received in 2 payloads; 0 payloads rejected" in err
    assert_files_complete(rec.output)
    assert loaded_spans(rec.output) == sent_spans(plain + zipped)
    df = load_spans(rec.output).spans
    assert set(df["service"]) == {"dynamo-frontend", "dynamo-worker"}
    assert set(df["host"]) == {"node-a"}
    assert "Traceback" not in err


def test_http_sdk_exporter_protobuf_plain_and_gzip(receiver_factory):
    rec = receiver_factory("--grpc", "off")
    assert rec.ready["grpc"] is None
    plain, zipped = make_spans(4), make_spans(4, service="vllm-decode")
    assert HttpExporter(endpoint=rec.url).export(plain) is SpanExportResult.SUCCESS
    assert HttpExporter(endpoint=rec.url, compression=HttpCompression.Gzip).export(zipped) \
        is SpanExportResult.SUCCESS
    rc, out, err = rec.stop()
    assert rc == 0, err
    assert summary_of(out)["spans_received"] == 24
    assert_files_complete(rec.output)
    assert loaded_spans(rec.output) == sent_spans(plain + zipped)


def test_http_raw_otlp_json_post_plain_and_gzip(receiver_factory):
    rec = receiver_factory()
    spans = make_spans(3)
    doc = otlp_json.encode_otlp_json(spans)  # what the probes write: hex ids, int64 strings
    body = json.dumps(doc).encode()
    status, resp, headers = _post(rec.url, body, {"Content-Type": "application/json"})
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(resp) == {}  # ExportTraceServiceResponse, nothing rejected
    more = make_spans(2, service="vllm-prefill")
    status, resp, _ = _post(rec.url, gzip.compress(json.dumps(otlp_json.encode_otlp_json(
        more)).encode()), {"Content-Type": "application/json; charset=utf-8",
                           "Content-Encoding": "gzip"})
    assert status == 200, resp
    rc, out, err = rec.stop()
    assert rc == 0, err
    assert loaded_spans(rec.output) == sent_spans(spans + more)
    # the stored lines are the probes' encoding of the same spans, value for value
    stored = [json.loads(line) for f in sorted(rec.output.glob("*.jsonl"))
              for line in f.read_text().splitlines()]
    assert stored[0] == doc


def test_partial_success_for_spans_with_bad_ids(receiver_factory):
    rec = receiver_factory()
    good = make_spans(1)
    doc = otlp_json.encode_otlp_json(good)
    bad = dict(doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0])
    spans_list = doc["resourceSpans"][0]["scopeSpans"][0]["spans"]
    spans_list.append({**bad, "traceId": "0" * 32})  # all-zero trace id
    spans_list.append({**bad, "spanId": "abcd"})  # 2-byte span id
    # JSON over HTTP
    status, resp, _ = _post(rec.url, json.dumps(doc).encode(),
                            {"Content-Type": "application/json"})
    assert status == 200
    assert json.loads(resp)["partialSuccess"]["rejectedSpans"] == "2"
    # the same request as protobuf over gRPC
    request = otlp_json.json_to_request(json.loads(json.dumps(doc)))
    raw = grpc.insecure_channel(rec.grpc).unary_unary(
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        request_serializer=ExportTraceServiceRequest.SerializeToString,
        response_deserializer=ExportTraceServiceResponse.FromString)
    response = raw(request, timeout=30)
    assert response.partial_success.rejected_spans == 2
    assert "span_id 8 bytes" in response.partial_success.error_message
    rc, out, err = rec.stop()
    assert rc == 0, err
    summary = summary_of(out)
    assert (summary["spans_received"], summary["spans_rejected"]) == (6, 4)
    assert loaded_spans(rec.output) == sent_spans(good)


def test_report_reads_received_spans_beside_the_probes_files(receiver_factory, tmp_path):
    from kvprof.probes.export import OtlpJsonFileExporter

    traces = tmp_path / "traces"
    probe_spans = make_spans(2, service="kvprof-probed-vllm")
    exporter = OtlpJsonFileExporter(traces, "kvprof-vllm-host-1")
    exporter.export(probe_spans)
    exporter.shutdown()
    rec = receiver_factory(output=traces / "received")
    dynamo_spans = make_spans(2, service="dynamo-frontend")
    assert GrpcExporter(endpoint=rec.grpc, insecure=True).export(dynamo_spans) \
        is SpanExportResult.SUCCESS
    assert rec.stop()[0] == 0
    load = load_spans(traces)
    assert len(load.files) == 2 and not load.skipped
    assert set(load.spans["service"]) == {"kvprof-probed-vllm", "dynamo-frontend"}
    assert loaded_spans(traces) == sent_spans(probe_spans + dynamo_spans)
