"""Capacity per concurrency level and engine (kvprof/analysis/capacity.py): the interval sums it
rests on, its figures on the recorded demo run checked against a plain recount of the spans,
the verdict's choice of resource, and the report's ``capacity`` section."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_kvprof

from kvprof import semconv as sc
from kvprof.analysis import capacity as cap

RUN = Path(__file__).resolve().parents[1] / "fixtures" / "demo" / "run"


def test_union_and_step_function_by_hand() -> None:
    starts = np.array([0.0, 5.0, 8.0, np.nan])
    ends = np.array([10.0, 7.0, 20.0, 3.0])
    # [0, 10) and [8, 20) overlap, [5, 7) lies inside; the NaN interval counts for nothing.
    assert cap.union_ns(starts, ends, 0.0, 30.0) == 20.0
    assert cap.union_ns(starts, ends, 12.0, 16.0) == 4.0
    times, values = cap.step_function(starts, ends, 0.0, 30.0)
    # 1 on [0,5), 2 on [5,7), 1 on [7,8), 2 on [8,10), 1 on [10,20), 0 after.
    assert cap.time_mean(times, values, 30.0) == pytest.approx((5 + 4 + 1 + 4 + 10) / 30)
    assert values.max() == 2
    weighted = cap.step_function(starts, ends, 0.0, 30.0, np.array([16, 1, 4, 99]))
    assert weighted[1].max() == 20  # 16 + 4 blocks on [8, 10)


@pytest.fixture(scope="module")
def recorded():
    from kvprof.analysis.breakdown import build_breakdown
    from kvprof.analysis.loaders.aiperf import load_aiperf_records
    from kvprof.analysis.loaders.traces import load_spans

    spans = load_spans(str(RUN / "traces" / "disagg")).spans
    bd = build_breakdown(spans, load_aiperf_records(RUN / "aiperf" / "disagg"), None, True)
    table = cap.capacity_table(spans, bd.requests, bd.skew.offsets_ns,
                               {sc.ROLE_PREFILL: 4096, sc.ROLE_DECODE: 4096}, 16.0, 32)
    return spans, bd, table


def test_recorded_run_has_every_level_and_engine(recorded) -> None:
    _, _, table = recorded
    assert [lv["concurrency"] for lv in table["levels"]] == ["1", "2", "4"]
    for lv in table["levels"]:
        roles = sorted(e["role"] for e in lv["engines"])
        assert roles == [sc.ROLE_DECODE, sc.ROLE_PREFILL]
        for e in lv["engines"]:
            assert 0 < e["busy_fraction"] <= 1
            assert e["preemptions"] is None  # spans do not show preemptions
            assert 0 < e["kv_occupancy"] <= e["kv_occupancy_peak"] <= 1
            # A request holds 16 blocks (512 tokens / 32): the peak is whole requests.
            assert e["kv_blocks_peak"] % 16 == 0
    assert table["source"] == "spans"


def test_mean_queue_is_the_queue_spans_time_over_the_window(recorded) -> None:
    """Little's law recount: mean queue length = summed queue time inside the window / window."""
    spans, bd, table = recorded
    conc = bd.requests.drop_duplicates("trace_id").set_index("trace_id")["concurrency"]
    for lv in table["levels"]:
        traces = {t for t, c in conc.items() if c == float(lv["concurrency"])}
        for e in lv["engines"]:
            name = sc.SPAN_PREFILL_QUEUE if e["role"] == sc.ROLE_PREFILL else sc.SPAN_DECODE_QUEUE
            q = spans[(spans["name"] == name) & (spans["service"] == e["engine"])
                      & spans["trace_id"].astype(str).isin(traces)]
            expected = float((q["end_ns"] - q["start_ns"]).sum()) / (lv["window_s"] * 1e9)
            assert e["mean_queue_length"] == pytest.approx(expected, abs=2e-3)


def test_prefill_blocks_held_for_the_decode_pull(recorded) -> None:
    spans, _, table = recorded
    holds = spans[spans["name"] == sc.SPAN_KV_HOLD]
    mean_ms = float((holds["end_ns"] - holds["start_ns"]).mean()) / 1e6
    per_level = [e for lv in table["levels"] for e in lv["engines"]
                 if e["role"] == sc.ROLE_PREFILL]
    assert all(e["kv_hold_blocks_peak"] >= 16 for e in per_level)
    # The per-level means weigh the same holds: their spread brackets the overall mean.
    means = [e["kv_hold_ms_mean"] for e in per_level]
    assert min(means) <= mean_ms <= max(means)


def _engine(**kw) -> dict:
    base = {"engine": "dynamo-prefill", "role": sc.ROLE_PREFILL, "busy_fraction": 0.5,
            "mean_queue_length": 0.0, "max_queue_length": 0, "max_running": 4,
            "kv_occupancy_peak": 1.0, "queued_kv_full_fraction": 0.0,
            "queued_at_slot_limit_fraction": 0.0, "kv_hold_blocks_mean": 40.0}
    return {**base, **kw}


def test_verdict_names_the_queue_and_the_resource() -> None:
    low = {"concurrency": "1", "engines": [_engine()]}
    kv = {"concurrency": "16", "engines": [_engine(mean_queue_length=6.0, max_queue_length=11,
                                                   queued_kv_full_fraction=0.6)]}
    text = cap.capacity_verdict([low, kv])
    assert "prefill engine's scheduler queue" in text and "KV blocks ran out" in text
    assert "stalled for blocks" in text
    slots = {"concurrency": "16", "engines": [_engine(
        role=sc.ROLE_DECODE, engine="dynamo-decode", mean_queue_length=9.0,
        queued_at_slot_limit_fraction=0.8)]}
    text = cap.capacity_verdict([low, slots])
    assert "decode engine's scheduler queue" in text and "Sequence slots ran out" in text
    assert "no scheduler queue formed" in cap.capacity_verdict([low, low])


def test_kv_pool_size_from_engine_logs(tmp_path: Path) -> None:
    (tmp_path / "dynamo-prefill.log").write_text(
        "INFO kv_cache_utils.py Overriding num_gpu_blocks=131072 with "
        "num_gpu_blocks_override=128\n")
    (tmp_path / "dynamo-decode.log").write_text("INFO GPU KV cache size: 4,096 tokens\n")
    (tmp_path / "other.log").write_text("nothing here\n")
    got = cap.kv_blocks_from_logs(sorted(tmp_path.iterdir()), 32)
    assert got == {sc.ROLE_PREFILL: 128, sc.ROLE_DECODE: 128}


def test_step_records_replace_span_estimates(recorded) -> None:
    """With step records, queue length, KV use and preemptions come from the engine itself."""
    spans, bd, _ = recorded
    rows = []
    prefill = spans[(spans["name"] == sc.SPAN_PREFILL_COMPUTE)].sort_values("start_ns")
    for i, (s, e) in enumerate(zip(prefill["start_ns"], prefill["end_ns"], strict=True)):
        rows.append({"engine": "p@h/1", "service": str(prefill["service"].iloc[0]),
                     "role": sc.ROLE_PREFILL, "start_ns": int(s), "end_ns": int(e),
                     "duration_ms": (e - s) / 1e6, "prefill_tokens": 512, "decode_seqs": 0,
                     "num_reqs": 1, "tokens": 512, "preempted": 1 if i == 3 else 0,
                     "waiting": 2, "running": 1, "kv_blocks_free": 100,
                     "kv_blocks_total": 128})
    steps = pd.DataFrame(rows)
    table = cap.capacity_table(spans, bd.requests, bd.skew.offsets_ns, {}, 16.0, 32, steps)
    engines = [e for lv in table["levels"] for e in lv["engines"]
               if e["role"] == sc.ROLE_PREFILL]
    assert {e["source"] for e in engines} == {"step records"}
    assert sum(e["preemptions"] for e in engines) == 1
    assert all(e["kv_blocks_total"] == 128 for e in engines)
    assert all(e["max_queue_length"] == 2 for e in engines)
    assert all(e["kv_occupancy_peak"] == pytest.approx(28 / 128, abs=1e-3) for e in engines)


def test_report_json_has_capacity(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    done = run_kvprof("report", "--traces", str(RUN / "traces" / "disagg"), "--aiperf",
                      str(RUN / "aiperf" / "disagg"), "--one-clock", "--format", "json",
                      "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    levels = report["capacity"]["levels"]
    assert [lv["concurrency"] for lv in levels] == ["1", "2", "4"]
    for lv in levels:
        for e in lv["engines"]:
            for key in ("busy_fraction", "mean_queue_length", "kv_occupancy", "preemptions"):
                assert key in e
    assert report["capacity"]["verdict"]


def test_step_counts_drop_to_zero_when_the_engine_pauses() -> None:
    """A step's running count holds until the next step only while the engine steps back to
    back; after a pause (no requests left) nothing runs."""
    steps = pd.DataFrame({"start_ns": [0.0, 10e6, 500e6], "end_ns": [9e6, 20e6, 510e6]})
    times, values = cap._held(steps, np.array([2.0, 1.0, 3.0]), 0.0)
    # 2 on [0, 10 ms), 1 on [10, 20 ms), 0 on the 480 ms pause, 3 on the last step, 0 after.
    mean = cap.time_mean(times, values, 1000e6)
    assert mean == pytest.approx((2 * 10e6 + 1 * 10e6 + 3 * 10e6) / 1000e6)
