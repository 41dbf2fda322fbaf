"""Logs and metrics exports: read, counted, dropped, and answered with OTLP partial success.

kvprof stores traces only. NVIDIA Dynamo's Rust side exports its logs to the endpoint of its
traces (1.6.1 has no switch for logs alone) every second or so. Answering those exports
UNIMPLEMENTED / 404 made its exporter write an ERROR line per batch into the frontend's log:
131 in one demo run, burying the lines that matter. OTLP's answer for "taken, but these N
records were rejected, and why" is a success carrying ``partial_success``: the sender does
not retry, and the records it lost are stated in the protocol, not hidden.
"""

from __future__ import annotations

import json
from typing import Any

from kvprof.receiver import payload as pl
from kvprof.receiver.payload import Rejection

LOGS = "logs"
METRICS = "metrics"
SIGNALS = (LOGS, METRICS)

# The point-holding field of each metric kind, in OTLP/JSON (camelCase) and protobuf names.
_METRIC_KINDS = (("gauge", "gauge"), ("sum", "sum"), ("histogram", "histogram"),
                 ("exponentialHistogram", "exponential_histogram"), ("summary", "summary"))


def dropped_message(signal: str, count: int) -> str:
    """What the sender reads in partial_success.error_message."""
    unit = "log record(s)" if signal == LOGS else "metric data point(s)"
    return (f"kvprof traces receive stores traces only: {count} {unit} dropped (send {signal} "
            "to an OpenTelemetry collector, or turn their OTLP export off)")


def count_items(signal: str, body: bytes, json_body: bool) -> int:
    """Log records or metric data points in one export; Rejection(INVALID) when it does not
    decode (a sender with a broken encoder should hear so, whichever signal it sends)."""
    if json_body:
        try:
            doc = json.loads(body or b"{}")
        except (UnicodeDecodeError, ValueError) as exc:
            raise Rejection(pl.INVALID, f"body is not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise Rejection(pl.INVALID, "body is not an OTLP/JSON export object")
        return _count_json(signal, doc)
    from google.protobuf.message import DecodeError

    request = _classes(signal)[0]()
    try:
        request.ParseFromString(body)
    except DecodeError as exc:
        raise Rejection(pl.INVALID, f"body is not an OTLP {signal} protobuf ({exc})") from None
    if signal == LOGS:
        return sum(len(sl.log_records) for rl in request.resource_logs for sl in rl.scope_logs)
    return sum(len(getattr(m, field).data_points)
               for rm in request.resource_metrics for sm in rm.scope_metrics
               for m in sm.metrics
               for field in (m.WhichOneof("data"),) if field)


def response_bytes(signal: str, count: int, json_body: bool) -> bytes:
    """The Export response: success, with every item counted as rejected and why."""
    response = _classes(signal)[1]()
    if count:
        partial = response.partial_success
        if signal == LOGS:
            partial.rejected_log_records = count
        else:
            partial.rejected_data_points = count
        partial.error_message = dropped_message(signal, count)
    if json_body:
        from google.protobuf.json_format import MessageToJson

        return MessageToJson(response, indent=None).encode()
    return response.SerializeToString()


def _count_json(signal: str, doc: dict[str, Any]) -> int:
    def items(obj: Any, *keys: str) -> list:
        value = obj.get(keys[0]) if isinstance(obj, dict) else None
        if value is None and len(keys) > 1:
            value = obj.get(keys[1]) if isinstance(obj, dict) else None
        return value if isinstance(value, list) else []

    total = 0
    if signal == LOGS:
        for rl in items(doc, "resourceLogs", "resource_logs"):
            for sl in items(rl, "scopeLogs", "scope_logs"):
                total += len(items(sl, "logRecords", "log_records"))
        return total
    for rm in items(doc, "resourceMetrics", "resource_metrics"):
        for sm in items(rm, "scopeMetrics", "scope_metrics"):
            for metric in items(sm, "metrics"):
                for camel, snake in _METRIC_KINDS:
                    data = metric.get(camel, metric.get(snake)) if isinstance(metric,
                                                                               dict) else None
                    if isinstance(data, dict):
                        total += len(items(data, "dataPoints", "data_points"))
    return total


def _classes(signal: str) -> tuple[type, type]:
    """(Export request, Export response) protobuf classes of a signal."""
    if signal == LOGS:
        from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as pb

        return pb.ExportLogsServiceRequest, pb.ExportLogsServiceResponse
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as pb

    return pb.ExportMetricsServiceRequest, pb.ExportMetricsServiceResponse
