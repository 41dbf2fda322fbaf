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

    import torch

    from kvprof.microbench.engine import make_engine
    from kvprof.microbench.layout import build_layout
    from kvprof.microbench.paged import SourcePattern
    from kvprof.microbench.runner import resolve_device
    from kvprof.microbench.sides import DecodeSide, PrefillSide
    from kvprof.model import resolve_geometry

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = resolve_device(args.device)
    geometry = resolve_geometry(args.tokens, args.model, kv_dtype=args.kv_dtype)
    layout = build_layout(geometry, args.prefill_tp, args.decode_tp)
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
    for i in range(args.warmup + args.iters):
        g = timed(prefill.gather)
        r = timed(lambda: engine.run(raw_jobs))  # staging -> receive buffer: same bytes
        s = timed(decode.scatter)
        if i >= args.warmup:
            gather.append(g)
            scatter.append(s)
            raw.append(r)
    decode.verify("scatter", args.iters - 1)  # the numbers count only if the bytes arrived
    engine.close()

    nbytes = layout.bytes_moved
    med = {k: statistics.median(v) for k, v in (("gather", gather), ("scatter", scatter),
                                                ("raw", raw))}
    ratio = 2 * med["raw"] / (med["gather"] + med["scatter"])
    goal = 0.85 if device.startswith("cuda") else 0.70
    print(f"microbench_efficiency: {geometry.model.name} {geometry.kv_dtype}, "
          f"{geometry.tokens} tokens, TP{args.prefill_tp}->TP{args.decode_tp}, "
          f"{nbytes:,} B in {layout.descriptors_total:,} descriptors of {layout.unit_bytes:,} B")
    print(f"device {device}, {threads} threads, {args.iters} interleaved runs (medians)")
    for k in ("gather", "scatter", "raw"):
        print(f"  {k:8s} {med[k] * 1e3:9.2f} ms  {nbytes / med[k] / 1e9:7.2f} GB/s")
    print(f"ratio paged gather+scatter / raw contiguous copy: {ratio:.2f} "
          f"(goal >= {goal:.2f}: {'met' if ratio >= goal else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
