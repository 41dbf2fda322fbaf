"""The demo's closing numbers come from report.json: a recorded real report and edge cases."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from demo.headline import NO_DATA, headline_from_report, load_headline  # noqa: E402
from demo.microbench_summary import microbench_lines  # noqa: E402
from kvprof.errors import BadInputError  # noqa: E402

RECORDED = REPO / "tests" / "fixtures" / "demo" / "run"


def test_recorded_report_headline_matches_its_rows() -> None:
    report = json.loads((RECORDED / "report.json").read_text())
    hl = load_headline(RECORDED / "report.json")
    first = [r for r in report["requests"] if r["first_contact"]]
    steady = [r for r in report["requests"] if not r["first_contact"] and not r["warmup"]
              and r["kv.transfer"] is not None and r["ttft_ms"]]
    assert hl.first_handshake.requests == len(first) >= 1
    assert hl.first_handshake.share == pytest.approx(
        statistics.median(r["kv.handshake"] / r["ttft_ms"] for r in first))
    assert hl.steady_transfer.requests == len(steady)
    assert hl.steady_transfer.part_ms == pytest.approx(
        statistics.median(r["kv.transfer"] for r in steady))
    assert hl.unaccounted_mean_ms == pytest.approx(report["summary"]["unaccounted_mean_ms"])
    # On loopback the first request's lazy NIXL handshake dwarfs every later transfer.
    assert hl.first_handshake.part_ms > 10 * hl.steady_transfer.part_ms
    names = [name for name, _ in hl.lines()]
    assert names[-3:] == ["First-request handshake share", "Steady-state transfer share",
                          "Unaccounted time"]
    assert names[:-3] == [f"Largest stage #{i}" for i in range(1, len(names) - 2)]


def test_largest_stages_come_from_the_verdict_in_its_words() -> None:
    report = {"requests": [], "summary": {"unaccounted_mean_ms": 4.0,
                                          "unaccounted_share": 0.02},
              "verdict": [{"cause": "decode.intake", "share": 0.41,
                           "headline": "the decode engine's API server held the request 80.0 ms"
                                       " before its EngineCore saw it"},
                          {"cause": "unaccounted", "share": 0.02, "headline": "4.0 ms ..."},
                          {"cause": "prefill.compute", "share": 0.3,
                           "headline": "prefill compute took 60.0 ms to the first token"}]}
    text = dict(headline_from_report(report).lines())
    assert text["Largest stage #1"] == ("the decode engine's API server held the request "
                                        "80.0 ms before its EngineCore saw it (41% of TTFT)")
    assert text["Largest stage #2"].startswith("prefill compute took 60.0 ms")
    assert "Largest stage #3" not in text
    assert text["Unaccounted time"] == "4.0 ms per request (mean; 2.0% of TTFT; no leg covers it)"


def test_shares_are_medians_and_skip_rows_without_ttft() -> None:
    rows = [
        {"first_contact": True, "kv.handshake": 400.0, "ttft_ms": 500.0},
        {"first_contact": False, "kv.transfer": 1.0, "ttft_ms": 100.0},
        {"first_contact": False, "kv.transfer": 3.0, "ttft_ms": 50.0},
        {"first_contact": False, "kv.transfer": 2.0, "ttft_ms": 100.0},
        {"first_contact": False, "kv.transfer": 9.0, "ttft_ms": None},  # no TTFT: not counted
    ]
    hl = headline_from_report({"requests": rows, "summary": {"unaccounted_mean_ms": 12.5,
                                                             "requests": 5, "pairs": 1}})
    assert hl.first_handshake.share == pytest.approx(0.8)
    assert hl.steady_transfer.requests == 3
    assert hl.steady_transfer.share == pytest.approx(0.02)
    assert hl.steady_transfer.part_ms == pytest.approx(2.0)
    text = dict(hl.lines())
    assert text["First-request handshake share"].startswith("80.0% of TTFT (kv.handshake 400.0")
    assert text["Unaccounted time"].startswith("12.5 ms per request")


def test_warm_ups_stay_out_of_the_steady_state_and_a_warm_first_contact_says_so() -> None:
    rows = [
        {"first_contact": True, "warmup": True, "kv.handshake": 70.0, "ttft_ms": 5000.0},
        {"first_contact": False, "warmup": True, "kv.transfer": 200.0, "ttft_ms": 400.0},
        {"first_contact": False, "warmup": False, "kv.transfer": 3.0, "ttft_ms": 300.0},
    ]
    text = dict(headline_from_report({"requests": rows, "summary": {}}).lines())
    assert text["First-request handshake share"] == (
        "1.4% of TTFT (kv.handshake 70.0 ms of 5000.0 ms, median of 1 request; aiperf's warm-up)")
    assert text["Steady-state transfer share"] == (
        "1.0% of TTFT (kv.transfer 3.0 ms of 300.0 ms, median of 1 request)")
    rows[0]["warmup"] = False
    text = dict(headline_from_report({"requests": rows, "summary": {}}).lines())
    assert text["First-request handshake share"].endswith("median of 1 request)")


def test_missing_phases_read_no_data_not_zero() -> None:
    hl = headline_from_report({"requests": [{"first_contact": False, "kv.transfer": None,
                                             "ttft_ms": 10.0}], "summary": {}})
    assert dict(hl.lines()) == {
        "First-request handshake share": NO_DATA,
        "Steady-state transfer share": NO_DATA,
        "Unaccounted time": NO_DATA,
    }


def test_missing_and_garbage_report_json(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="report JSON not found"):
        load_headline(tmp_path / "report.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"summary": ')
    with pytest.raises(BadInputError, match="is not JSON"):
        load_headline(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(BadInputError, match="not a kvprof report"):
        load_headline(bad)


def test_microbench_lines_read_the_recorded_json() -> None:
    doc = json.loads((RECORDED / "microbench.json").read_text())
    lines = microbench_lines(RECORDED / "microbench.json")
    assert lines[0].startswith("qwen3-32b fp8, 4,000 tokens = 524.3 MB of KV in 250 blocks")
    assert f"{doc['descriptors']:,} descriptors of 8 KiB" in lines[0]
    total = doc["steps"]["total"]["median_ms"]
    assert any(f"= {total:,.0f} ms" in line for line in lines)
    assert "the seed's overhead: 1,153 ms" in lines[-1]
