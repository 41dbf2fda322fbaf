"""A burst far larger than the queue: senders are told to retry (503 / UNAVAILABLE), the
receiver's resident memory stays bounded, and everything it accepted reaches the files."""

from __future__ import annotations

import http.client
import threading
import time

import grpc
import psutil
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from receiver_helpers import assert_files_complete, make_spans, summary_of

pytestmark = pytest.mark.timeout(300)

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
QUEUE = 4 << 20
HTTP_SENDERS, HTTP_POSTS = 8, 30
GRPC_SENDERS, GRPC_CALLS = 4, 15
# Resident growth allowed over the warmed-up receiver: the 4 MiB queue, bodies being parsed,
# gRPC's handler threads (8 x 1 MiB), the writer's encoding and the allocator's slack. The
# burst itself is ~300 MiB, so a receiver that buffered it would be far over.
RSS_GROWTH_LIMIT = 96 << 20


def test_a_burst_gets_503_and_unavailable_and_memory_stays_bounded(receiver_factory):
    rec = receiver_factory("--max-queue-bytes", str(QUEUE), "--max-payload-bytes", "2MiB")
    body = encode_spans(make_spans(1500, attrs_per_span=10)).SerializeToString()  # ~1 MiB
    spans_per_body = 4500
    host, port = rec.http.rsplit(":", 1)
    headers = {"Content-Type": "application/x-protobuf"}

    def post(conn: http.client.HTTPConnection) -> tuple[int, str | None]:
        conn.request("POST", "/v1/traces", body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("Retry-After")

    warm = http.client.HTTPConnection(host, int(port), timeout=60)
    assert post(warm)[0] == 200
    warm.close()
    time.sleep(1.0)  # written: the writer and the encoders have been through once
    proc = psutil.Process(rec.proc.pid)
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                peak[0] = max(peak[0], proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.01)

    http_results: list[tuple[int, str | None]] = []
    grpc_results: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def http_sender():
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            for _ in range(HTTP_POSTS):
                got = post(conn)
                with lock:
                    http_results.append(got)
        finally:
            conn.close()

    def grpc_sender():
        with grpc.insecure_channel(rec.grpc) as channel:
            export = channel.unary_unary(EXPORT)
            for _ in range(GRPC_CALLS):
                try:
                    export(body, timeout=60)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as err:
                    code = err.code()
                with lock:
                    grpc_results.append(code)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=http_sender) for _ in range(HTTP_SENDERS)]
    threads += [threading.Thread(target=grpc_sender) for _ in range(GRPC_SENDERS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    burst_s = time.monotonic() - t0
    done.set()
    sampler.join(5)
    assert rec.alive(), rec.stderr
    rc, out, err = rec.stop()
    assert rc == 0, err

    statuses = [s for s, _ in http_results]
    assert len(statuses) == HTTP_SENDERS * HTTP_POSTS
    assert set(statuses) <= {200, 503}, set(statuses)
    assert statuses.count(503) > 0 and statuses.count(200) > 0
    assert all(retry == "1" for s, retry in http_results if s == 503)
    assert set(grpc_results) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
    assert grpc.StatusCode.UNAVAILABLE in grpc_results, grpc_results
    growth = peak[0] - base
    print(f"burst of {len(threads)} senders, {len(http_results) + len(grpc_results)} payloads "
          f"of {len(body)} B in {burst_s:.1f} s: HTTP 200/503 = {statuses.count(200)}/"
          f"{statuses.count(503)}, gRPC OK/UNAVAILABLE = {grpc_results.count(grpc.StatusCode.OK)}"
          f"/{grpc_results.count(grpc.StatusCode.UNAVAILABLE)}; RSS {base >> 20} MiB -> peak "
          f"{peak[0] >> 20} MiB")
    assert growth < RSS_GROWTH_LIMIT, f"resident memory grew {growth >> 20} MiB"

    summary = summary_of(out)
    accepted = 1 + statuses.count(200) + grpc_results.count(grpc.StatusCode.OK)
    assert summary["payloads_accepted"] == accepted
    assert summary["spans_received"] == summary["spans_written"] == accepted * spans_per_body
    assert summary["payloads_rejected_by_reason"] == {
        "unavailable": statuses.count(503) + grpc_results.count(grpc.StatusCode.UNAVAILABLE)}
    assert summary["queue_peak_bytes"] <= QUEUE
    assert assert_files_complete(rec.output) == accepted * 5  # 4,500 spans = 5 lines of <=1,024
