"""Shared fixtures for the collector tests: recorded data, a real gRPC kubelet, a real HTTP API."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from collect_paths import A100_XML, IB_SYSFS, K8S, T4_XML  # noqa: E402


@pytest.fixture
def fixture_gpus():
    from fake_nvml import parse_nvidia_smi_xml

    return parse_nvidia_smi_xml(T4_XML) + [
        g.__class__(**{**g.__dict__, "index": 1}) for g in parse_nvidia_smi_xml(A100_XML)
    ]


@pytest.fixture
def ib_tree(tmp_path) -> Path:
    """A writable copy of the recorded IB sysfs tree (faults are injected into the copy)."""
    root = tmp_path / "sys"
    shutil.copytree(IB_SYSFS, root)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return root


def podresources_response():
    from kvprof.collectors.podresources import api_pb2

    data = json.loads((K8S / "podresources_list.json").read_text())
    response = api_pb2.ListPodResourcesResponse()
    for pod in data["pod_resources"]:
        p = response.pod_resources.add(name=pod["name"], namespace=pod["namespace"])
        for c in pod["containers"]:
            pc = p.containers.add(name=c["name"], cpu_ids=c.get("cpu_ids", []))
            for d in c["devices"]:
                pc.devices.add(resource_name=d["resource_name"], device_ids=d["device_ids"])
    return response


@pytest.fixture
def kubelet_socket(tmp_path):
    """A real gRPC server on a temp unix socket answering PodResourcesLister.List."""
    import grpc

    from kvprof.collectors.podresources import api_pb2_grpc

    class Lister(api_pb2_grpc.PodResourcesListerServicer):
        calls = 0

        def List(self, request, context):  # noqa: N802 - gRPC's name
            Lister.calls += 1
            return podresources_response()

    path = tmp_path / "kubelet.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    api_pb2_grpc.add_PodResourcesListerServicer_to_server(Lister(), server)
    server.add_insecure_port(f"unix://{path}")
    server.start()
    try:
        yield path
    finally:
        server.stop(grace=None).wait(5)


class FakeApiServer:
    """A real HTTP server on 127.0.0.1 speaking enough of the Kubernetes API for pod lists."""

    def __init__(self, status: int = 200, delay_s: float = 0.0):
        self.status = status
        self.delay_s = delay_s
        self.requests: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                owner.requests.append(self.path)
                if owner.delay_s:
                    time.sleep(owner.delay_s)
                if owner.status == 200:
                    items = [json.loads((K8S / f).read_text()) for f in (
                        "k9s_render_testdata_p1.json", "k9s_render_testdata_po_sidecar.json")]
                    body = {"kind": "PodList", "apiVersion": "v1", "metadata": {},
                            "items": items}
                else:
                    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "message": "pods is forbidden: User \"system:serviceaccount:kvprof:"
                            "kvprof\" cannot list resource \"pods\"", "code": owner.status}
                data = json.dumps(body).encode()
                try:
                    self.send_response(owner.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def pod_source(self, timeout_s: float = 2.0):
        from kubernetes import client

        from kvprof.collectors.kubeapi import KubePodSource

        configuration = client.Configuration(host=self.url)
        configuration.retries = False
        return KubePodSource(client.ApiClient(configuration), timeout_s=timeout_s)

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api_server():
    servers = []

    def start(status: int = 200, delay_s: float = 0.0) -> FakeApiServer:
        server = FakeApiServer(status, delay_s)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
