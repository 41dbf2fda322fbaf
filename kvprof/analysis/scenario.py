"""A documented synthetic disaggregated deployment: spans, aiperf records and link samples.

The golden scenario the tests check by hand (``ScenarioSpec()`` defaults):

* Two nodes: ``gpu-node-2`` runs prefill engines ``prefill-0`` and ``prefill-1``;
  ``gpu-node-1`` runs decode engines ``decode-0`` .. ``decode-3`` (the seed's likely layout,
  so every KV transfer crosses the network).
* Request k (k = 0 .. n-1) goes to ``prefill-(k % 2)`` and ``decode-(k % 4)``; it starts at
  ``k * spacing_ms`` on the prefill clock. That gives four (prefill, decode) pairs.
* Every request: prefill queue 5 ms, compute 180 ms, serialize 2 ms, then a 20 ms hand-over
  through the frontend (no span covers it), then on the decode engine handshake (300 ms on
  the first request of a pair, 0.5 ms after), transfer, deserialize 3 ms, decode queue 4 ms,
  first decode step 25 ms. ``kv.hold`` runs on the prefill engine from the end of serialize
  until 1 ms after the transfer ends (the decode side's "done" notification).
* Transfers move 524,288,000 B (4,000 tokens of Qwen3-32B FP8 = 250 blocks): 20 ms over
  InfiniBand ``mlx5_0/1`` (26.2 GB/s), except the pair prefill-1 -> decode-3, which fell back
  to TCP over ``eth0``: 420 ms (1.248 GB/s).
* The client (aiperf) sees 8 ms before the prefill starts and 3 ms after the first token, so
  aiperf TTFT = 250 ms + handshake + transfer, and unaccounted = 8 + 20 + 3 = 31 ms.
* The decode node's clock runs ``skew_ms`` (default +40 ms) ahead of the prefill node's,
  in its spans and in its collector samples.
* The last ``broken_traceparent`` requests' decode spans sit in their own trace (the
  traceparent got lost), so analysis must join them by request id.
* ``full_path=True`` adds what the probes write on a real path: a router on host
  ``frontend-0`` (its clock ``router_skew_ms`` off) and each engine's API-server spans. The
  31 ms no engine span covers are then legs too: client -> router 2, router 1, router ->
  prefill 1, prefill API input 2 + hand-off 1.5 + to the core 0.5 (the 8 ms before the
  prefill); prefill output 0.5 + answer 0.5 + back to the router 1, router 1, router ->
  decode 1, decode API input 10 + hand-off 5 + to the core 1 (the 20 ms hand-over); decode
  output 0.5 + first bytes 1 + to the router 0.5, router 0.5, router -> client 0.5 (the 3 ms
  after the first token). Nothing is left unaccounted.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from kvprof import semconv as sc

PREFILL_NODE = "gpu-node-2"
DECODE_NODE = "gpu-node-1"
NAMESPACE = "bhamm-qwen32b-disagg"
KV_BYTES = 524_288_000
KV_BLOCKS = 250
KV_DESCRIPTORS = 64_000  # 2 decode ranks x 32,000 descriptors of 8 KiB (TP1 -> TP2)
IB_RATE_BYTES_PER_S = 50e9  # NDR 400 Gb/s
NIC_RATE_BYTES_PER_S = 1.25e9  # 10 GbE


@dataclass
class ScenarioSpec:
    """Knobs of the synthetic deployment; defaults are the golden scenario."""

    requests: int = 24
    prefill_engines: int = 2
    decode_engines: int = 4
    spacing_ms: float = 1500.0
    skew_ms: float = 40.0
    prefill_queue_ms: float = 5.0
    prefill_compute_ms: float = 180.0
    serialize_ms: float = 2.0
    handover_ms: float = 20.0
    first_handshake_ms: float = 300.0
    steady_handshake_ms: float = 0.5  # 0: later requests record no handshake span at all
    kv_bytes: int = KV_BYTES  # kv.bytes of every transfer (the microbench JSON keeps KV_BYTES)
    ib_transfer_ms: float = 20.0
    tcp_transfer_ms: float = 420.0
    tcp_pair: tuple[int, int] = (1, 3)
    deserialize_ms: float = 3.0
    decode_queue_ms: float = 4.0
    first_token_ms: float = 25.0
    notify_ms: float = 1.0
    client_before_ms: float = 8.0
    client_after_ms: float = 3.0
    broken_traceparent: int = 2
    sample_interval_ms: float = 5.0
    t0_ns: int = 1_761_000_000_000_000_000
    jitter_ms: float = 0.0  # random extra prefill compute per request (bench realism)
    seed: int = 7
    full_path: bool = False
    router_skew_ms: float = -25.0
    # The router forwards X-Request-Id but no traceparent (vLLM's example proxies): its spans
    # sit in traces of their own and join by that id.
    router_own_trace: bool = False

# The full path's legs (ms), in order, splitting client_before / handover / client_after.
BEFORE_PREFILL = (2.0, 1.0, 1.0, 2.0, 1.5, 0.5)  # -> router, router, -> API, input, to_core, core
HANDOVER = (0.5, 0.5, 1.0, 1.0, 1.0, 10.0, 5.0, 1.0)  # output, answer, -> router, router, ...
AFTER_FIRST_TOKEN = (0.5, 1.0, 0.5, 0.5, 0.5)  # output, first bytes, -> router, router, client


@dataclass
class Scenario:
    """Where a written scenario lives, and its true per-request values."""

    root: Path
    traces: Path
    aiperf: Path
    samples: Path | None
    microbench: Path
    truth: list[dict] = field(default_factory=list)


def _kv(key: str, value) -> dict:
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    if isinstance(value, float):
        return {"key": key, "value": {"doubleValue": value}}
    return {"key": key, "value": {"stringValue": str(value)}}


def _ms(x: float) -> int:
    return int(round(x * 1e6))


class _Engine:
    """One engine process: its resource, and the spans it buffered for the next line."""

    def __init__(self, role: str, index: int, node: str, pid: int):
        self.role, self.index, self.node, self.pid = role, index, node, pid
        self.engine_id = f"{role}-{index}"
        worker = "vllmprefillworker" if role == sc.ROLE_PREFILL else "vllmdecodeworker"
        self.pod = f"qwen32b-disagg-{worker}-{index}"
        self.resource = [
            _kv(sc.RES_SERVICE_NAME, f"vllm-{role}"),
            _kv(sc.RES_HOST_NAME, self.pod),
            _kv(sc.RES_PROCESS_PID, pid),
            _kv(sc.ATTR_K8S_POD_NAME, self.pod),
            _kv(sc.ATTR_K8S_NAMESPACE, NAMESPACE),
            _kv(sc.ATTR_K8S_NODE_NAME, node),
            _kv(sc.ATTR_ENGINE_ID, self.engine_id),
            _kv(sc.ATTR_ROLE, role),
        ]
        self.spans: list[dict] = []

    def span(self, trace_id, span_id, parent, name, start_ns, end_ns, attrs) -> None:
        self.spans.append({
            "traceId": trace_id, "spanId": span_id, "parentSpanId": parent, "name": name,
            "kind": 1, "startTimeUnixNano": str(start_ns), "endTimeUnixNano": str(end_ns),
            "attributes": [_kv(k, v) for k, v in attrs.items()], "status": {},
        })

    def line(self) -> str:
        doc = {"resourceSpans": [{"resource": {"attributes": self.resource}, "scopeSpans": [
            {"scope": {"name": "kvprof.probes", "version": "0.1.0"}, "spans": self.spans}]}]}
        self.spans = []
        return json.dumps(doc, separators=(",", ":"))


def write_scenario(root: str | Path, spec: ScenarioSpec | None = None, samples: bool = True,
                   batch: int = 512) -> Scenario:
    """Write traces/*.jsonl, aiperf/profile_export.jsonl, samples/*.parquet, microbench.json."""
    spec = spec or ScenarioSpec()
    rnd = random.Random(spec.seed)
    root = Path(root)
    traces = root / "traces"
    traces.mkdir(parents=True, exist_ok=True)
    prefill = [_Engine(sc.ROLE_PREFILL, i, PREFILL_NODE, 1000 + i)
               for i in range(spec.prefill_engines)]
    decode = [_Engine(sc.ROLE_DECODE, i, DECODE_NODE, 2000 + i)
              for i in range(spec.decode_engines)]
    router = _Engine("router", 0, "frontend-0", 3000)
    router.resource = [_kv(sc.RES_SERVICE_NAME, "pd-router"), _kv(sc.RES_HOST_NAME, "frontend-0"),
                       _kv(sc.RES_PROCESS_PID, 3000), _kv(sc.ATTR_ROLE, sc.ROLE_ROUTER)]
    engines = prefill + decode + ([router] if spec.full_path else [])
    files = {e.engine_id: (traces / f"{e.engine_id}.jsonl").open("w") for e in engines}
    skew = _ms(spec.skew_ms)
    seen_pairs: set[tuple[int, int]] = set()
    truth: list[dict] = []
    windows: list[tuple[int, int, str]] = []  # true-time transfer windows with their link
    aiperf_lines: list[str] = []
    span_no = 0

    def sid() -> str:
        nonlocal span_no
        span_no += 1
        return f"{span_no:016x}"

    for k in range(spec.requests):
        p_i, d_i = k % spec.prefill_engines, k % spec.decode_engines
        p, d = prefill[p_i], decode[d_i]
        xid = f"{k:08x}-aaaa-4bbb-8ccc-{k:012x}"
        rid = f"cmpl-{xid}-0"
        tid = f"{k + 1:032x}"
        first = (p_i, d_i) not in seen_pairs
        seen_pairs.add((p_i, d_i))
        tcp = (p_i, d_i) == tuple(spec.tcp_pair)
        hs = spec.first_handshake_ms if first else spec.steady_handshake_ms
        xfer = spec.tcp_transfer_ms if tcp else spec.ib_transfer_ms
        compute = spec.prefill_compute_ms + (rnd.random() * spec.jitter_ms)
        t = spec.t0_ns + _ms(k * spec.spacing_ms)
        q_end = t + _ms(spec.prefill_queue_ms)
        c_end = q_end + _ms(compute)
        s_end = c_end + _ms(spec.serialize_ms)
        d_start = s_end + _ms(spec.handover_ms)
        h_end = d_start + _ms(hs)
        x_end = h_end + _ms(xfer)
        z_end = x_end + _ms(spec.deserialize_ms)
        dq_end = z_end + _ms(spec.decode_queue_ms)
        ft_end = dq_end + _ms(spec.first_token_ms)
        hold_end = x_end + _ms(spec.notify_ms)
        path = "tcp" if tcp else "infiniband"
        windows.append((h_end, x_end, path))
        root_id = sid()
        common = {sc.ATTR_REQUEST_ID: rid}
        p.span(tid, root_id, "", sc.SPAN_PREFILL, t, hold_end,
               {**common, sc.ATTR_PROMPT_TOKENS: 4000})
        p.span(tid, sid(), root_id, sc.SPAN_PREFILL_QUEUE, t, q_end, common)
        p.span(tid, sid(), root_id, sc.SPAN_PREFILL_COMPUTE, q_end, c_end, common)
        p.span(tid, sid(), root_id, sc.SPAN_KV_SERIALIZE, c_end, s_end,
               {**common, sc.ATTR_KV_BYTES: spec.kv_bytes, sc.ATTR_KV_BLOCKS: KV_BLOCKS})
        p.span(tid, sid(), root_id, sc.SPAN_KV_HOLD, s_end, hold_end,
               {**common, sc.ATTR_KV_BYTES: spec.kv_bytes})
        broken = k >= spec.requests - spec.broken_traceparent
        d_tid = f"{k + 1:016x}{'d' * 16}" if broken else tid
        d_root = sid()
        remote = {sc.ATTR_KV_REMOTE_ENGINE_ID: p.engine_id, sc.ATTR_KV_REMOTE_HOST: p.node}
        dshift = skew  # the decode node's clock reads true time + skew
        d.span(d_tid, d_root, "" if broken else root_id, sc.SPAN_DECODE, d_start + dshift,
               ft_end + dshift, {**common, **remote})
        if h_end > d_start:
            d.span(d_tid, sid(), d_root, sc.SPAN_KV_HANDSHAKE, d_start + dshift,
                   h_end + dshift, {**common, **remote})
        d.span(d_tid, sid(), d_root, sc.SPAN_KV_TRANSFER, h_end + dshift, x_end + dshift, {
            **common, **remote, sc.ATTR_KV_BYTES: spec.kv_bytes, sc.ATTR_KV_BLOCKS: KV_BLOCKS,
            sc.ATTR_KV_DESCRIPTORS: KV_DESCRIPTORS, sc.ATTR_KV_CONNECTOR: "NixlConnector",
            sc.ATTR_KV_PATH: path})
        d.span(d_tid, sid(), d_root, sc.SPAN_KV_DESERIALIZE, x_end + dshift, z_end + dshift,
               common)
        d.span(d_tid, sid(), d_root, sc.SPAN_DECODE_QUEUE, z_end + dshift, dq_end + dshift,
               common)
        d.span(d_tid, sid(), d_root, sc.SPAN_DECODE_FIRST_TOKEN, dq_end + dshift,
               ft_end + dshift, common)
        # The scheduler's view of the KV hand-over: request known -> KV ready (after the copy).
        d.span(d_tid, sid(), d_root, sc.SPAN_DECODE_KV_WAIT, d_start + dshift, z_end + dshift,
               common)
        if spec.full_path:
            _full_path(spec, p, d, router, sid, tid, d_tid, root_id, d_root, xid, rid,
                       t, s_end, d_start, ft_end, skew)
        for eng in (p, d, router):
            if len(eng.spans) >= batch:
                files[eng.engine_id].write(eng.line() + "\n")
        client_start = t - _ms(spec.client_before_ms)
        ttft_ms = (ft_end + _ms(spec.client_after_ms) - client_start) / 1e6
        truth.append({
            "request_id": rid, "x_request_id": xid, "prefill": p.engine_id,
            "decode": d.engine_id, "first_contact": first, "path": path,
            "handshake_ms": hs, "transfer_ms": xfer, "ttft_ms": ttft_ms,
            "prefill_compute_ms": compute,
        })
        aiperf_lines.append(json.dumps({
            "metadata": {"x_request_id": xid, "session_num": k, "turn_index": 0,
                         "request_start_ns": client_start,
                         "request_end_ns": client_start + _ms(ttft_ms + 5000),
                         "benchmark_phase": "profiling", "was_cancelled": False},
            "metrics": {"time_to_first_token": {"value": ttft_ms, "unit": "ms"},
                        "request_latency": {"value": ttft_ms + 5000.0, "unit": "ms"},
                        "inter_token_latency": {"value": 10.0, "unit": "ms"},
                        "output_sequence_length": {"value": 500, "unit": "tokens"},
                        "input_sequence_length": {"value": 4000, "unit": "tokens"}},
        }))
    for eng in engines:
        if eng.spans:
            files[eng.engine_id].write(eng.line() + "\n")
        files[eng.engine_id].close()
    aiperf = root / "aiperf"
    aiperf.mkdir(exist_ok=True)
    (aiperf / "profile_export.jsonl").write_text("\n".join(aiperf_lines) + "\n")
    mb = root / "microbench.json"
    mb.write_text(json.dumps(_microbench_doc(), indent=1))
    sample_dir = None
    if samples:
        sample_dir = root / "samples"
        _write_samples(sample_dir, spec, windows)
    return Scenario(root=root, traces=traces, aiperf=aiperf, samples=sample_dir,
                    microbench=mb, truth=truth)


def _full_path(spec, p, d, router, sid, tid, d_tid, p_root, d_root, xid, rid, t, s_end,
               d_start, ft_end, d_shift) -> None:
    """Router and API-server spans around one request (see the module docstring)."""
    def marks(end: int, legs: tuple[float, ...]) -> list[int]:
        out = [end]
        for ms in reversed(legs):
            out.insert(0, out[0] - _ms(ms))
        return out

    # Milestones in true time: before the prefill, the hand-over, after the first token.
    c_send, r_recv, r_psend, p_recv, p_input, p_handoff, _ = marks(t, BEFORE_PREFILL)
    h = [s_end]
    for ms in HANDOVER:
        h.append(h[-1] + _ms(ms))
    _, p_out, p_ans, r_pdone, r_dsend, d_recv, d_input, d_handoff, _ = h
    a = [ft_end]
    for ms in AFTER_FIRST_TOKEN:
        a.append(a[-1] + _ms(ms))
    _, d_out, d_bytes, r_read, r_write, _ = a
    assert c_send == t - _ms(spec.client_before_ms) and h[-1] == d_start
    rs = _ms(spec.router_skew_ms)
    rattrs = {sc.ATTR_X_REQUEST_ID: xid, sc.ATTR_ROLE: sc.ROLE_ROUTER}
    r_root = sid()
    r_tid = f"{int(tid, 16):016x}{'e' * 16}" if spec.router_own_trace else tid
    router.span(r_tid, r_root, "", sc.SPAN_ROUTER_REQUEST, r_recv + rs, r_write + rs + _ms(5000),
                rattrs)
    router.span(r_tid, sid(), r_root, sc.SPAN_ROUTER_PREFILL, r_psend + rs, r_pdone + rs, rattrs)
    router.span(r_tid, sid(), r_root, sc.SPAN_ROUTER_DECODE, r_dsend + rs, r_write + rs + _ms(5000),
                rattrs)
    router.span(r_tid, sid(), r_root, sc.SPAN_ROUTER_FIRST_BYTE, r_read + rs, r_write + rs, rattrs)
    for eng, trace, parent, role, shift, times in (
            (p, tid, p_root, sc.ROLE_PREFILL, 0, (p_recv, p_input, p_handoff, p_out, p_ans,
                                                  p_ans)),
            (d, d_tid, d_root, sc.ROLE_DECODE, d_shift, (d_recv, d_input, d_handoff, d_out,
                                                         d_bytes, d_bytes + _ms(5000)))):
        recv, inp, hand, out, answered, end = (x + shift for x in times)
        attrs = {sc.ATTR_REQUEST_ID: rid, sc.ATTR_X_REQUEST_ID: xid, sc.ATTR_ROLE: role}
        for name, start, stop in ((sc.SPAN_API_REQUEST, recv, end),
                                  (sc.SPAN_API_INPUT, recv, inp),
                                  (sc.SPAN_API_TO_CORE, inp, hand),
                                  (sc.SPAN_API_WAIT, hand, out),
                                  (sc.SPAN_API_RESPOND, out, answered)):
            eng.span(trace, sid(), parent, name, start, stop, attrs)


def _microbench_doc() -> dict:
    """A `kvprof microbench --json` result as the microbench part documents it."""
    return {
        "geometry": {"model": {"name": "qwen3-32b", "layers": 64, "kv_heads": 8,
                               "head_dim": 128}, "kv_dtype": "fp8", "tokens": 4000,
                     "block_size": 16, "total_bytes": KV_BYTES},
        "steps": {
            "gather": {"median_ms": 1.5, "p10_ms": 1.4, "p90_ms": 1.7},
            "transfer": {"median_ms": 11.0, "p10_ms": 10.6, "p90_ms": 11.8, "gbps": 47.7,
                         "limit_gbps": 50.0, "pct_of_limit": 95.3},
            "scatter": {"median_ms": 1.6, "p10_ms": 1.5, "p90_ms": 1.8},
        },
        "links": [{"name": "ib-ndr-400", "bytes_per_second": IB_RATE_BYTES_PER_S}],
        "environment": {"transport": "nixl", "device": "cuda", "path": "infiniband"},
        "sweep": [],
    }


def _write_samples(out: Path, spec: ScenarioSpec, windows: list[tuple[int, int, str]]) -> None:
    """Cumulative IB / NIC counters on both nodes, sampled every sample_interval_ms."""
    import numpy as np
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    start = windows[0][0] - _ms(200)
    stop = windows[-1][1] + _ms(200)
    step = _ms(spec.sample_interval_ms)
    grid = np.arange(start, stop + step, step, dtype=np.int64)
    ib = np.zeros(len(grid))
    nic = np.zeros(len(grid))
    for w0, w1, path in windows:
        # Bytes flow uniformly through the window: the counter ramps linearly.
        frac = np.clip((grid - w0) / (w1 - w0), 0.0, 1.0) * spec.kv_bytes
        if path == "tcp":
            nic += frac
        else:
            ib += frac
    frames = []
    for node, shift, tx in ((PREFILL_NODE, 0, True), (DECODE_NODE, _ms(spec.skew_ms), False)):
        ts = (grid + shift) / 1e9
        ib_metric = sc.METRIC_IB_XMIT if tx else sc.METRIC_IB_RCV
        nic_metric = sc.METRIC_NIC_TX if tx else sc.METRIC_NIC_RX
        for collector, entity, metric, values, labels in (
            ("infiniband", "mlx5_0/1", ib_metric, ib, {"device": "mlx5_0", "port": "1"}),
            ("infiniband", "mlx5_0/1", sc.METRIC_IB_RATE, np.full(len(grid), IB_RATE_BYTES_PER_S),
             {"device": "mlx5_0", "port": "1"}),
            ("host", "eth0", nic_metric, nic, {"nic": "eth0"}),
        ):
            frames.append(pd.DataFrame({
                "ts": ts, "node": node, "collector": collector, "entity": entity,
                "metric": metric, "value": values.astype("float64"),
                "labels": json.dumps(labels),
            }))
        frame = pd.concat(frames[-3:], ignore_index=True)
        frame.to_parquet(out / f"{node}.parquet", index=False)
