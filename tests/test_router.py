"""demo/router.py against two real HTTP upstreams standing in for the prefill and decode
servers (their answers have vLLM's shape); the router's spans through the real OTel SDK."""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from otlp_files import file_spans

from kvprof import semconv

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "demo"))
try:
    import router
finally:
    sys.path.remove(str(REPO / "demo"))


class _Engine(BaseHTTPRequestHandler):
    """Answers a completion like vLLM: the prefill side with kv_transfer_params."""

    def log_message(self, *args) -> None:  # quiet test output
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prefill = body.get("kv_transfer_params", {}).get("do_remote_decode")
        answer = {"choices": [{"text": "x"}],
                  "kv_transfer_params": {"remote_block_ids": [1]} if prefill else None}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def upstreams():
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Engine) for _ in range(2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield [f"127.0.0.1:{s.server_address[1]}" for s in servers]
    for s in servers:
        s.shutdown()
        s.server_close()


def _span_names(directory: Path) -> list[str]:
    return [s["name"] for s in file_spans(directory)]


def test_stopping_the_router_keeps_the_spans_of_the_request_it_just_answered(
        upstreams, tmp_path, monkeypatch):
    """The client has its answer before the router ends its last spans; a stop right after
    it (as the tests and the demo do) must wait for them, not drop them."""
    first_byte = router.RouterHandler._first_byte

    def slow_first_byte(self, *args):  # widen the window a loaded machine opens
        first_byte(self, *args)
        time.sleep(0.5)

    monkeypatch.setattr(router.RouterHandler, "_first_byte", slow_first_byte)
    srv, _ = router.serve_in_thread(*upstreams, trace_dir=tmp_path)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "a"}),
                     headers={"Content-Type": "application/json", "X-Request-Id": "r-1"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["choices"]
        conn.close()
    finally:
        router.stop_router(srv)
    assert sorted(_span_names(tmp_path)) == sorted(semconv.ROUTER_SPANS)


def test_a_hung_request_does_not_keep_the_router_from_stopping(upstreams, tmp_path,
                                                               monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(router.RouterServer, "drain_s", 0.5)
    monkeypatch.setattr(router.RouterHandler, "_first_byte",
                        lambda self, *a: release.wait(30))
    srv, _ = router.serve_in_thread(*upstreams, trace_dir=tmp_path)
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "a"}),
                     headers={"Content-Type": "application/json"})
        conn.getresponse().read()
        t0 = time.monotonic()
        router.stop_router(srv)
        assert time.monotonic() - t0 < 5
    finally:
        release.set()
        conn.close()
