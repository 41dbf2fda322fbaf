"""A small prefill/decode router: OpenAI-compatible endpoints in front of two vLLM servers.

Like vLLM's toy disaggregation proxy: each request goes to the prefill server with
max_tokens=1 and kv_transfer_params {"do_remote_decode": true}, then to the decode server with
the kv_transfer_params the prefill server returned; the decode response (streamed or not) goes
back to the client. X-Request-Id passes through to both servers, so both engines know the
request by the same external id.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

log = logging.getLogger("kvprof.demo.router")

PD_PATHS = ("/v1/completions", "/v1/chat/completions")
PREFILL_PARAMS = {
    "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
    "remote_block_ids": None, "remote_host": None, "remote_port": None,
}


class Upstream:
    """One vLLM server: host/port parsed once from its base URL."""

    def __init__(self, url: str):
        parts = urlsplit(url if "://" in url else f"http://{url}")
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80

    def connect(self, timeout: float = 600.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)


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
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError:
            self._reply(400, {"error": "request body is not JSON"})
            return
        if self.path not in PD_PATHS:
            self._reply(404, {"error": f"unknown path {self.path}"})
            return
        request_id = self.headers.get("X-Request-Id") or str(uuid.uuid4())
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        prefill_body = dict(body, max_tokens=1, stream=False,
                            kv_transfer_params=dict(PREFILL_PARAMS))
        prefill_body.pop("stream_options", None)
        prefill_body.pop("max_completion_tokens", None)
        try:
            status, answer = _post(self.prefill, self.path, prefill_body, headers)
        except OSError as exc:
            self._reply(502, {"error": f"prefill server unreachable: {exc}"})
            return
        if status != 200 or not isinstance(answer, dict):
            self._reply(status if status != 200 else 502, answer)
            return
        decode_body = dict(body, kv_transfer_params=answer.get("kv_transfer_params"))
        self._forward_decode(decode_body, headers)

    def _forward_decode(self, body: dict, headers: dict) -> None:
        conn = self.decode.connect()
        try:
            conn.request("POST", self.path, body=json.dumps(body), headers=headers)
            resp = conn.getresponse()
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.getheader("Content-Type", "application/json"))
            self.send_header("X-Request-Id", headers["X-Request-Id"])
            if body.get("stream"):
                # Pass server-sent events through as they arrive.
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while chunk := resp.read1(65536):
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            else:
                data = resp.read()
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
        except OSError as exc:
            log.warning("decode server failed: %s", exc)
        finally:
            conn.close()


def make_router(prefill_url: str, decode_url: str, host: str = "127.0.0.1",
                port: int = 0) -> ThreadingHTTPServer:
    """A router server bound to host:port (0 = any free port); call serve_forever() on it."""
    handler = type("BoundRouterHandler", (RouterHandler,),
                   {"prefill": Upstream(prefill_url), "decode": Upstream(decode_url)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve_in_thread(prefill_url: str, decode_url: str,
                    port: int = 0) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Start a router on 127.0.0.1 in a daemon thread (tests, demo)."""
    server = make_router(prefill_url, decode_url, port=port)
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="pd-router")
    thread.start()
    return server, thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", required=True, help="prefill server, e.g. 127.0.0.1:8100")
    parser.add_argument("--decode", required=True, help="decode server, e.g. 127.0.0.1:8200")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    server = make_router(args.prefill, args.decode, args.host, args.port)
    log.info("router on http://%s:%d -> prefill %s, decode %s", args.host,
             server.server_address[1], args.prefill, args.decode)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
