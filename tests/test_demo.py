"""`make demo` end to end: quick mode on a recorded full run, and (marked) the full run itself."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from proctools import IsolatedRun

REPO = Path(__file__).resolve().parents[1]
RECORDED_RUN = REPO / "tests" / "fixtures" / "demo" / "run"
AIPERF = REPO / ".venv-aiperf" / "bin" / "aiperf"


def run_demo(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """The demo through its real entry point, as `make demo` runs it: in a session of its
    own, its whole tree killed on timeout or interrupt, and nothing of it left after."""
    env = dict(os.environ, COLUMNS="120", KVPROF_DEMO_LOG="WARNING")
    run = IsolatedRun([sys.executable, str(REPO / "demo" / "run_demo.py"), *args], env=env,
                      cwd=REPO)
    done = run.wait(timeout)
    assert not run.leftovers, f"the demo left processes running: {run.leftovers}"
    return done


def expected_headline(report: dict) -> tuple[float, float, float]:
    """The three numbers, recomputed here from report.json's per-request rows."""
    rows = report["requests"]
    first = [r["kv.handshake"] / r["ttft_ms"] for r in rows
             if r["first_contact"] and r.get("kv.handshake") is not None and r.get("ttft_ms")]
    steady = [r["kv.transfer"] / r["ttft_ms"] for r in rows
              if not r["first_contact"] and not r["warmup"] and r.get("kv.transfer") is not None
              and r.get("ttft_ms")]
    return (100 * statistics.median(first), 100 * statistics.median(steady),
            report["summary"]["unaccounted_mean_ms"])


def assert_headline_printed(stdout: str, report_json: Path) -> None:
    first, steady, unaccounted = expected_headline(json.loads(report_json.read_text()))
    lines = {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip()
             for ln in stdout.splitlines() if ":" in ln}
    assert lines["First-request handshake share"].startswith(f"{first:.1f}% of TTFT")
    assert lines["Steady-state transfer share"].startswith(f"{steady:.1f}% of TTFT")
    assert lines["Unaccounted time"].startswith(f"{round(unaccounted, 1) or 0.0:.1f} ms")


def join_rate(traces: Path) -> float:
    """Share of the requests Dynamo's frontend served whose one trace holds http-request, two
    router.route_request, both workers' handle_payload and kvprof's kv.transfer."""
    from kvprof import semconv as sc
    from kvprof.analysis.loaders.traces import load_spans

    spans = load_spans(traces).spans
    by_trace = spans.groupby(spans["trace_id"].astype(str))["name"].agg(
        lambda s: s.astype(str).value_counts().to_dict())
    served = [c for c in by_trace if c.get(sc.DYNAMO_HTTP_REQUEST)]
    whole = [c for c in served if c.get(sc.DYNAMO_ROUTE, 0) >= 2
             and c.get(sc.DYNAMO_HANDLE, 0) >= 2 and c.get(sc.SPAN_KV_TRANSFER, 0) >= 1]
    assert served, "no request of Dynamo's frontend was traced"
    return len(whole) / len(served)


def assert_analysis_outputs(out: Path) -> None:
    for name in ("report.html", "report.md", "report.json", "audit.md", "microbench.json"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["requests"] > 0
    assert any(r["first_contact"] for r in report["requests"])
    assert report["capacity"]["levels"], "no capacity figures"
    assert "<html" in (out / "report.html").read_text().lower()
    assert list((out / "compare").iterdir()), "compare wrote nothing"
    assert "qwen3-32b" in (out / "microbench.json").read_text().lower()
    # The report compares traced transfers with this run's own KV geometry, not the seed's.
    tiny = json.loads((out / "microbench-tiny.json").read_text())
    assert tiny["geometry"]["bytes_per_token"] == 2 * 2 * 1 * 32 * 2  # K+V, layers, heads, dim
    assert report["should_cost"]["source"].endswith("microbench-tiny.json")


def test_quick_mode_without_a_previous_run_says_so(tmp_path: Path) -> None:
    done = run_demo(["--mode", "quick", "--out", str(tmp_path / "none")], timeout=120)
    assert done.returncode == 3, done.stderr
    assert "Error: no previous full demo run" in done.stderr
    assert "Hint: Run the full demo once first" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "none").exists(), "quick mode must not create the output folder"


def test_bad_concurrency_is_a_usage_error(tmp_path: Path) -> None:
    done = run_demo(["--concurrency", "one,two", "--out", str(tmp_path)], timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("\nError: --concurrency 'one,two' is not a list of integers")
    assert "Hint:" in done.stderr


def test_quick_mode_end_to_end_on_a_recorded_full_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(RECORDED_RUN, out)
    (out / "microbench.json").unlink(missing_ok=True)
    done = run_demo(["--mode", "quick", "--out", str(out), "--microbench-iters", "1",
                     "--microbench-warmup", "0"], timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[5/5] kvprof audit" in done.stdout
    assert_analysis_outputs(out)
    assert_headline_printed(done.stdout, out / "report.json")
    for name in ("report.html", "report.md", "report.json", "audit.md", "compare/"):
        assert f"{out / name.rstrip('/')}" in done.stdout


@pytest.mark.demo
@pytest.mark.timeout(1800)  # three engine starts; on a shared 2-core machine past make's 900 s
@pytest.mark.skipif(not AIPERF.exists(), reason="aiperf venv missing: make .venv-aiperf/.installed")
def test_full_demo_smallest_load(tmp_path: Path) -> None:
    """Every step of the full run, at two concurrency levels with a handful of requests."""
    out = tmp_path / "out"
    done = run_demo(["--out", str(out), "--concurrency", "1,2", "--requests", "3",
                     "--input-tokens", "256", "--output-tokens", "8",
                     "--microbench-iters", "1", "--microbench-warmup", "0",
                     "--wait-idle", "600"], timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    for step in ("Set-up check", "Tiny model", "Microbench", "Collector in the background",
                 "Aggregated deployment", "Disaggregated deployment", "Collector stopped",
                 "kvprof report", "kvprof compare", "kvprof audit"):
        assert step in done.stdout, step
    for dep in ("agg", "disagg"):
        for conc in (1, 2):
            summary = json.loads((out / "aiperf" / dep / f"c{conc}" /
                                  "profile_export_aiperf.json").read_text())
            assert summary["request_count"]["avg"] >= 3
        assert any(p.is_file() for p in (out / "traces" / dep).rglob("*"))
    assert list((out / "samples").glob("**/*.parquet"))
    assert_analysis_outputs(out)
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["pairs"] >= 1
    assert_headline_printed(done.stdout, out / "report.json")
    # The seed's stack: every disaggregated request is one trace from Dynamo's frontend
    # through its router and both workers to kvprof's KV transfer.
    assert join_rate(out / "traces" / "disagg") == 1.0
    # Legs + unaccounted = the client's TTFT, per request, within 1 ms.
    for row in report["requests"]:
        assert abs(sum(row["legs_ms"].values()) + row["unaccounted_ms"]
                   - row["ttft_ms"]) < 1.0
    # Capacity per level and engine, from the engines' own step records; the demo hands the
    # report both engines' logs, so the KV pool (demo/limits.py) is known and occupancy real.
    from demo.limits import KV_BLOCKS, MAX_NUM_SEQS

    capacity = report["capacity"]
    assert [lv["concurrency"] for lv in capacity["levels"]] == ["1", "2"]
    for lv in capacity["levels"]:
        assert sorted(e["role"] for e in lv["engines"]) == ["decode", "prefill"]
        for e in lv["engines"]:
            assert e["kv_blocks_total"] == KV_BLOCKS
            assert 0 < e["busy_fraction"] <= 1 and 0 < e["kv_occupancy_peak"] <= 1
            assert e["max_running"] <= MAX_NUM_SEQS
            assert e["preemptions"] is not None, "no engine step records"
    # Quick mode then works on what the full run left.
    quick = run_demo(["--mode", "quick", "--out", str(out), "--microbench-iters", "1",
                      "--microbench-warmup", "0"], timeout=600)
    assert quick.returncode == 0, quick.stderr[-3000:]
