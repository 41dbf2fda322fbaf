"""The bf16 NIXL path, wherever the CPU allows it (kvprof/cpu_quirks.py has the why).

The demo and the other tests serve float16, which works on every x86-64 CPU. bf16 is the
tiny model's own dtype and what most GPU deployments serve; on a CPU with AMX tiles vLLM 0.32
runs its AMX attention kernels for it and the NIXL decode worker dies with SIGILL, so there
this test is skipped, saying so; everywhere else it proves the bf16 P/D pair end to end.
"""

from __future__ import annotations

import importlib.util
import sys
import time

import pytest

from kvprof import semconv
from kvprof.cpu_quirks import AMX_FLAG, amx_bf16_nixl_warning, has_amx, parse_serve_argv

from . import engines as E

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

sys.path.insert(0, str(E.REPO / "demo"))
import router  # noqa: E402

NIXL = {"kv_connector": "NixlConnector", "kv_buffer_device": "cpu"}
BF16_PROMPTS = ("The prefill engine computes the KV cache of the prompt. " * 4,
                "The decode engine pulls the KV cache over NIXL and generates tokens. " * 3)


def test_the_quirk_is_recognised_on_the_command_line_we_would_run(tiny_model):
    argv = E.server_command(tiny_model, 8000, {**NIXL, "kv_role": "kv_consumer"}, "bfloat16")
    assert amx_bf16_nixl_warning(parse_serve_argv(argv), amx=True) is not None
    assert amx_bf16_nixl_warning(parse_serve_argv(argv), amx=False) is None
    fp16 = E.server_command(tiny_model, 8000, {**NIXL, "kv_role": "kv_consumer"})
    assert amx_bf16_nixl_warning(parse_serve_argv(fp16), amx=True) is None


@pytest.mark.skipif(has_amx(), reason=f"this CPU has {AMX_FLAG}: vLLM 0.32's AMX attention "
                    "kernels make the bf16 NIXL decode worker die with SIGILL "
                    "(kvprof/cpu_quirks.py); float16 is covered by test_pd_vllm")
@pytest.mark.skipif(importlib.util.find_spec("nixl") is None, reason="nixl is not installed")
def test_bf16_nixl_pair_serves_and_transfers(tmp_path, tiny_model):
    traces = tmp_path / "traces"
    att = ["--exporter", "file", "--output", str(traces)]
    ports = (E.free_port(), E.free_port())
    procs = []
    try:
        for port, core, role, side in zip(ports, (0, 1), ("kv_producer", "kv_consumer"), "pd",
                                          strict=True):
            cmd = E.server_command(tiny_model, port, {**NIXL, "kv_role": role}, "bfloat16")
            procs.append(E.start_command(cmd, core, tmp_path / f"{side}.log",
                                         att + ["--service-name", f"vllm-{side}"],
                                         side_port=E.free_port()))
        for proc, port, side in zip(procs, ports, "pd", strict=True):
            E.wait_ready(proc, port, tmp_path / f"{side}.log")
        srv, _ = router.serve_in_thread(*(f"127.0.0.1:{p}" for p in ports))
        try:
            # Two different prompts: a repeated one would hit the decode engine's own
            # prefix cache, and its KV would (rightly) not be pulled a second time.
            answers = [E.complete(srv.server_address[1], prompt, 8, f"bf16-{i}",
                                  stream=i == 1, watch=procs)
                       for i, prompt in enumerate(BF16_PROMPTS)]
            # A finished transfer waits up to 1 s for NIXL's stats before its span goes out
            # (assembler.STATS_WAIT_NS), then the next 0.5 s flush: past both, so the spans
            # do not depend on the exit flush alone (as in test_pd_vllm).
            time.sleep(2.5)
        finally:
            router.stop_router(srv)
    finally:
        E.stop_all(procs)
    assert all(a["choices"][0]["text"] for a in answers)
    from .test_pd_vllm import load_spans

    names = [s["name"] for s in load_spans(traces)]
    assert names.count(semconv.SPAN_KV_TRANSFER) == 2, sorted(set(names))
