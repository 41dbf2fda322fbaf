"""Load + breakdown of 1,000,000+ spans (100,000 requests): prints spans/s and peak RSS.

Goal (issue 24): <= 5 s and <= 2 GB on the 2-core dev machine, about 1.7x the time pyarrow
alone takes to parse the same files. The scenario is written first (not timed); a fresh
child process then parses the files with pyarrow alone (the yardstick, measured in the same
run so the ratio holds on a loaded machine) and loads and breaks them down, so its peak RSS
is the analysis alone. It also prints the breakdown's Python calls per extra request (two
small scenarios, kvprof.analysis.workcount): ~0 when vectorised, >= 1 per per-row loop.
Then (issue 24 item 4) the same files read by chDB (--engine chdb) side by side, and with
--clickhouse from the collector's otel_traces table over clickhouse:// (a chDB-backed server
on 127.0.0.1); each checks its request table equals the pandas path's.
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


def measure_chdb(traces: Path, aiperf: Path, table_out: Path) -> dict:
    """The same load + breakdown with chDB reading the files (--engine chdb, issue 24 item 4);
    the request table goes to ``table_out`` so the parent checks it equals the pandas one."""
    from kvprof.analysis.breakdown import build_breakdown
    from kvprof.analysis.clickhouse.load import load_files_chdb
    from kvprof.analysis.loaders.aiperf import load_aiperf_records

    t0, c0 = time.perf_counter(), time.process_time()
    load = load_files_chdb(traces)
    t1, c1 = time.perf_counter(), time.process_time()
    bd = build_breakdown(load.spans, load_aiperf_records(aiperf))
    t2, c2 = time.perf_counter(), time.process_time()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bd.requests.to_pickle(table_out)
    return {"spans": int(len(load.spans)), "load_s": t1 - t0, "breakdown_s": t2 - t1,
            "total_s": t2 - t0, "cpu_s": c2 - c0, "load_cpu_s": c1 - c0,
            "peak_rss_mb": peak_kib / 1024,
            "skew": bd.skew.to_dict(), "notes": bd.notes, "propagation": bd.propagation}


def measure_clickhouse(url: str, aiperf: Path, table_out: Path) -> dict:
    """The load + breakdown from the collector's otel_traces table (clickhouse://)."""
    from kvprof.analysis.breakdown import build_breakdown
    from kvprof.analysis.clickhouse.load import load_trace_source
    from kvprof.analysis.loaders.aiperf import load_aiperf_records

    t0, c0 = time.perf_counter(), time.process_time()
    load = load_trace_source(url, lookback="1d")
    t1, c1 = time.perf_counter(), time.process_time()
    bd = build_breakdown(load.spans, load_aiperf_records(aiperf))
    t2, c2 = time.perf_counter(), time.process_time()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bd.requests.to_pickle(table_out)
    return {"spans": int(len(load.spans)), "load_s": t1 - t0, "breakdown_s": t2 - t1,
            "total_s": t2 - t0, "cpu_s": c2 - c0, "load_cpu_s": c1 - c0,
            "peak_rss_mb": peak_kib / 1024}


def clickhouse_side_by_side(tmp: str) -> None:
    """--clickhouse: the scenario in the exporter's table behind ClickHouse's HTTP interface
    on 127.0.0.1 (tests/clickhouse_server.py: chDB as the server, only the cluster faked),
    read by `--traces clickhouse://`; its request table against the pandas one."""
    import pandas as pd

    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "tests" /
                             "clickhouse_server.py"), "--traces", str(Path(tmp, "traces")),
         "--sql-insert"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        t = time.perf_counter()
        port = server.stdout.readline().split()[1]
        print(f"clickhouse://: scenario inserted into otel_traces in {time.perf_counter() - t:.0f}"
              " s (not timed)")
        a, b = Path(tmp, "pandas-requests.pkl"), Path(tmp, "ch-requests.pkl")
        outs = []
        for argv in (["--measure-clickhouse", f"clickhouse://127.0.0.1:{port}/otel",
                      "--pandas-table", tmp, "--table-out", str(b)],
                     ["--pandas-table", tmp, "--table-out", str(a)]):
            out = subprocess.run([sys.executable, __file__, *argv], check=True,
                                 capture_output=True, text=True)
            outs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        server.stdin.close()
        server.wait(timeout=60)
        server.stdout.close()
    c = outs[0]
    try:
        pd.testing.assert_frame_equal(pd.read_pickle(a), pd.read_pickle(b), check_exact=True)
        same = "yes"
    except AssertionError as exc:
        same = f"NO ({str(exc)[:300]})"
    for f in (a, b):
        f.unlink(missing_ok=True)
    print(f"clickhouse:// (server on this machine): load {c['load_s']:.2f} s, breakdown "
          f"{c['breakdown_s']:.2f} s, total {c['total_s']:.2f} s, {c['cpu_s']:.2f} CPU-s in "
          f"kvprof's process, peak RSS {c['peak_rss_mb']:,.0f} MB; request table equals the "
          f"pandas path's: {same}")


def _pandas_table(traces: Path, aiperf: Path, table_out: Path) -> dict:
    """The pandas path's request table (and skew, notes, hops), for the equality check."""
    from kvprof.analysis.breakdown import build_breakdown
    from kvprof.analysis.loaders.aiperf import load_aiperf_records
    from kvprof.analysis.loaders.traces import load_spans

    bd = build_breakdown(load_spans(traces).spans, load_aiperf_records(aiperf))
    bd.requests.to_pickle(table_out)
    return {"skew": bd.skew.to_dict(), "notes": bd.notes, "propagation": bd.propagation}


def chdb_side_by_side(tmp: str, r: dict) -> None:
    """chDB (in a fresh process) beside the pandas figures of this run, and whether both
    give the identical request table."""
    import pandas as pd

    try:
        import chdb  # noqa: F401
    except ImportError:
        print("chDB: not installed (pip install 'kvprof[sql]'): no side-by-side figures")
        return
    a, b = Path(tmp, "pandas-requests.pkl"), Path(tmp, "chdb-requests.pkl")
    outs = []
    for flag, path in (("--measure-chdb", b), ("--pandas-table", a)):
        out = subprocess.run([sys.executable, __file__, flag, tmp, "--table-out", str(path)],
                             check=True, capture_output=True, text=True)
        outs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    c, p = outs
    same = (p["skew"] == c["skew"] and p["notes"] == c["notes"]
            and p["propagation"] == c["propagation"])
    try:
        pd.testing.assert_frame_equal(pd.read_pickle(a), pd.read_pickle(b), check_exact=True)
    except AssertionError as exc:
        same = False
        print(f"chDB request table differs: {str(exc)[:300]}")
    for f in (a, b):
        f.unlink(missing_ok=True)
    print("                 pandas      chDB   (same run, same files)")
    print(f"load          {r['load_s']:7.2f} s {c['load_s']:7.2f} s")
    print(f"breakdown     {r['breakdown_s']:7.2f} s {c['breakdown_s']:7.2f} s")
    print(f"total         {r['total_s']:7.2f} s {c['total_s']:7.2f} s")
    print(f"CPU-s         {r['cpu_s']:7.2f}   {c['cpu_s']:7.2f}   (load {r['load_cpu_s']:.2f} vs "
          f"{c['load_cpu_s']:.2f})")
    print(f"peak RSS      {r['peak_rss_mb']:7,.0f} MB {c['peak_rss_mb']:6,.0f} MB")
    print(f"chDB's request table, skew, notes and hops equal the pandas path's: "
          f"{'yes' if same else 'NO'}")


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
    ap.add_argument("--no-chdb", action="store_true",
                    help="skip the chDB column (--engine chdb on the same files)")
    ap.add_argument("--clickhouse", action="store_true",
                    help="also read the scenario from the collector's otel_traces table "
                    "over clickhouse:// (a chDB-backed server on 127.0.0.1; insert not timed)")
    ap.add_argument("--measure-clickhouse", help=argparse.SUPPRESS)
    ap.add_argument("--measure-chdb", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--pandas-table", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--table-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--stream-requests", type=int, default=0,
                    help="then the streamed path on this many requests (bench/analysis_stream.py;"
                    " 1000000 = 12M spans, ~10 min to write; keep them with --keep-stream)")
    ap.add_argument("--keep-stream", type=Path, help="write (or reuse) that scenario here")
    args = ap.parse_args()
    if args.measure_chdb:
        print(json.dumps(measure_chdb(args.measure_chdb / "traces", args.measure_chdb / "aiperf",
                                      args.table_out)))
        return 0
    if args.measure_clickhouse:
        print(json.dumps(measure_clickhouse(args.measure_clickhouse, args.pandas_table / "aiperf",
                                            args.table_out)))
        return 0
    if args.pandas_table:
        print(json.dumps(_pandas_table(args.pandas_table / "traces", args.pandas_table / "aiperf",
                                       args.table_out)))
        return 0
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
        if not args.no_chdb:
            chdb_side_by_side(tmp, r)
        if args.clickhouse:
            clickhouse_side_by_side(tmp)
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
    if args.stream_requests:
        sys.path.insert(0, str(Path(__file__).parent))
        import analysis_stream

        analysis_stream.run(args.stream_requests, args.keep_stream)
    return 0


if __name__ == "__main__":
    sys.exit(main())
