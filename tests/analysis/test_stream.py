"""The streamed breakdown (kvprof.analysis.stream, issue 24) equals the in-memory one.

Small inputs are forced into many shards (and many chunks per file), so every request's
spans must find their shard through the trace/id links (the scenario breaks the traceparent
of some requests: their prefill and decode spans sit in two traces joined by ids only), and
the skew estimate must pool every shard's constraints.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DEMO = FIXTURES / "demo" / "run"
# Sections and keys a streamed report leaves out (they read every span at once).
SPAN_ONLY = {"transfer_split", "causes", "cpu_wait_ms"}
SAME_SECTIONS = ("skew", "propagation", "percentiles", "legs", "levels", "phase_stats", "pairs",
                 "verdict", "verdict_by_level", "waterfall", "stages_by_level")


def _report(inputs) -> dict:
    from kvprof.analysis.pipeline import build_report
    from kvprof.analysis.views.report import _no_nan

    data = build_report(inputs, with_plots=False).data
    data.pop("generated_at")
    return json.loads(json.dumps(_no_nan(data), default=str))


def _assert_same(memory: dict, streamed: dict) -> None:
    def strip(d: dict) -> dict:
        return {k: v for k, v in d.items() if k not in SPAN_ONLY}

    assert streamed["inputs"]["traces"]["streamed_shards"] > 1
    assert strip(streamed["summary"]) == strip(memory["summary"])
    for key in SAME_SECTIONS:
        assert streamed[key] == memory[key], key
    assert [strip(r) for r in streamed["requests"]] == [strip(r) for r in memory["requests"]]
    assert [n for n in streamed["notes"] if not n.startswith("Streamed analysis")] == [
        n for n in memory["notes"] if not n.startswith(("what-if model:", "causes could"))]
    assert "capacity" not in streamed and "whatif" not in streamed


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> Path:
    from kvprof.analysis.scenario import ScenarioSpec, write_scenario

    root = tmp_path_factory.mktemp("stream")
    write_scenario(root, ScenarioSpec(requests=240, spacing_ms=10.0, jitter_ms=50.0,
                                      broken_traceparent=9, full_path=True), samples=False)
    return root


def test_streamed_report_equals_in_memory_on_the_scenario(scenario):
    from kvprof.analysis.pipeline import ReportInputs

    def inputs(**kw):
        return ReportInputs(traces=str(scenario / "traces"), aiperf=scenario / "aiperf", **kw)

    memory = _report(inputs(stream="off"))
    streamed = _report(inputs(stream="on", shards=7))
    _assert_same(memory, streamed)
    assert memory["summary"]["requests"] == 240
    # The broken traceparents were joined by id across shards, as in memory.
    hop = next(h for h in streamed["propagation"] if h["hop"].startswith("prefill"))
    assert hop["joined_by_id_only"] == 9


def test_streamed_breakdown_table_is_identical_with_many_chunks(scenario):
    """Chunks of ~20 kB (dozens per file), 11 shards broken down by two worker processes:
    the request table, exactly."""
    import pandas as pd

    from kvprof.analysis.breakdown import build_breakdown
    from kvprof.analysis.loaders.aiperf import load_aiperf_records
    from kvprof.analysis.loaders.traces import load_spans
    from kvprof.analysis.stream import stream_breakdown

    records = load_aiperf_records(scenario / "aiperf")
    load = load_spans(scenario / "traces")
    memory = build_breakdown(load.spans, records)
    result = stream_breakdown(scenario / "traces", records, shards=11, chunk_bytes=20_000,
                              workers=2)  # two worker processes, as on a large input
    assert result.spans == len(load.spans)
    pd.testing.assert_frame_equal(result.breakdown.requests.reset_index(drop=True),
                                  memory.requests.reset_index(drop=True), check_exact=True)
    assert result.breakdown.skew.to_dict() == memory.skew.to_dict()
    assert result.breakdown.notes == memory.notes


def test_streamed_report_equals_in_memory_on_the_demo_recording(tmp_path):
    """Real traces (the demo's Dynamo run); one file rewritten as one pretty-printed JSON
    document, which the Arrow path cannot take (the stdlib reader's spans stream too)."""
    from kvprof.analysis.pipeline import ReportInputs

    traces = tmp_path / "traces"
    shutil.copytree(DEMO / "traces" / "disagg", traces)
    first = sorted(traces.rglob("*.jsonl"))[0]
    docs = [json.loads(line) for line in first.read_text().splitlines() if line.strip()]
    pretty = {"resourceSpans": [rs for d in docs for rs in d["resourceSpans"]]}
    first.with_suffix(".json").write_text(json.dumps(pretty, indent=2))
    first.unlink()

    def inputs(**kw):
        return ReportInputs(traces=str(traces), aiperf=DEMO / "aiperf" / "disagg",
                            microbench=DEMO / "microbench.json", one_clock=True, **kw)

    memory = _report(inputs(stream="off"))
    streamed = _report(inputs(stream="on", shards=4))
    _assert_same(memory, streamed)
    assert streamed["inputs"]["traces"]["spans"] == memory["inputs"]["traces"]["spans"]
    assert streamed["inputs"]["traces"]["files"] == memory["inputs"]["traces"]["files"]


def test_stream_option_is_checked(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kvprof", "report", "--traces",
                        str(DEMO / "traces" / "disagg"), "--stream", "maybe", "--out",
                        str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Error: --stream maybe" in r.stderr and "Hint:" in r.stderr
    assert "Traceback" not in r.stderr
