"""`--traces http://host:16686`: the Jaeger query API, served by a local http.server."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from conftest import FIXTURES

from kvprof.analysis.loaders.traces import load_spans
from kvprof.errors import ResourceAbsentError, UsageError


@pytest.fixture()
def jaeger():
    trace = json.loads((FIXTURES / "jaeger_ui_testTraceNormal.json").read_text())
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            url = urlparse(self.path)
            query = parse_qs(url.query)
            seen.append({"path": url.path, **{k: v[0] for k, v in query.items()}})
            if url.path == "/api/services":
                body = {"data": ["api-gateway", "customers-service"], "total": 2}
            elif url.path == "/api/traces":
                body = {"data": [trace] if query.get("service") == ["api-gateway"] else [],
                        "total": 0, "limit": 0, "offset": 0, "errors": None}
            else:
                self.send_response(404)
                self.end_headers()
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_fetch_traces_of_a_service(jaeger):
    url, seen = jaeger
    load = load_spans(url, service="api-gateway", lookback="2h")
    assert len(load.spans) == 5 and load.formats == {"jaeger"}
    assert seen[-1] == {"path": "/api/traces", "service": "api-gateway", "lookback": "2h",
                        "limit": "10000"}


def test_missing_service_lists_what_jaeger_knows(jaeger):
    url, _ = jaeger
    with pytest.raises(UsageError) as err:
        load_spans(url)
    assert "api-gateway, customers-service" in err.value.hint


def test_unreachable_jaeger_is_a_missing_resource():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connection refused
        with pytest.raises(ResourceAbsentError) as err:
            load_spans(f"http://127.0.0.1:{port}", service="x")
    assert err.value.exit_code == 4 and "port-forward" in err.value.hint
