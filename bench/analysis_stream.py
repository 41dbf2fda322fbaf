"""Streamed load + breakdown of 10,000,000+ spans (1M requests): wall, CPU-s, peak RSS.

Goal (issue 24): <= 60 s and <= 4 GB on the 2-core dev machine, by way of
kvprof.analysis.stream (`kvprof report --stream`). The scenario (4.2 GB of OTLP JSON lines;
writing it takes ~10 minutes: keep it with --keep) is written first, not timed. Two fresh
child processes then measure, side by side in one run: pyarrow alone parsing the same files
in the same chunks on as many threads (the yardstick), and the streamed analysis (aiperf
records read, spans sharded, broken down, skew pooled), so the ratio holds on a shared
machine. `bench/analysis_scale.py --stream-requests N` runs this after the in-memory bench.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _tree_pss_mb() -> float:
    """Memory of this process plus its children (the streamed path's forked workers), as
    PSS: pages a fork shares with its parent count once, not once per process as RSS
    counts them."""
    me = os.getpid()
    total_kb = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            if int(d.name) != me and int(stat.rsplit(")", 1)[1].split()[1]) != me:
                continue
            for line in (d / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total_kb / 1024


def measure(root: Path, shards: int | None) -> dict:
    """The streamed breakdown of a scenario folder (aiperf records read as the report does)."""
    import threading

    from kvprof.analysis.loaders.aiperf import load_aiperf_records
    from kvprof.analysis.stream import stream_breakdown

    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            peak[0] = max(peak[0], _tree_pss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0, c0 = time.perf_counter(), time.process_time()
    # As `kvprof report --stream` does: the aiperf records load beside the trace reading.
    r = stream_breakdown(root / "traces", lambda: load_aiperf_records(root / "aiperf"),
                         shards=shards)
    t1, c1 = time.perf_counter(), time.process_time()
    done.set()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"spans": r.spans, "requests": int(len(r.breakdown.requests)), "shards": r.shards,
            "total_s": t1 - t0, "cpu_s": c1 - c0 + children.ru_utime + children.ru_stime,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tree_peak_rss_mb": peak[0], "child_peak_rss_mb": children.ru_maxrss / 1024,
            "joined_by_id": int((r.breakdown.requests["ttft_source"]
                                 == "aiperf request id").sum())}


def yardstick(traces: Path) -> dict:
    """pyarrow alone parsing the trace files in the streamed path's chunks, on as many
    threads, nothing kept: the floor the streamed analysis is measured against."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa
    import pyarrow.json as pj

    from kvprof.analysis.loaders.traces import trace_files
    from kvprof.analysis.stream import CHUNK_BYTES, _chunk_ranges

    jobs = [(p, off, n) for p in trace_files(traces) for off, n in _chunk_ranges(p, CHUNK_BYTES)]

    def one(job) -> int:
        path, off, n = job
        with open(path, "rb") as fh:
            fh.seek(off)
            data = fh.read(n)
        return pj.read_json(pa.BufferReader(data), read_options=pj.ReadOptions(
            block_size=len(data) + 1)).num_rows

    t, c = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        rows = sum(pool.map(one, jobs))
    assert rows > 0
    return {"yardstick_s": time.perf_counter() - t, "yardstick_cpu_s": time.process_time() - c}


def run(requests: int, keep: Path | None = None, shards: int | None = None) -> None:
    """Write (or reuse) the scenario, measure both children, print the figures."""
    from kvprof.analysis.scenario import ScenarioSpec, write_scenario

    root = keep or Path(tempfile.mkdtemp(prefix="kvprof-stream-bench-"))
    try:
        t = time.perf_counter()
        if not (root / "traces").exists() or not (root / "aiperf").exists():
            write_scenario(root, ScenarioSpec(requests=requests, spacing_ms=10.0,
                                              jitter_ms=50.0, broken_traceparent=1000),
                           samples=False)
        gen_s = time.perf_counter() - t
        size_gb = sum(p.stat().st_size for p in (root / "traces").iterdir()) / 1e9

        def child(flag: str) -> dict:
            cmd = [sys.executable, __file__, flag, str(root)]
            cmd += ["--shards", str(shards)] if shards else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            return json.loads(out.stdout.strip().splitlines()[-1])

        y = child("--yardstick")
        r = child("--measure")
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"streamed scenario: {r['requests']:,} requests, {size_gb:,.2f} GB of OTLP JSON "
          f"lines (written in {gen_s:.1f} s, not timed)")
    print(f"spans: {r['spans']:,}  requests: {r['requests']:,} in {r['shards']} shards; "
          f"joined to aiperf by id: {r['joined_by_id']:,}")
    print(f"streamed load + breakdown: {r['total_s']:.1f} s wall, {r['cpu_s']:.1f} CPU-s "
          f"(worker processes included); load average now: {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores (wall time grows when shared)")
    print(f"peak memory: {r['tree_peak_rss_mb']:,.0f} MB, this process and its workers "
          f"together (PSS, sampled every 0.25 s); peak RSS of the main process alone "
          f"{r['peak_rss_mb']:,.0f} MB, of the largest worker {r['child_peak_rss_mb']:,.0f} MB "
          "(RSS counts the pages a fork shares with its parent in both)")
    print(f"yardstick (pyarrow alone parses the same chunks): {y['yardstick_s']:.1f} s, "
          f"{y['yardstick_cpu_s']:.1f} CPU-s; streamed / yardstick: wall "
          f"{r['total_s'] / y['yardstick_s']:.2f} x, CPU {r['cpu_s'] / y['yardstick_cpu_s']:.2f} x")
    print(f"vs goal: time {r['total_s'] / 60.0:.2f} x of 60 s, "
          f"memory {r['tree_peak_rss_mb'] / 4096:.2f} x of 4 GB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--keep", type=Path, help="write (or reuse) the scenario in this folder")
    ap.add_argument("--shards", type=int, default=None,
                    help="shards of requests [default: one per 128 MB of trace files]")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--yardstick", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.shards)))
    elif args.yardstick:
        print(json.dumps(yardstick(args.yardstick / "traces")))
    else:
        run(args.requests, args.keep, args.shards)
    return 0


if __name__ == "__main__":
    sys.exit(main())
