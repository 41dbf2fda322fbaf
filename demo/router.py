"""A small prefill/decode router: OpenAI-compatible endpoints in front of two vLLM servers.

Like vLLM's toy disaggregation proxy: each request goes to the prefill server with
max_tokens=1 and kv_transfer_params {"do_remote_decode": true}, then to the decode server with
the kv_transfer_params the prefill server returned; the decode response (streamed or not) goes
back to the client. X-Request-Id passes through to both servers, so both engines know the
request by the same external id.

It also records its own legs of each request with the OpenTelemetry SDK (router.request,
router.prefill, router.decode, router.first_byte) and forwards a W3C traceparent to both
engines, so their spans join the router's trace. ``--no-traceparent`` forwards X-Request-Id
only, as vLLM's example proxies do (kvprof's analysis then joins by that id).
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from time import time_ns
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from kvprof import semconv

log = logging.getLogger("kvprof.demo.router")

PD_PATHS = ("/v1/completions", "/v1/chat/completions")
PREFILL_PARAMS = {
    "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
    "remote_block_ids": None, "remote_host": None, "remote_port": None,
}
SERVICE_NAME = "pd-router"


class Upstream:
    """One vLLM server: host/port parsed once from its base URL."""

    def __init__(self, url: str):
        parts = urlsplit(url if "://" in url else f"http://{url}")
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.url = f"http://{self.host}:{self.port}"

    def connect(self, timeout: float = 600.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)


class RouterTelemetry:
    """The router's own tracer: OTel SDK spans to OTLP/JSON files or an OTLP endpoint.

    A private TracerProvider (not the global one): tests run several routers in one process.
    ``trace_dir`` None and no OTLP endpoint in the environment: spans are not recorded.
    """

    def __init__(self, trace_dir: Path | None = None, otlp: bool = False,
                 propagate: bool = True) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from kvprof.probes.export import build_exporter, default_prefix

        self.propagate = propagate
        self.propagator = TraceContextTextMapPropagator()
        self.provider = TracerProvider(resource=Resource.create({
            semconv.RES_SERVICE_NAME: SERVICE_NAME, semconv.ATTR_ROLE: semconv.ROLE_ROUTER,
            # The host names the clock: spans of one host need no skew correction.
            semconv.RES_HOST_NAME: socket.gethostname(), semconv.RES_PROCESS_PID: os.getpid()}))
        self.destination = None
        if trace_dir is not None or otlp:
            kind = "file" if trace_dir is not None else "otlp"
            exporter, self.destination = build_exporter(
                kind, str(trace_dir or ""), default_prefix(SERVICE_NAME), 64 << 20)
            self.provider.add_span_processor(BatchSpanProcessor(
                exporter, schedule_delay_millis=500))
        self.tracer = self.provider.get_tracer("kvprof.demo.router")

    def parent_from(self, headers: Any) -> Any:
        """The caller's trace context (a traceparent header), if any."""
        return self.propagator.extract({k.lower(): v for k, v in headers.items()})

    def inject(self, span: Any, headers: dict) -> None:
        """Put span's traceparent into an upstream request's headers (unless disabled)."""
        if not self.propagate:
            return
        self.propagator.inject(headers, context=trace.set_span_in_context(span))

    def shutdown(self) -> None:
        self.provider.shutdown()


def _post(up: Upstream, path: str, body: dict, headers: dict) -> tuple[int, dict | str]:
    conn = up.connect()
    try:
        conn.request("POST", path, body=json.dumps(body), headers=headers)
        resp = conn.getresponse()
        raw = resp.read().decode("utf-8", "replace")
        try:
            return resp.status, json.loads(raw)
        except json.JSONDecodeError:
            return resp.status, raw
    finally:
        conn.close()


class RouterHandler(BaseHTTPRequestHandler):
    """Serves the P/D endpoints; everything else is forwarded to the decode server."""

    prefill: Upstream
    decode: Upstream
    telemetry: RouterTelemetry
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:  # route access logs to logging
        log.debug("%s " + fmt, self.address_string(), *args)

    def _reply(self, status: int, payload: dict | str) -> None:
        data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        conn = self.decode.connect(timeout=30)
        try:
            conn.request("GET", self.path)
            resp = conn.getresponse()
            self._reply(resp.status, resp.read().decode("utf-8", "replace"))
        except OSError as exc:
            self._reply(502, {"error": f"decode server unreachable: {exc}"})
        finally:
            conn.close()

    def do_POST(self) -> None:
        t_recv = time_ns()
        tel = self.telemetry
        request_id = self.headers.get("X-Request-Id") or str(uuid.uuid4())
        span = tel.tracer.start_span(
            semconv.SPAN_ROUTER_REQUEST, context=tel.parent_from(self.headers),
            kind=SpanKind.SERVER, start_time=t_recv,
            attributes={semconv.ATTR_X_REQUEST_ID: request_id, semconv.ATTR_HTTP_ROUTE: self.path,
                        semconv.ATTR_ROLE: semconv.ROLE_ROUTER})
        status = 500
        try:
            status = self._route(span, request_id)
        except Exception as exc:  # the client gets an answer, the span the reason
            log.exception("router failed on %s", request_id)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            self.close_connection = True
        finally:
            span.set_attribute(semconv.ATTR_HTTP_STATUS, status)
            if status >= 400:
                span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
            span.end(end_time=time_ns())

    def _route(self, span: Any, request_id: str) -> int:
        """Prefill, then decode; returns the HTTP status sent to the client."""
        tel = self.telemetry
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError:
            self._reply(400, {"error": "request body is not JSON"})
            return 400
        if self.path not in PD_PATHS:
            self._reply(404, {"error": f"unknown path {self.path}"})
            return 404
        ctx = trace.set_span_in_context(span)
        attrs = {semconv.ATTR_X_REQUEST_ID: request_id}
        prefill_body = dict(body, max_tokens=1, stream=False,
                            kv_transfer_params=dict(PREFILL_PARAMS))
        prefill_body.pop("stream_options", None)
        prefill_body.pop("max_completion_tokens", None)
        p_span = tel.tracer.start_span(semconv.SPAN_ROUTER_PREFILL, context=ctx,
                                       kind=SpanKind.CLIENT, attributes=dict(
                                           attrs, **{"server.address": self.prefill.url}))
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        p_headers = dict(headers)
        tel.inject(p_span, p_headers)
        try:
            status, answer = _post(self.prefill, self.path, prefill_body, p_headers)
        except OSError as exc:
            p_span.set_status(Status(StatusCode.ERROR, f"prefill server unreachable: {exc}"))
            p_span.end()
            self._reply(502, {"error": f"prefill server unreachable: {exc}"})
            return 502
        p_span.set_attribute(semconv.ATTR_HTTP_STATUS, status)
        p_span.end(end_time=time_ns())
        if status != 200 or not isinstance(answer, dict):
            code = status if status != 200 else 502
            self._reply(code, answer)
            return code
        decode_body = dict(body, kv_transfer_params=answer.get("kv_transfer_params"))
        return self._forward_decode(ctx, decode_body, headers, attrs)

    def _forward_decode(self, ctx: Any, body: dict, headers: dict, attrs: dict) -> int:
        tel = self.telemetry
        d_span = tel.tracer.start_span(semconv.SPAN_ROUTER_DECODE, context=ctx,
                                       kind=SpanKind.CLIENT, attributes=dict(
                                           attrs, **{"server.address": self.decode.url}))
        d_headers = dict(headers)
        tel.inject(d_span, d_headers)
        conn = self.decode.connect()
        sent_headers = False
        try:
            conn.request("POST", self.path, body=json.dumps(body), headers=d_headers)
            resp = conn.getresponse()
            d_span.set_attribute(semconv.ATTR_HTTP_STATUS, resp.status)
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.getheader("Content-Type", "application/json"))
            self.send_header("X-Request-Id", headers["X-Request-Id"])
            if body.get("stream"):
                # Pass server-sent events through as they arrive.
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                sent_headers = True
                first = True
                while chunk := resp.read1(65536):
                    t_read = time_ns()
                    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
                    t_write = time_ns()
                    self.wfile.write(framed)
                    self.wfile.flush()
                    if first:
                        self._first_byte(ctx, t_read, t_write, attrs)
                        first = False
                self.wfile.write(b"0\r\n\r\n")
            else:
                data = resp.read()
                t_read = time_ns()
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                sent_headers = True
                t_write = time_ns()
                self.wfile.write(data)
                self.wfile.flush()
                self._first_byte(ctx, t_read, t_write, attrs)
            return resp.status
        except OSError as exc:
            log.warning("decode server failed: %s", exc)
            d_span.set_status(Status(StatusCode.ERROR, f"decode server failed: {exc}"))
            if not sent_headers:
                self._reply(502, {"error": f"decode server failed: {exc}"})
            # A half-sent stream cannot be completed: closing tells the client at once
            # instead of leaving it waiting for chunks that never come.
            self.close_connection = True
            return 502
        finally:
            d_span.end(end_time=time_ns())
            conn.close()

    def _first_byte(self, ctx: Any, t_read: int, t_write: int, attrs: dict) -> None:
        """first decode bytes read -> handed to the socket for the client: the router's last
        leg. It ends when the write starts, not when it returns: the client, on another core,
        can read the bytes before ``write`` returns here, and the client's first byte must
        never come before the router's."""
        self.telemetry.tracer.start_span(semconv.SPAN_ROUTER_FIRST_BYTE, context=ctx,
                                         start_time=t_read, attributes=attrs).end(
            end_time=t_write)


class RouterServer(ThreadingHTTPServer):
    """A threading HTTP server whose close waits, bounded, for the requests in flight.

    The client has its answer before the handler ends its spans (the decode call and the
    request span end after the last write), so closing at once and then shutting the tracer
    down would drop the spans of the last request. Handler threads stay daemons so that a
    hung upstream never keeps the process alive; ``drain_s`` bounds the wait.
    """

    daemon_threads = True
    drain_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handlers: set[threading.Thread] = set()
        self._handlers_lock = threading.Lock()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        me = threading.current_thread()
        with self._handlers_lock:
            self._handlers.add(me)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._handlers_lock:
                self._handlers.discard(me)

    def server_close(self) -> None:
        super().server_close()
        deadline = time.monotonic() + self.drain_s
        with self._handlers_lock:
            running = list(self._handlers)
        for t in running:
            t.join(max(0.0, deadline - time.monotonic()))


def make_router(prefill_url: str, decode_url: str, host: str = "127.0.0.1", port: int = 0,
                telemetry: RouterTelemetry | None = None) -> ThreadingHTTPServer:
    """A router server bound to host:port (0 = any free port); call serve_forever() on it."""
    handler = type("BoundRouterHandler", (RouterHandler,),
                   {"prefill": Upstream(prefill_url), "decode": Upstream(decode_url),
                    "telemetry": telemetry or RouterTelemetry()})
    return RouterServer((host, port), handler)


def serve_in_thread(prefill_url: str, decode_url: str, port: int = 0,
                    trace_dir: Path | None = None, propagate: bool = True,
                    ) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Start a router on 127.0.0.1 in a daemon thread (tests, demo).

    Call ``stop_router(server)`` to stop it and flush its spans.
    """
    server = make_router(prefill_url, decode_url, port=port,
                         telemetry=RouterTelemetry(trace_dir, propagate=propagate))
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="pd-router")
    thread.start()
    return server, thread


def stop_router(server: ThreadingHTTPServer) -> None:
    """Stop serving, close the socket and flush the router's spans."""
    server.shutdown()
    server.server_close()
    server.RequestHandlerClass.telemetry.shutdown()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", required=True, help="prefill server, e.g. 127.0.0.1:8100")
    parser.add_argument("--decode", required=True, help="decode server, e.g. 127.0.0.1:8200")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--trace-dir", type=Path, default=None,
                        help="write the router's spans as OTLP/JSON lines here")
    parser.add_argument("--otlp", action="store_true",
                        help="export the router's spans over OTLP (OTEL_EXPORTER_OTLP_* env)")
    parser.add_argument("--no-traceparent", action="store_true",
                        help="forward X-Request-Id only, like vLLM's example proxies")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    telemetry = RouterTelemetry(args.trace_dir, otlp=args.otlp,
                                propagate=not args.no_traceparent)
    server = make_router(args.prefill, args.decode, args.host, args.port, telemetry)
    log.info("router on http://%s:%d -> prefill %s, decode %s; spans -> %s", args.host,
             server.server_address[1], args.prefill, args.decode,
             telemetry.destination or "not recorded")
    # SIGTERM (the demo stopping it) ends serve_forever like Ctrl-C, so the spans flush.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        telemetry.shutdown()


if __name__ == "__main__":
    main()
