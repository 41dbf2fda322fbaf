"""Exporters for finished spans: OTLP (http/protobuf or grpc), OTLP/JSON-lines files, console."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from kvprof import __version__
from kvprof.otlp_json import dumps_line, encode_otlp_json
from kvprof.probes.assembler import SpanRecord

log = logging.getLogger(__name__)

SCOPE = InstrumentationScope("kvprof.probes", __version__)


def to_readable_spans(records: Sequence[SpanRecord], resource: Resource) -> list[ReadableSpan]:
    """SDK span objects (what every OTel exporter takes) for assembled records."""
    out = []
    flags = TraceFlags(TraceFlags.SAMPLED)
    unset = Status(StatusCode.UNSET)
    for r in records:
        ctx = SpanContext(r.trace_id, r.span_id, is_remote=False, trace_flags=flags)
        parent = (
            SpanContext(r.trace_id, r.parent_id, is_remote=True, trace_flags=flags)
            if r.parent_id else None
        )
        out.append(ReadableSpan(
            name=r.name, context=ctx, parent=parent, resource=resource,
            attributes=r.attributes, kind=SpanKind.INTERNAL, start_time=r.start_ns,
            end_time=r.end_ns, instrumentation_scope=SCOPE,
            status=unset if r.error is None else Status(StatusCode.ERROR, r.error),
        ))
    return out


class OtlpJsonFileExporter(SpanExporter):
    """OTLP/JSON lines, one file series per process, rotated by size.

    Every line is a whole ExportTraceServiceRequest written with a single append, so each
    file stays readable on its own even if the process is killed between batches.
    """

    def __init__(self, directory: str | os.PathLike, prefix: str, max_bytes: int = 64 << 20):
        self.directory = Path(directory)
        self.prefix = prefix
        self.max_bytes = max_bytes
        self._index = 0
        self._fd: int | None = None
        self._size = 0
        self._lock = threading.Lock()
        self.files: list[Path] = []

    def _open_next(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.prefix}-{self._index:04d}.jsonl"
        self._index += 1
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._size = os.fstat(self._fd).st_size
        self.files.append(path)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        line = dumps_line(encode_otlp_json(spans))
        try:
            with self._lock:
                if self._fd is None or (self._size and self._size + len(line) > self.max_bytes):
                    self._open_next()
                os.write(self._fd, line)
                self._size += len(line)
        except OSError as exc:
            log.warning("kvprof: cannot write spans to %s: %s", self.directory, exc.strerror)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class NoneExporter(SpanExporter):
    """Counts spans and keeps nothing (overhead measurements, dry runs)."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def otlp_protocol(env: dict[str, str] | None = None) -> str:
    """The OTLP protocol the OTEL_* environment asks for: 'grpc' or 'http/protobuf'."""
    e = os.environ if env is None else env
    proto = (e.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
             or e.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip().lower()
    return "grpc" if proto == "grpc" else "http/protobuf"


def otlp_endpoint(env: dict[str, str] | None = None) -> str:
    """Where OTLP spans go, per the OTEL_* conventions (Jaeger's OTLP port by default)."""
    e = os.environ if env is None else env
    explicit = e.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if explicit:
        return explicit
    base = e.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if otlp_protocol(e) == "grpc":
        return base or "http://localhost:4317"
    return (base.rstrip("/") + "/v1/traces") if base else "http://localhost:4318/v1/traces"


def build_exporter(kind: str, output: str, prefix: str, max_bytes: int) -> tuple[SpanExporter, str]:
    """(exporter, human-readable destination) for a probe config's exporter name."""
    if kind == "file":
        return OtlpJsonFileExporter(output, prefix, max_bytes), str(output)
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # stderr: the probed command's stdout is its own (a server's JSON, a script's output).
        return ConsoleSpanExporter(out=sys.stderr), "console (stderr)"
    if kind == "otlp":
        timeout = float(os.environ.get("OTEL_EXPORTER_OTLP_TIMEOUT", "5") or 5)
        if otlp_protocol() == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            endpoint = otlp_endpoint()
            return OTLPSpanExporter(endpoint=endpoint, timeout=timeout), f"otlp grpc {endpoint}"
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        endpoint = otlp_endpoint()
        return HttpExporter(endpoint=endpoint, timeout=timeout), f"otlp http {endpoint}"
    return NoneExporter(), "none"


def default_prefix(service: str) -> str:
    """File name stem unique per process: service, host and pid."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in service)
    return f"kvprof-{safe}-{socket.gethostname()}-{os.getpid()}"
