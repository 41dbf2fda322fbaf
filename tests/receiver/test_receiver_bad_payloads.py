"""Every kind of bad payload gets its OTLP status, is counted, and the receiver keeps serving;
logs and metrics exports (Dynamo's Rust side sends its logs) are counted and dropped, and the
sender is told so in OTLP's partial_success."""

from __future__ import annotations

import gzip
import http.client
import json
import socket

import grpc
import pytest
from google.rpc import status_pb2
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace.export import SpanExportResult
from receiver_helpers import loaded_spans, make_spans, sent_spans, summary_of

from kvprof import otlp_json

pytestmark = pytest.mark.timeout(180)

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
PB = "application/x-protobuf"
JS = "application/json"
LIMIT = 64 << 10  # --max-payload-bytes of these tests


def _good_protobuf(n: int = 1) -> bytes:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    return encode_spans(make_spans(n)).SerializeToString()


def _json_body(doc) -> bytes:
    return json.dumps(doc).encode()


def _request(http_addr: str, method: str, path: str, body: bytes | None,
             headers: dict[str, str]) -> tuple[int, bytes, dict]:
    host, port = http_addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def _status_message(body: bytes, content_type: str) -> tuple[int, str]:
    """The google.rpc.Status an OTLP/HTTP error carries, in the request's encoding."""
    if content_type == JS:
        doc = json.loads(body)
        return doc.get("code", 0), doc.get("message", "")
    status = status_pb2.Status.FromString(body)
    return status.code, status.message


bad_id = otlp_json.encode_otlp_json(make_spans(1))
bad_id["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"] = "not-hex!"

# (name, method, path, body, headers, expected HTTP status, summary reason or ignored kind)
HTTP_CASES = [
    ("garbage protobuf", "POST", "/v1/traces", b"\xff\xff\xff\xff\x0f", {"Content-Type": PB},
     400, "invalid"),
    ("invalid JSON", "POST", "/v1/traces", b'{"resourceSpans": [', {"Content-Type": JS},
     400, "invalid"),
    ("JSON that is not a request", "POST", "/v1/traces", b"[1, 2, 3]",
     {"Content-Type": JS}, 400, "invalid"),
    ("JSON with a non-hex id", "POST", "/v1/traces", _json_body(bad_id),
     {"Content-Type": JS}, 400, "invalid"),
    ("JSON not UTF-8", "POST", "/v1/traces", b'{"resourceSpans": "\xff\xfe"}',
     {"Content-Type": JS}, 400, "invalid"),
    ("wrong content type", "POST", "/v1/traces", b"hello", {"Content-Type": "text/plain"},
     415, "unsupported"),
    ("no content type", "POST", "/v1/traces", _good_protobuf(), {}, 415, "unsupported"),
    ("unsupported content encoding", "POST", "/v1/traces", _good_protobuf(),
     {"Content-Type": PB, "Content-Encoding": "br"}, 415, "unsupported"),
    ("corrupt gzip", "POST", "/v1/traces", b"\x1f\x8b\x08\x00garbage-garbage",
     {"Content-Type": PB, "Content-Encoding": "gzip"}, 400, "invalid"),
    ("truncated gzip", "POST", "/v1/traces", gzip.compress(_good_protobuf(5))[:-12],
     {"Content-Type": PB, "Content-Encoding": "gzip"}, 400, "invalid"),
    ("oversized body", "POST", "/v1/traces", b"\x00" * (LIMIT + 1), {"Content-Type": PB},
     413, "too_large"),
    ("gzip bomb", "POST", "/v1/traces", gzip.compress(b"\x00" * (50 << 20)),
     {"Content-Type": PB, "Content-Encoding": "gzip"}, 413, "too_large"),
    ("garbage logs export", "POST", "/v1/logs", b"\xff\xff\xff\xff\x0f", {"Content-Type": PB},
     400, "invalid"),
    ("metrics export not JSON", "POST", "/v1/metrics", b"{", {"Content-Type": JS}, 400,
     "invalid"),
    ("oversized logs export", "POST", "/v1/logs", b"\x00" * (LIMIT + 1), {"Content-Type": PB},
     413, "too_large"),
    ("unknown path", "POST", "/v2/spans", b"x", {"Content-Type": PB}, 404, "other"),
    ("GET on the traces path", "GET", "/v1/traces", None, {}, 405, "other"),
]


def _still_serving(rec) -> None:
    spans = make_spans(1)
    assert HttpExporter(endpoint=rec.url, timeout=10).export(spans) is SpanExportResult.SUCCESS


def test_every_bad_http_payload_gets_its_status_and_is_counted(receiver_factory):
    rec = receiver_factory("--max-payload-bytes", str(LIMIT))
    expected_reasons: dict[str, int] = {}
    expected_ignored: dict[str, int] = {}
    for name, method, path, body, headers, want, kind in HTTP_CASES:
        status, resp, hdrs = _request(rec.http, method, path, body, headers)
        assert status == want, f"{name}: {status} {resp[:200]!r}"
        if want != 405:
            ctype = hdrs["content-type"]
            assert ctype == (JS if headers.get("Content-Type", "").startswith(JS) else PB), name
            code, message = _status_message(resp, ctype)
            assert code and message, f"{name}: empty Status {resp!r}"
        if kind in ("logs", "metrics", "other"):
            expected_ignored[kind] = expected_ignored.get(kind, 0) + 1
        else:
            expected_reasons[kind] = expected_reasons.get(kind, 0) + 1
        assert rec.alive(), f"{name}: receiver died: {rec.stderr}"
        _still_serving(rec)
    rc, out, err = rec.stop()
    assert rc == 0, err
    summary = summary_of(out)
    assert summary["payloads_rejected_by_reason"] == expected_reasons
    assert summary["payloads_rejected"] == sum(expected_reasons.values())
    assert summary["ignored_requests"] == expected_ignored
    assert summary["payloads_accepted"] == len(HTTP_CASES)  # the good export after each
    assert "Traceback" not in err
    # logged a few times per kind, then only counted
    assert err.count("refused a payload") <= 3 * len(expected_reasons)


def _raw_http(http_addr: str, data: bytes, read: bool = True) -> bytes:
    host, port = http_addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(data)
        if not read:
            return b""
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_http_framing_faults_and_chunked_bodies(receiver_factory):
    rec = receiver_factory("--max-payload-bytes", str(LIMIT))
    head = f"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: {PB}\r\n"
    # a Content-Length that is not a number
    resp = _raw_http(rec.http, (head + "Content-Length: ten\r\n\r\n").encode())
    assert resp.startswith(b"HTTP/1.1 400"), resp[:100]
    # the sender hangs up halfway through its body: no answer possible, nothing stored
    _raw_http(rec.http, (head + "Content-Length: 1000\r\n\r\n").encode() + b"\x0a" * 10,
              read=False)
    # a chunked body is read and stored
    body = _good_protobuf(2)
    chunked = f"{len(body[:50]):x}\r\n".encode() + body[:50] + b"\r\n" + \
        f"{len(body[50:]):x}\r\n".encode() + body[50:] + b"\r\n0\r\n\r\n"
    resp = _raw_http(rec.http, (head + "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                                ).encode() + chunked)
    assert resp.startswith(b"HTTP/1.1 200"), resp[:200]
    ExportTraceServiceResponse.FromString(resp.split(b"\r\n\r\n", 1)[1])
    _still_serving(rec)
    rc, out, err = rec.stop()
    assert rc == 0, err
    summary = summary_of(out)
    assert summary["spans_received"] == 6 + 3
    # the bad Content-Length and the body cut short
    assert summary["payloads_rejected_by_reason"] == {"invalid": 2}


def test_bad_grpc_payloads_get_their_status_codes(receiver_factory):
    rec = receiver_factory("--max-payload-bytes", str(LIMIT))
    channel = grpc.insecure_channel(rec.grpc)
    export = channel.unary_unary(EXPORT)
    cases = [
        ("garbage", b"\xff\xff\xff\xff\x0f", grpc.StatusCode.INVALID_ARGUMENT),
        ("oversized", b"\x00" * (LIMIT + 1), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ]
    for name, payload, code in cases:
        with pytest.raises(grpc.RpcError) as info:
            export(payload, timeout=30)
        assert info.value.code() is code, f"{name}: {info.value.details()}"
        spans = make_spans(1)
        assert GrpcExporter(endpoint=rec.grpc, insecure=True, timeout=10).export(spans) \
            is SpanExportResult.SUCCESS
    # a method no OTLP service has
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/no.such.Service/Call")(b"", timeout=30)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    rc, out, err = rec.stop()
    assert rc == 0, err
    summary = summary_of(out)
    # gRPC refuses the oversized message itself, before kvprof's handler sees it
    assert summary["payloads_rejected_by_reason"] == {"invalid": 1, "grpc_undelivered": 1}
    assert summary["payloads_accepted"] == 2
    assert summary["ignored_requests"] == {"other": 1}
    assert "Traceback" not in err


def test_logs_and_metrics_exports_are_dropped_counted_and_the_sender_told(receiver_factory):
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcLogs
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
        OTLPMetricExporter as GrpcMetrics,
    )
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLogs
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpMetrics,
    )
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
        ExportLogsServiceRequest,
        ExportLogsServiceResponse,
    )
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    rec = receiver_factory()
    logs = LoggerProvider()
    logs.add_log_record_processor(SimpleLogRecordProcessor(
        GrpcLogs(endpoint=rec.grpc, insecure=True, timeout=5)))
    logs.add_log_record_processor(SimpleLogRecordProcessor(
        HttpLogs(endpoint=f"http://{rec.http}/v1/logs", timeout=5)))
    emitter = logs.get_logger("dynamo.runtime")
    for i in range(10):
        emitter.emit(body=f"worker heartbeat {i}", severity_text="WARN")
    logs.shutdown()
    for exporter in (GrpcMetrics(endpoint=rec.grpc, insecure=True, timeout=5),
                     HttpMetrics(endpoint=f"http://{rec.http}/v1/metrics", timeout=5)):
        reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
        meters = MeterProvider(metric_readers=[reader])
        meters.get_meter("dynamo").create_counter("requests").add(3)
        meters.force_flush()
        meters.shutdown()
    # What a sender reads back: success, every record counted as rejected, and why.
    request = ExportLogsServiceRequest()
    records = request.resource_logs.add().scope_logs.add().log_records
    for _ in range(3):
        records.add().body.string_value = "x"
    channel = grpc.insecure_channel(rec.grpc)
    answer = ExportLogsServiceResponse.FromString(channel.unary_unary(
        "/opentelemetry.proto.collector.logs.v1.LogsService/Export")(
            request.SerializeToString(), timeout=30))
    assert answer.partial_success.rejected_log_records == 3
    assert "stores traces only: 3 log record(s) dropped" in answer.partial_success.error_message
    doc = {"resourceLogs": [{"scopeLogs": [{"logRecords": [{"body": {"stringValue": "a"}},
                                                           {"body": {"stringValue": "b"}}]}]}]}
    status, body, hdrs = _request(rec.http, "POST", "/v1/logs",
                                  gzip.compress(_json_body(doc)),
                                  {"Content-Type": JS, "Content-Encoding": "gzip"})
    assert status == 200 and hdrs["content-type"] == JS
    assert json.loads(body)["partialSuccess"]["rejectedLogRecords"] == "2"  # int64: a string
    spans = make_spans(2)
    assert GrpcExporter(endpoint=rec.grpc, insecure=True).export(spans) \
        is SpanExportResult.SUCCESS
    rc, out, err = rec.stop()
    assert rc == 0, err
    summary = summary_of(out)
    assert summary["ignored_requests"]["logs"] == 22
    assert summary["dropped_items"]["logs"] == 10 + 10 + 3 + 2
    assert summary["ignored_requests"]["metrics"] >= 2  # shutdown may export once more
    assert summary["dropped_items"]["metrics"] >= 2
    assert summary["payloads_rejected"] == 0
    assert err.count("logs export") == 1 and err.count("metrics export") == 1, err
    assert "22 logs requests ignored (25 log records dropped)" in err
    assert loaded_spans(rec.output) == sent_spans(spans)
