"""Real vLLM P/D pairs on 127.0.0.1 under `kvprof attach --exporter file`, via demo/router.py.

The client sends X-Request-Id and times its requests like aiperf; the router records its
legs and forwards a traceparent (and, for one request, only X-Request-Id, as vLLM's example
proxies do); the analysis then accounts for each request's TTFT leg by leg.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from kvprof import semconv
from kvprof.model import KvGeometry, load_hf_config

from . import engines as E

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

sys.path.insert(0, str(E.REPO / "demo"))
import router  # noqa: E402

PROMPTS = [
    "The prefill engine computes the KV cache of the prompt and hands it to the decode "
    "engine. " * 3,
    "Kubernetes places pods on nodes; the placement decides which links the KV cache "
    "crosses. " * 2,
    "Time to first token grows when the handshake between engines happens on first contact, "
    "and a KV cache block holds the keys and values of thirty-two tokens per layer. " * 2,
]
MAX_TOKENS = 8


def load_spans(directory: Path) -> list[dict]:
    """Flatten OTLP/JSON lines into dicts with name, ids, times and attributes."""
    out = []
    for f in sorted(directory.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            doc = json.loads(line)
            for rs in doc["resourceSpans"]:
                res = {a["key"]: next(iter(a["value"].values()))
                       for a in rs["resource"]["attributes"]}
                for ss in rs["scopeSpans"]:
                    for s in ss["spans"]:
                        attrs = {a["key"]: next(iter(a["value"].values()))
                                 for a in s.get("attributes", [])}
                        out.append({"name": s["name"], "trace": s["traceId"],
                                    "span": s["spanId"], "parent": s.get("parentSpanId"),
                                    "start": int(s["startTimeUnixNano"]),
                                    "end": int(s["endTimeUnixNano"]), "attrs": attrs,
                                    "resource": res})
    return out


class Pair:
    """A prefill/decode pair of API servers under `kvprof attach --exporter file`."""

    def __init__(self, tmp: Path, model: Path, connector: dict, name: str,
                 worker_in_core: bool = False, cores=(0, 1)):
        self.tmp, self.name, self.traces = tmp, name, tmp / f"{name}-traces"
        self.ports = (E.free_port(), E.free_port())
        att = ["--exporter", "file", "--output", str(self.traces)]
        self.procs = [
            E.start_server(model, port, core, {**connector, "kv_role": role}, self.log(side),
                           att + ["--service-name", f"vllm-{service}"],
                           side_port=E.free_port(), worker_in_core=worker_in_core)
            for port, core, role, side, service in zip(
                self.ports, cores, ("kv_producer", "kv_consumer"), "pd",
                ("prefill", "decode"), strict=True)]

    def log(self, side: str) -> Path:
        return self.tmp / f"{self.name}-{side}.log"

    def wait_ready(self) -> None:
        for proc, port, side in zip(self.procs, self.ports, "pd", strict=True):
            E.wait_ready(proc, port, self.log(side))

    def exercise(self, xid_only: bool = False) -> list[dict]:
        """The prompts through demo/router.py, one after the other (the second streamed);
        with ``xid_only`` one more through a router that forwards X-Request-Id only."""
        upstreams = [f"127.0.0.1:{p}" for p in self.ports]
        srv, _ = router.serve_in_thread(*upstreams, trace_dir=self.traces)
        answers = []
        try:
            for i, prompt in enumerate(PROMPTS):
                answers.append(E.complete(srv.server_address[1], prompt, MAX_TOKENS,
                                          f"{self.name}-{i}", stream=(i == 1), watch=self.procs))
        finally:
            router.stop_router(srv)
        if xid_only:
            srv, _ = router.serve_in_thread(*upstreams, trace_dir=self.traces, propagate=False)
            try:
                answers.append(E.complete(srv.server_address[1], PROMPTS[0], MAX_TOKENS,
                                          f"{self.name}-xid-only", stream=True,
                                          watch=self.procs))
            finally:
                router.stop_router(srv)
        time.sleep(1.5)  # one export interval, so nothing waits for the exit flush alone
        return answers

    def results(self) -> tuple[list[dict], list[str]]:
        """Spans and logs, once the servers have stopped (exit flush, summary line)."""
        logs = [self.log(side).read_text(errors="replace") for side in "pd"]
        return load_spans(self.traces), logs


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tiny_model):
    """Every engine of this module, started together so their start-ups overlap.

    The NIXL pair, the ExampleConnector pair (its own storage dir) and one plain engine
    without probes or connector (the token baseline) all start at once, are used one after
    the other, and stop together: one start-up wait instead of three. Start-up is mostly
    importing vLLM into each Python process, so the engines differ in topology: the NIXL
    pair runs vLLM's CPU default (frontend, EngineCore, worker: three probed processes
    each); the ExampleConnector pair and the baseline run the model runner inside the
    EngineCore (the one-GPU default), two processes each. Both topologies get covered.
    """
    tmp = tmp_path_factory.mktemp("pd")
    storage = tmp / "kv-files"
    example_cfg = {"kv_connector": "ExampleConnector",
                   "kv_connector_extra_config": {"shared_storage_path": str(storage)}}
    pairs: dict[str, Pair] = {}
    plain = None
    plain_port = E.free_port()
    out: dict = {"storage": storage}
    try:
        if importlib.util.find_spec("nixl") is not None:
            pairs["nixl"] = Pair(tmp, tiny_model, {"kv_connector": "NixlConnector",
                                                   "kv_buffer_device": "cpu"}, "nixl")
        pairs["example"] = Pair(tmp, tiny_model, example_cfg, "example", worker_in_core=True)
        plain = E.start_server(tiny_model, plain_port, 1, None, tmp / "plain.log",
                               worker_in_core=True)
        for pair in pairs.values():
            pair.wait_ready()
        E.wait_ready(plain, plain_port, tmp / "plain.log")
        for name, pair in pairs.items():
            answers = pair.exercise(xid_only=name == "nixl")
            out[name + "_answers"] = answers
            out[name + "_texts"] = [a["choices"][0]["text"] for a in answers[:len(PROMPTS)]]
        out["baseline"] = [E.complete(plain_port, p, MAX_TOKENS, f"plain-{i}", watch=[plain])
                           ["choices"][0]["text"] for i, p in enumerate(PROMPTS)]
    finally:
        E.stop_all([p for pair in pairs.values() for p in pair.procs]
                   + ([plain] if plain is not None else []))
    for name, pair in pairs.items():
        out[name + "_spans"], out[name + "_logs"] = pair.results()
        out[name + "_traces"] = pair.traces
        out[name + "_aiperf"] = E.aiperf_records(out[name + "_answers"], tmp / f"{name}-aiperf")
    return out


@pytest.fixture(scope="module")
def nixl_run(engines):
    if "nixl_texts" not in engines:
        pytest.skip("nixl is not installed")
    return engines["nixl_texts"], engines["nixl_spans"], engines["nixl_logs"]


@pytest.fixture(scope="module")
def example_run(engines):
    return (engines["example_texts"], engines["example_spans"], engines["example_logs"],
            engines["storage"])


@pytest.fixture(scope="module")
def baseline_texts(engines):
    """The same prompts on one plain engine: no probes, no connector."""
    return engines["baseline"]


def by_trace(spans):
    """Request traces (engine step records have traces of their own, left out)."""
    traces = defaultdict(list)
    for s in spans:
        if s["name"] == semconv.SPAN_ENGINE_STEP:
            continue
        traces[s["trace"]].append(s)
    return traces


def geometry(model: Path, tokens: int) -> KvGeometry:
    return KvGeometry(load_hf_config(model), "fp16", E.BLOCK_SIZE, tokens)


ENGINE_SPANS = {semconv.SPAN_PREFILL, semconv.SPAN_PREFILL_QUEUE, semconv.SPAN_PREFILL_COMPUTE,
                semconv.SPAN_KV_HOLD, semconv.SPAN_DECODE, semconv.SPAN_KV_TRANSFER,
                semconv.SPAN_DECODE_QUEUE, semconv.SPAN_DECODE_FIRST_TOKEN,
                semconv.SPAN_DECODE_KV_WAIT}
# Spans of the legs between the engines: the router's, and each API server's (both roles).
LEG_SPANS = {*semconv.ROUTER_SPANS, *semconv.API_SPANS, semconv.SPAN_DECODE_KV_WAIT}


def test_nixl_every_request_is_one_trace_from_the_router_to_the_first_token(nixl_run,
                                                                            tiny_model):
    texts, spans, logs = nixl_run
    traces = by_trace(spans)
    # The three requests through the traceparent-forwarding router: one trace each.
    routed = [t for t in traces.values()
              if any(s["name"] == semconv.SPAN_ROUTER_REQUEST for s in t)
              and any(s["name"] == semconv.SPAN_PREFILL for s in t)]
    assert len(routed) == len(PROMPTS), sorted(
        {(s["name"], str(s["attrs"].get(semconv.ATTR_REQUEST_ID))) for s in spans})
    ordered = sorted(routed, key=lambda t: min(s["start"] for s in t))
    for i, trace in enumerate(ordered):
        names = [s["name"] for s in trace]
        assert ENGINE_SPANS | set(semconv.ROUTER_SPANS) <= set(names), names
        for role in ("prefill", "decode"):
            api = {s["name"] for s in trace if s["attrs"].get(semconv.ATTR_ROLE) == role
                   and s["name"] in semconv.API_SPANS}
            assert api == set(semconv.API_SPANS), (role, api)
        assert (semconv.SPAN_KV_HANDSHAKE in names) == (i == 0), (i, names)
        ids = {s["span"] for s in trace}
        root = next(s for s in trace if s["name"] == semconv.SPAN_ROUTER_REQUEST)
        assert not root["parent"]
        for s in trace:  # one tree: every parent is in the trace
            assert not s["parent"] or s["parent"] in ids, s["name"]
        assert {s["resource"]["service.name"] for s in trace} == {"vllm-prefill",
                                                                  "vllm-decode", "pd-router"}
        top = next(s for s in trace if s["name"] == semconv.SPAN_PREFILL)
        prompt_tokens = int(top["attrs"][semconv.ATTR_PROMPT_TOKENS])
        xfer = next(s for s in trace if s["name"] == semconv.SPAN_KV_TRANSFER)
        blocks = int(xfer["attrs"][semconv.ATTR_KV_BLOCKS])
        assert blocks == math.ceil(prompt_tokens / E.BLOCK_SIZE)
        assert int(xfer["attrs"][semconv.ATTR_KV_BYTES]) == geometry(
            tiny_model, blocks * E.BLOCK_SIZE).total_bytes
        assert xfer["attrs"][semconv.ATTR_KV_CONNECTOR] == "NixlPullConnector"
        assert xfer["attrs"][semconv.ATTR_KV_PATH] == "loopback"
        for s in trace:  # never prompt or output text
            assert not any(PROMPTS[0][:20] in str(v) for v in s["attrs"].values())
    assert "kvprof:" in logs[0] and "spans from" in logs[0]


def test_every_leg_span_has_a_positive_duration(nixl_run):
    _, spans, _ = nixl_run
    legs = [s for s in spans if s["name"] in LEG_SPANS]
    assert {s["name"] for s in legs} == LEG_SPANS
    for s in legs:
        assert s["end"] > s["start"], (s["name"], s["attrs"])


def test_legs_add_up_to_the_client_ttft_per_request(engines):
    """The client's TTFT (its own clock, as aiperf measures it) = the legs + unaccounted,
    per request within 1 ms; with every leg traced nothing is left unaccounted, also for the
    request whose router forwarded only X-Request-Id."""
    from kvprof.analysis.breakdown import SOURCE_ID, build_breakdown
    from kvprof.analysis.loaders.aiperf import load_aiperf_records
    from kvprof.analysis.loaders.traces import load_spans as load_table

    if "nixl_traces" not in engines:
        pytest.skip("nixl is not installed")
    bd = build_breakdown(load_table(engines["nixl_traces"]).spans,
                         load_aiperf_records(engines["nixl_aiperf"]))
    req = bd.requests.set_index("x_request_id")
    assert sorted(req.index) == sorted(a["x_request_id"] for a in engines["nixl_answers"])
    for xid, row in req.iterrows():
        assert row["ttft_source"] == SOURCE_ID
        assert row["chain"] == "disaggregated"
        assert abs(row["stacked_ms"] + row["unaccounted_ms"] - row["ttft_ms"]) < 1.0
        assert row["unaccounted_detail"] is None, (xid, row["unaccounted_detail"])
        assert abs(row["unaccounted_ms"]) < 1.0, xid
        assert row["leg:router.recv"] >= 0 and row["leg:kv.transfer.end"] > 0
    assert req.loc["nixl-xid-only", "leg:decode.api.recv"] > 0


def test_example_connector_serialize_is_a_file_write(example_run, tiny_model):
    texts, spans, logs, storage = example_run
    assert list(storage.rglob("*.safetensors"))
    traces = by_trace(spans)
    assert len(traces) == len(PROMPTS)
    bpt = geometry(tiny_model, 1).bytes_per_token
    for trace in traces.values():
        names = {s["name"] for s in trace}
        assert {semconv.SPAN_PREFILL, semconv.SPAN_PREFILL_COMPUTE, semconv.SPAN_KV_SERIALIZE,
                semconv.SPAN_DECODE, semconv.SPAN_KV_DESERIALIZE,
                semconv.SPAN_DECODE_FIRST_TOKEN} <= names, names
        assert semconv.SPAN_KV_HANDSHAKE not in names
        prompt_tokens = int(next(s for s in trace if s["name"] == semconv.SPAN_PREFILL)
                            ["attrs"][semconv.ATTR_PROMPT_TOKENS])
        saved = (prompt_tokens - 1) // E.BLOCK_SIZE * E.BLOCK_SIZE  # whole blocks only
        for name in (semconv.SPAN_KV_SERIALIZE, semconv.SPAN_KV_DESERIALIZE):
            s = next(x for x in trace if x["name"] == name)
            assert int(s["attrs"]["kvprof.tokens"]) == saved
            assert int(s["attrs"][semconv.ATTR_KV_BYTES]) == saved * bpt
            assert s["attrs"][semconv.ATTR_KV_PATH] == "file"


def test_tokens_identical_with_and_without_probes(nixl_run, example_run, baseline_texts):
    assert nixl_run[0] == baseline_texts
    assert example_run[0] == baseline_texts
    assert all(t for t in baseline_texts)
