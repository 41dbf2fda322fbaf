"""Load + breakdown of 1,000,000+ spans (100,000 requests): prints spans/s and peak RSS.

Goal (issue 24): <= 5 s and <= 2 GB on the 2-core dev machine, about 1.7x the time pyarrow
alone takes to parse the same files. The scenario is written first (not timed); a fresh
child process then parses the files with pyarrow alone (the yardstick, measured in the same
run so the ratio holds on a loaded machine) and loads and breaks them down, so its peak RSS
is the analysis alone. It also prints the breakdown's Python calls per extra request (two
small scenarios, kvprof.analysis.workcount): ~0 when vectorised, >= 1 per per-row loop.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(traces: Path, aiperf: Path) -> dict:
    from kvprof.analysis.breakdown import build_breakdown
    from kvprof.analysis.loaders.aiperf import load_aiperf_records
    from kvprof.analysis.loaders.traces import load_spans

    yard_s, yard_cpu_s = yardstick(traces)
    t0, c0 = time.perf_counter(), time.process_time()
    load = load_spans(traces)
    t1, c1 = time.perf_counter(), time.process_time()
    records = load_aiperf_records(aiperf)
    bd = build_breakdown(load.spans, records)
    t2, c2 = time.perf_counter(), time.process_time()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"spans": int(len(load.spans)), "requests": int(len(bd.requests)),
            "load_s": t1 - t0, "breakdown_s": t2 - t1, "total_s": t2 - t0, "cpu_s": c2 - c0,
            "load_cpu_s": c1 - c0, "breakdown_cpu_s": c2 - c1,
            "yardstick_s": yard_s, "yardstick_cpu_s": yard_cpu_s,
            "peak_rss_mb": peak_kib / 1024, "joined_by_id": int(
                (bd.requests["ttft_source"] == "aiperf request id").sum())}


def yardstick(traces: Path) -> tuple[float, float]:
    """Wall and CPU seconds pyarrow alone takes to parse the trace files (same threads as
    the loader): the floor the analysis is measured against."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.json as pj

    from kvprof.analysis.loaders.otlp_arrow import _BLOCKS
    from kvprof.analysis.loaders.traces import trace_files

    paths = trace_files(traces)
    t, c = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1)) as pool:
        rows = sum(pool.map(lambda p: pj.read_json(
            p, read_options=pj.ReadOptions(block_size=_BLOCKS[0])).num_rows, paths))
    assert rows > 0
    return time.perf_counter() - t, time.process_time() - c


def python_calls_per_request() -> float:
    """The breakdown's Python calls per extra request between 100 and 400 requests."""
    from kvprof.analysis.breakdown import build_breakdown
    from kvprof.analysis.loaders.aiperf import load_aiperf_records
    from kvprof.analysis.loaders.traces import load_spans
    from kvprof.analysis.scenario import ScenarioSpec, write_scenario
    from kvprof.analysis.workcount import calls_per_request, count_calls

    sizes = []
    for n in (100, 400):
        with tempfile.TemporaryDirectory(prefix="kvprof-slope-") as tmp:
            write_scenario(tmp, ScenarioSpec(requests=n, spacing_ms=10.0, jitter_ms=50.0,
                                             broken_traceparent=2), samples=False)
            spans = load_spans(Path(tmp, "traces")).spans
            records = load_aiperf_records(Path(tmp, "aiperf"))
        build_breakdown(spans, records)  # imports and caches warm, not counted
        sizes.append((n, count_calls(lambda s=spans, r=records: build_breakdown(s, r))[0]))
    return calls_per_request(*sizes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--keep", type=Path, help="write (or reuse) the scenario in this folder")
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure / "traces", args.measure / "aiperf")))
        return 0
    from kvprof.analysis.scenario import ScenarioSpec, write_scenario

    with tempfile.TemporaryDirectory(prefix="kvprof-scale-") as tmp:
        t = time.perf_counter()
        spec = ScenarioSpec(requests=args.requests, spacing_ms=10.0, jitter_ms=50.0,
                            broken_traceparent=100)
        write_scenario(args.keep or tmp, spec, samples=False) if not (
            args.keep and (args.keep / "traces").exists()) else None
        tmp = str(args.keep or tmp)
        gen_s = time.perf_counter() - t
        size_mb = sum(p.stat().st_size for p in Path(tmp, "traces").iterdir()) / 1e6
        out = subprocess.run([sys.executable, __file__, "--measure", tmp], check=True,
                             capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"scenario: {args.requests:,} requests, {size_mb:,.0f} MB of OTLP JSON lines "
          f"(written in {gen_s:.1f} s, not timed)")
    print(f"spans: {r['spans']:,}  requests: {r['requests']:,}  joined to aiperf by id: "
          f"{r['joined_by_id']:,}")
    print(f"load: {r['load_s']:.2f} s  breakdown: {r['breakdown_s']:.2f} s  "
          f"total: {r['total_s']:.2f} s")
    print(f"CPU time (all threads): {r['cpu_s']:.2f} s (load {r['load_cpu_s']:.2f} s, "
          f"breakdown {r['breakdown_cpu_s']:.2f} s); load average now: "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (wall time grows when shared)")
    print(f"spans/s (load + breakdown): {r['spans'] / r['total_s']:,.0f}")
    print(f"peak RSS: {r['peak_rss_mb']:,.0f} MB")
    print(f"yardstick (pyarrow alone parses the same files): {r['yardstick_s']:.2f} s, "
          f"{r['yardstick_cpu_s']:.2f} CPU-s; analysis / yardstick: wall "
          f"{r['total_s'] / r['yardstick_s']:.2f} x, CPU {r['cpu_s'] / r['yardstick_cpu_s']:.2f} x "
          "(goal: about 1.7 x)")
    print(f"breakdown's share of the analysis: {r['breakdown_cpu_s'] / r['cpu_s']:.0%} of "
          f"CPU-s; Python calls per extra request: {python_calls_per_request():.2f} "
          "(vectorised: ~0; the test's bound: 0.5)")
    print(f"vs goal: time {r['total_s'] / 5.0:.2f} x of 5 s, "
          f"memory {r['peak_rss_mb'] / 2048:.2f} x of 2 GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
