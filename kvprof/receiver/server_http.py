"""OTLP/HTTP: POST /v1/traces (protobuf or JSON, gzip or not) into the intake.

Answers follow the OTLP/HTTP spec: 200 with an ExportTraceServiceResponse (partial_success when
spans were dropped), 400 / 413 / 415 with a google.rpc.Status body, 503 with Retry-After when
the queue is full. /v1/logs and /v1/metrics exports are read, counted and dropped, answered 200
with every item counted as rejected in partial_success (see other_signals). Bodies and responses
are encoded as the request's Content-Type says.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kvprof.receiver import other_signals
from kvprof.receiver import payload as pl
from kvprof.receiver.intake import Intake
from kvprof.receiver.payload import Rejection
from kvprof.receiver.stats import ReceiverStats

log = logging.getLogger(__name__)

TRACES_PATH = "/v1/traces"
DROPPED_PATHS = {"/v1/logs": other_signals.LOGS, "/v1/metrics": other_signals.METRICS}
PROTOBUF_TYPES = ("application/x-protobuf", "application/protobuf")
JSON_TYPE = "application/json"

_STATUS = {
    pl.INVALID: HTTPStatus.BAD_REQUEST,
    pl.TOO_LARGE: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    pl.UNSUPPORTED: HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    pl.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
}
# google.rpc.Code numbers for the Status body of each refusal.
_RPC_CODE = {pl.INVALID: 3, pl.TOO_LARGE: 8, pl.UNSUPPORTED: 3, pl.UNAVAILABLE: 14}
RETRY_AFTER_S = 1
# Connections served at once; one more is answered 503 and closed, so a flood of idle
# connections cannot pile up threads.
MAX_CONNECTIONS = 128
# A connection silent for this long is closed (the exporters reconnect).
IDLE_TIMEOUT_S = 30.0
_DISCARD_CHUNK = 64 << 10
# A refused body up to this size is read and thrown away so that the sender gets its 413 (a
# client still writing when the server closes sees a broken connection, not the answer).
DISCARD_LIMIT = 64 << 20


def _status_body(reason_code: int, message: str, json_body: bool) -> bytes:
    from google.rpc import status_pb2

    status = status_pb2.Status(code=reason_code, message=message)
    if json_body:
        from google.protobuf.json_format import MessageToJson

        return MessageToJson(status, indent=None).encode()
    return status.SerializeToString()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the OTLP exporters reuse their connection
    server_version = "kvprof-otlp-receiver"
    timeout = IDLE_TIMEOUT_S
    server: _Server

    # -- plumbing ------------------------------------------------------------------------------

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the stdlib's name)
        log.debug("http %s: " + format, self.address_string(), *args)

    def _reply(self, status: int, body: bytes, content_type: str,
               extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if self.close_connection or self.server.closing:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _refuse(self, exc: Rejection, json_body: bool) -> None:
        self.server.stats.refused(exc.reason, exc.message, f"HTTP {self.client_address[0]}")
        self._error(_STATUS[exc.reason], _RPC_CODE[exc.reason], exc.message, json_body)

    def _error(self, status: int, code: int, message: str, json_body: bool) -> None:
        extra = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
        ctype = JSON_TYPE if json_body else PROTOBUF_TYPES[0]
        self._reply(status, _status_body(code, message, json_body), ctype, extra)

    def _body_length(self) -> int | None:
        """Content-Length; None for a chunked body; raises Rejection when unusable."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return None
        raw = self.headers.get("Content-Length")
        if raw is None:
            return 0
        try:
            n = int(raw)
        except ValueError:
            n = -1
        if n < 0:
            self.close_connection = True
            raise Rejection(pl.INVALID, f"bad Content-Length {raw!r}")
        return n

    def _read_chunked(self, limit: int) -> bytes:
        out = bytearray()
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise Rejection(pl.INVALID, "malformed chunked body") from None
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return bytes(out)
            if len(out) + size > limit:
                self.close_connection = True
                raise Rejection(pl.TOO_LARGE, f"chunked body over {limit} bytes")
            out += self.rfile.read(size)
            self.rfile.readline(8)

    def _discard(self, n: int | None) -> None:
        """Skip a body we will not use, keeping the connection when that is cheap."""
        if n is None or n > max(DISCARD_LIMIT, 4 * self.server.intake.max_payload_bytes):
            self.close_connection = True
            return
        while n > 0:
            got = self.rfile.read(min(n, _DISCARD_CHUNK))
            if not got:
                self.close_connection = True
                return
            n -= len(got)

    # -- requests ------------------------------------------------------------------------------

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        with self.server.in_flight():
            path = self.path.split("?", 1)[0]
            if path == TRACES_PATH:
                self._post_traces()
                return
            signal = DROPPED_PATHS.get(path)
            if signal:
                self._post_dropped(signal)
                return
            json_body = self._media_type() == JSON_TYPE
            try:
                n = self._body_length()
            except Rejection:
                n = None
            self._discard(n)
            self.server.stats.ignored_signal("other", f"HTTP {path}")
            self._error(HTTPStatus.NOT_FOUND, 5,
                        f"no such endpoint {path}; OTLP traces go to POST {TRACES_PATH}",
                        json_body)

    def do_GET(self) -> None:  # noqa: N802
        with self.server.in_flight():
            if self.path.split("?", 1)[0] in ("/healthz", "/readyz"):
                self._reply(HTTPStatus.OK, b"ok\n", "text/plain")
                return
            self._method_not_allowed()

    do_HEAD = do_GET

    def do_PUT(self) -> None:  # noqa: N802
        with self.server.in_flight():
            self._method_not_allowed()

    do_DELETE = do_PATCH = do_PUT

    def _method_not_allowed(self) -> None:
        try:
            self._discard(self._body_length())
        except Rejection:
            self.close_connection = True
        self.server.stats.ignored_signal("other", f"HTTP {self.command} {self.path[:80]}")
        self._reply(HTTPStatus.METHOD_NOT_ALLOWED,
                    f"OTLP traces go to POST {TRACES_PATH}\n".encode(), "text/plain",
                    {"Allow": "POST"})

    def _media_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()

    def _usable_body(self, media: str, n: int | None) -> str:
        """The body's Content-Encoding, once its type, encoding and size are acceptable;
        otherwise the body is skipped and Rejection raised."""
        if media not in PROTOBUF_TYPES and media != JSON_TYPE:
            self._discard(n)
            raise Rejection(pl.UNSUPPORTED, f"Content-Type {media or '(none)'!r} is not "
                            f"{PROTOBUF_TYPES[0]} or {JSON_TYPE}")
        encoding = self.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in ("", "identity", "gzip"):
            self._discard(n)
            raise Rejection(pl.UNSUPPORTED,
                            f"Content-Encoding {encoding!r} is not gzip or identity")
        limit = self.server.intake.max_payload_bytes
        if n is not None and n > limit:
            self._discard(n)
            raise Rejection(pl.TOO_LARGE, f"body of {n} bytes is over the receiver's "
                            f"limit of {limit} bytes")
        return encoding

    def _post_dropped(self, signal: str) -> None:
        """A logs or metrics export: read within the payload limit, counted, dropped, and
        answered with the count (never queued: it costs no trace memory)."""
        media = self._media_type()
        json_body = media == JSON_TYPE
        limit = self.server.intake.max_payload_bytes
        try:
            n = self._body_length()
            encoding = self._usable_body(media, n)
            body = self._read_chunked(limit) if n is None else self.rfile.read(n)
            if n is not None and len(body) < n:
                self.close_connection = True
                raise Rejection(pl.INVALID, f"body ended after {len(body)} of {n} bytes")
            if encoding == "gzip":
                body = pl.gunzip(body, limit)
            count = other_signals.count_items(signal, body, json_body)
        except Rejection as exc:
            self._refuse(exc, json_body)
            return
        except (OSError, ValueError) as exc:
            self.close_connection = True
            log.debug("http %s: body not read: %s", self.address_string(), exc)
            return
        self.server.stats.dropped_signal(signal, count, f"HTTP {self.path.split('?', 1)[0]}")
        self._reply(HTTPStatus.OK, other_signals.response_bytes(signal, count, json_body),
                    JSON_TYPE if json_body else PROTOBUF_TYPES[0])

    def _post_traces(self) -> None:
        intake = self.server.intake
        media = self._media_type()
        json_body = media == JSON_TYPE
        reserved = 0
        try:
            n = self._body_length()
            encoding = self._usable_body(media, n)
            want = intake.max_payload_bytes if n is None else n
            try:
                intake.reserve(want)
            except Rejection:
                self._discard(n)
                raise
            reserved = want
            body = self._read_chunked(want) if n is None else self.rfile.read(n)
            if n is not None and len(body) < n:
                self.close_connection = True
                raise Rejection(pl.INVALID, f"body ended after {len(body)} of {n} bytes")
            taken, reserved = reserved, 0  # take() owns the reservation from here
            screened = intake.take(body, pl.JSON if json_body else pl.PROTOBUF,
                                   gzip=encoding == "gzip", reserved=taken)
        except Rejection as exc:
            if reserved:
                intake.queue.release(reserved)
            self._refuse(exc, json_body)
            return
        except (OSError, ValueError) as exc:
            # The client went away or sent garbage framing mid-body.
            if reserved:
                intake.queue.release(reserved)
            self.close_connection = True
            log.debug("http %s: body not read: %s", self.address_string(), exc)
            return
        self._reply(HTTPStatus.OK, _response_body(screened, json_body),
                    JSON_TYPE if json_body else PROTOBUF_TYPES[0])


def _response_body(screened: pl.Screened, json_body: bool) -> bytes:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceResponse,
    )

    response = ExportTraceServiceResponse()
    if screened.rejected:
        response.partial_success.rejected_spans = screened.rejected
        response.partial_success.error_message = screened.error_message
    if json_body:
        from google.protobuf.json_format import MessageToJson

        return MessageToJson(response, indent=None).encode()
    return response.SerializeToString()


class _InFlight:
    def __init__(self, server: _Server):
        self.server = server

    def __enter__(self) -> None:
        with self.server.cond:
            self.server.active += 1

    def __exit__(self, *exc) -> None:
        with self.server.cond:
            self.server.active -= 1
            self.server.cond.notify_all()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # stop() ends idle keep-alive connections itself; joining their threads would wait for
    # IDLE_TIMEOUT_S.
    block_on_close = False
    allow_reuse_address = True  # TIME_WAIT only; a live listener still makes bind fail
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], intake: Intake, stats: ReceiverStats):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.intake = intake
        self.stats = stats
        self.closing = False
        self.active = 0
        self.cond = threading.Condition()
        self.connections: set[socket.socket] = set()
        super().__init__(address, _Handler)

    def in_flight(self) -> _InFlight:
        return _InFlight(self)

    def process_request(self, request, client_address) -> None:
        with self.cond:
            full = len(self.connections) >= MAX_CONNECTIONS
            if not full:
                self.connections.add(request)
        if full:
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
                                b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.stats.refused(pl.UNAVAILABLE, f"over {MAX_CONNECTIONS} open connections",
                               f"HTTP {client_address[0]}")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self.cond:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # a sender that hung up or went silent
            log.debug("http %s: connection error: %s", client_address[0], exc)
            return
        # A bug: this request is lost (the connection closes); the receiver carries on.
        log.error("kvprof traces receive: error handling a request from %s", client_address[0],
                  exc_info=True)


class OtlpHttpServer:
    """An OTLP/HTTP trace receiver on one address, one thread per connection."""

    def __init__(self, intake: Intake, stats: ReceiverStats, host: str, port: int):
        self.intake = intake
        self.stats = stats
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> OtlpHttpServer:
        """Bind and serve; raises OSError when the address cannot be bound."""
        self._server = _Server((self.host, self.port), self.intake, self.stats)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name="kvprof-receiver-http", daemon=True)
        self._thread.start()
        return self

    def stop(self, grace: float) -> None:
        """Stop accepting, let requests being handled finish (up to grace s), drop idle ones."""
        server = self._server
        if server is None:
            return
        server.closing = True
        server.shutdown()
        server.server_close()
        with server.cond:
            server.cond.wait_for(lambda: server.active == 0, grace)
            idle = list(server.connections)
        for sock in idle:
            # Keep-alive connections waiting for their next request: wake their threads.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server = None
