"""Paged KV gather+scatter throughput against a raw contiguous copy of the same bytes, same run.

Each of gather (paged blocks -> staging) and scatter (staging -> paged blocks at other ids)
copies the request's bytes once, so the ratio printed is

    (2 x median raw copy time) / (median gather time + median scatter time)

with the three measured interleaved, run after run, so machine load hits all of them alike.
Goal: >= 0.70 on the CPU (>= 0.85 on a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def measure_efficiency(tokens: int = 4000, model: str = "qwen3-32b", kv_dtype: str = "fp8",
                       prefill_tp: int = 1, decode_tp: int = 2, iters: int = 15, warmup: int = 2,
                       device: str = "auto", threads: int = 0) -> dict:
    """Paged gather and scatter against a raw copy of the same bytes, interleaved; bytes verified.

    Returns medians in seconds, GB/s, the ratio and its goal (also used by bench/gpu_check.py).
    """
    import torch

    from kvprof.microbench.engine import make_engine
    from kvprof.microbench.layout import build_layout
    from kvprof.microbench.paged import SourcePattern
    from kvprof.microbench.runner import resolve_device
    from kvprof.microbench.sides import DecodeSide, PrefillSide
    from kvprof.model import resolve_geometry

    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    device = resolve_device(device)
    geometry = resolve_geometry(tokens, model, kv_dtype=kv_dtype)
    layout = build_layout(geometry, prefill_tp, decode_tp)
    engine = make_engine(device, threads)
    pattern = SourcePattern(layout)
    prefill = PrefillSide(layout, engine, device, pattern)
    decode = DecodeSide(layout, engine, device, pattern)
    prefill.build_descriptors()
    decode.build_descriptors()
    raw_jobs = [
        job
        for src, dst in zip(prefill.staging, decode.recv, strict=True)
        for job in engine.copy_jobs(dst.view(-1), src.view(-1))
    ]

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        engine.sync()
        return time.perf_counter() - t0

    gather, scatter, raw = [], [], []
    try:
        for i in range(warmup + iters):
            g = timed(prefill.gather)
            r = timed(lambda: engine.run(raw_jobs))  # staging -> receive buffer: same bytes
            s = timed(decode.scatter)
            if i >= warmup:
                gather.append(g)
                scatter.append(s)
                raw.append(r)
        decode.verify("scatter", iters - 1)  # the numbers count only if the bytes arrived
    finally:
        engine.close()

    nbytes = layout.bytes_moved
    med = {k: statistics.median(v) for k, v in (("gather", gather), ("scatter", scatter),
                                                ("raw", raw))}
    return {
        "model": geometry.model.name, "kv_dtype": geometry.kv_dtype, "tokens": geometry.tokens,
        "prefill_tp": prefill_tp, "decode_tp": decode_tp, "bytes": nbytes,
        "descriptors": layout.descriptors_total, "descriptor_bytes": layout.unit_bytes,
        "device": device, "threads": threads, "iters": iters, "bytes_verified": True,
        "median_s": med,
        "gbps": {k: nbytes / v / 1e9 for k, v in med.items()},
        "ratio": 2 * med["raw"] / (med["gather"] + med["scatter"]),
        "goal": 0.85 if device.startswith("cuda") else 0.70,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--model", default="qwen3-32b")
    ap.add_argument("--kv-dtype", default="fp8")
    ap.add_argument("--prefill-tp", type=int, default=1)
    ap.add_argument("--decode-tp", type=int, default=2)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="0: torch's default")
    args = ap.parse_args(argv)
    r = measure_efficiency(args.tokens, args.model, args.kv_dtype, args.prefill_tp,
                           args.decode_tp, args.iters, args.warmup, args.device, args.threads)
    print(f"microbench_efficiency: {r['model']} {r['kv_dtype']}, "
          f"{r['tokens']} tokens, TP{r['prefill_tp']}->TP{r['decode_tp']}, "
          f"{r['bytes']:,} B in {r['descriptors']:,} descriptors of {r['descriptor_bytes']:,} B")
    print(f"device {r['device']}, {r['threads']} threads, {r['iters']} interleaved runs (medians)")
    for k in ("gather", "scatter", "raw"):
        print(f"  {k:8s} {r['median_s'][k] * 1e3:9.2f} ms  {r['gbps'][k]:7.2f} GB/s")
    print(f"ratio paged gather+scatter / raw contiguous copy: {r['ratio']:.2f} "
          f"(goal >= {r['goal']:.2f}: {'met' if r['ratio'] >= r['goal'] else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
