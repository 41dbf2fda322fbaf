"""Probe overhead: ns per hook vs a bare call vs a naive OTel span; engine tokens/s on vs off.

Prints figures measured side by side in one run, and their ratios. Goals (issue 5): median
<= 2 us per hook, <= 1% tokens/s lost on the CPU engine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _median_ns(fn, calls: int = 20000, rounds: int = 15) -> float:
    per_call = []
    for _ in range(rounds):
        t = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter_ns() - t) / calls)
    return statistics.median(per_call)


def bench_hooks() -> dict[str, float]:
    """One scheduler.schedule()-shaped call: bare, through the kvprof hook, in an OTel span."""
    import wrapt
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from kvprof.probes import hooks
    from kvprof.probes.config import ProbeConfig
    from kvprof.probes.export import NoneExporter
    from kvprof.probes.recorder import Recorder

    class Req:
        req_id = "cmpl-1-0-abcdef01"

    class Out:
        scheduled_new_reqs = [Req()]

    out = Out()

    def schedule():
        return out

    recorder = Recorder(ProbeConfig(enabled=True, exporter="none"), exporter=NoneExporter())
    hooks.set_emit(recorder.emit)
    hooked = wrapt.FunctionWrapper(schedule, hooks.scheduler_schedule)

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(NoneExporter()))
    tracer = provider.get_tracer("naive")

    def naive():
        with tracer.start_as_current_span("schedule") as span:
            span.set_attribute("kvprof.request_id", Req.req_id)
            return schedule()

    def drain():
        recorder.buffer.clear()

    results = {}
    for _ in range(2):  # alternate, keep the second (warm) figures
        results["bare_ns"] = _median_ns(schedule)
        results["hook_ns"] = _median_ns(hooked)
        drain()
        results["naive_otel_span_ns"] = _median_ns(naive, calls=5000)
    hooks.set_emit(None)
    provider.shutdown()
    results["hook_added_ns"] = results["hook_ns"] - results["bare_ns"]
    return results


ENGINE_SCRIPT = r"""
import json, sys, time
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], block_size=32, max_model_len=1024, dtype="bfloat16", seed=0,
              max_num_seqs=8)
    sp = SamplingParams(max_tokens=int(sys.argv[2]), temperature=0, ignore_eos=True)
    prompts = ["The quick brown fox jumps over the lazy dog number %d." % i for i in range(8)]
    llm.generate(prompts[:2], sp)  # warm-up
    t = time.perf_counter()
    outs = llm.generate(prompts, sp)
    dt = time.perf_counter() - t
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    print("RESULT", json.dumps({"tokens": n, "seconds": dt}), flush=True)
"""


def engine_tokens_per_s(model: Path, probes: bool, max_tokens: int, out_dir: Path) -> float:
    from kvprof.probes.launcher import BOOTSTRAP_DIR

    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0",
               HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="WARNING")
    if probes:
        env.update(KVPROF_ENABLED="1", KVPROF_EXPORTER="file", KVPROF_OUTPUT=str(out_dir),
                   PYTHONPATH=os.pathsep.join([str(BOOTSTRAP_DIR), env.get("PYTHONPATH", "")]))
    script = out_dir / "engine_run.py"
    script.write_text(ENGINE_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(model), str(max_tokens)], env=env,
                       capture_output=True, text=True, timeout=600)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"engine run failed:\n{r.stderr[-3000:]}")
    doc = json.loads(line[7:])
    return doc["tokens"] / doc["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hooks-only", action="store_true", help="skip the engine runs")
    parser.add_argument("--rounds", type=int, default=2, help="alternating on/off engine runs")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    h = bench_hooks()
    print(f"bare call            : {h['bare_ns']:8.0f} ns")
    print(f"kvprof hook          : {h['hook_ns']:8.0f} ns  (+{h['hook_added_ns']:.0f} ns per hook;"
          f" goal <= 2000 ns)")
    print(f"naive OTel span      : {h['naive_otel_span_ns']:8.0f} ns")
    print(f"ratio hook/bare      : {h['hook_ns'] / h['bare_ns']:8.1f}x")
    print(f"ratio naive-span/hook: {h['naive_otel_span_ns'] / h['hook_ns']:8.1f}x")
    if args.hooks_only:
        return
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("engine tokens/s: skipped (vLLM not installed)")
        return
    sys.path.insert(0, str(REPO / "demo"))
    from tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="kvprof-bench-") as tmp:
        model = build_tiny_model(Path(tmp) / "tiny")
        on, off = [], []
        for i in range(args.rounds):
            for probes in ((False, True) if i % 2 == 0 else (True, False)):
                tps = engine_tokens_per_s(model, probes, args.max_tokens, Path(tmp))
                (on if probes else off).append(tps)
                print(f"engine run probes={'on ' if probes else 'off'}: {tps:8.1f} tokens/s")
        mon, moff = statistics.median(on), statistics.median(off)
        print(f"tokens/s median off {moff:.1f}, on {mon:.1f}; ratio on/off {mon / moff:.4f} "
              f"({(1 - mon / moff) * 100:+.2f}% lost; goal <= 1%)")


if __name__ == "__main__":
    main()
