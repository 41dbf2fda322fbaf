"""OTLP/gRPC: TraceService/Export into the intake; logs and metrics counted and dropped."""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc

from kvprof.receiver import other_signals
from kvprof.receiver import payload as pl
from kvprof.receiver.intake import Intake
from kvprof.receiver.payload import Rejection
from kvprof.receiver.stats import ReceiverStats

log = logging.getLogger(__name__)

_CODES = {
    pl.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    pl.UNSUPPORTED: grpc.StatusCode.INVALID_ARGUMENT,
    pl.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    pl.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,  # retryable: the OTLP exporters back off
}
# Handler threads. gRPC reads a request message only once a thread takes its call, so this
# times --max-payload-bytes bounds what gRPC holds beyond the queue.
WORKERS = 8


def _service_names() -> tuple[str, str, str]:
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    return (trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name,
            logs_service_pb2.DESCRIPTOR.services_by_name["LogsService"].full_name,
            metrics_service_pb2.DESCRIPTOR.services_by_name["MetricsService"].full_name)


class _OtlpHandler(grpc.GenericRpcHandler):
    """Routes the three OTLP Export methods; takes request bytes raw so that a payload that
    does not decode is INVALID_ARGUMENT (a stub's deserializer would make it INTERNAL)."""

    def __init__(self, server: OtlpGrpcServer):
        trace, logs, metrics = _service_names()
        self.export_method = f"/{trace}/Export"
        self.server = server
        self.handlers = {
            self.export_method: grpc.unary_unary_rpc_method_handler(server.export),
            f"/{logs}/Export": grpc.unary_unary_rpc_method_handler(server.ignore_logs),
            f"/{metrics}/Export": grpc.unary_unary_rpc_method_handler(server.ignore_metrics),
        }

    def service(self, handler_call_details):
        method = handler_call_details.method
        if method == self.export_method:
            self.server.count_call()
        handler = self.handlers.get(method)
        if handler is None:
            self.server.stats.ignored_signal("other", f"gRPC {method}")
        return handler


class OtlpGrpcServer:
    """An OTLP/gRPC trace receiver on one address (plaintext; gzip and deflate accepted)."""

    def __init__(self, intake: Intake, stats: ReceiverStats, host: str, port: int):
        self.intake = intake
        self.stats = stats
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._calls = 0
        self._entered = 0
        self._server: grpc.Server | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> OtlpGrpcServer:
        """Bind and serve; raises OSError when the address cannot be bound."""
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="kvprof-grpc"),
            handlers=[_OtlpHandler(self)],
            options=[
                ("grpc.max_receive_message_length", self.intake.max_payload_bytes),
                # Without this a second receiver would silently share the port.
                ("grpc.so_reuseport", 0),
            ],
        )
        try:
            port = server.add_insecure_port(self.address)
        except RuntimeError as exc:  # grpcio >= 1.59 raises; older returns 0
            raise OSError(f"cannot bind {self.address}: {exc}") from None
        if not port:
            raise OSError(f"cannot bind {self.address}")
        self.port = port
        server.start()
        self._server = server
        return self

    def stop(self, grace: float) -> None:
        """Refuse new calls, let running ones finish (up to grace seconds), count the rest."""
        if self._server is None:
            return
        self._server.stop(grace).wait()
        self._server = None
        with self._lock:
            undelivered = self._calls - self._entered
        if undelivered > 0:
            # gRPC itself refuses a message over max_receive_message_length
            # (RESOURCE_EXHAUSTED) before any handler runs; such calls, and calls the sender
            # cancelled before its message arrived, are the calls that never reached export().
            self.stats.grpc_undelivered += undelivered

    def count_call(self) -> None:
        with self._lock:
            self._calls += 1

    def export(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceResponse,
        )

        with self._lock:
            self._entered += 1
        try:
            self.intake.reserve(len(request))
            screened = self.intake.take(request, pl.PROTOBUF, gzip=False,
                                        reserved=len(request))
        except Rejection as exc:
            self.stats.refused(exc.reason, exc.message, f"gRPC {context.peer()}")
            context.abort(_CODES[exc.reason], exc.message)
        response = ExportTraceServiceResponse()
        if screened.rejected:
            response.partial_success.rejected_spans = screened.rejected
            response.partial_success.error_message = screened.error_message
        return response.SerializeToString()

    def ignore_logs(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return self._drop(other_signals.LOGS, request, context)

    def ignore_metrics(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return self._drop(other_signals.METRICS, request, context)

    def _drop(self, signal: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            count = other_signals.count_items(signal, request, json_body=False)
        except Rejection as exc:
            self.stats.refused(exc.reason, exc.message, f"gRPC {context.peer()}")
            context.abort(_CODES[exc.reason], exc.message)
        self.stats.dropped_signal(signal, count, f"gRPC {self.address}")
        return other_signals.response_bytes(signal, count, json_body=False)
