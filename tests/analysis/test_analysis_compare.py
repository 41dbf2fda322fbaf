"""`kvprof compare` reproduces the seed report's tables from aiperf exports of its numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import FIXTURES, run_kvprof

from kvprof.analysis.compare import comparison_tables, load_tree

SEED = Path(__file__).resolve().parents[2] / "examples" / "seed_aiperf"
NAMES = ("aggregated", "disaggregated")
V013, V011 = FIXTURES / "aiperf_c2", FIXTURES / "aiperf_v0_1_1_run1"


@pytest.fixture(scope="module")
def tables():
    base, cand = load_tree(SEED / "agg", 10), load_tree(SEED / "disagg", 10)
    return {t["label"]: {r["concurrency"]: r for r in t["rows"]}
            for t in comparison_tables(base, cand, NAMES)}


def test_ttft_tables_match_the_seed(tables):
    avg = tables["TTFT avg (ms)"]
    assert sorted(avg) == [1, 2, 5, 10, 25, 50, 100]
    # Seed: "1 | 177 | 367 | 2.1x" ... "100 | 1,102 | 4,667 | 4.2x"
    assert (avg[1]["aggregated"], avg[1]["disaggregated"]) == (177, 367)
    assert round(avg[1]["ratio"], 1) == 2.1 and round(avg[100]["ratio"], 1) == 4.2
    p99 = tables["TTFT p99 (ms)"]
    assert sorted(p99) == [1, 10, 25, 50, 100]
    assert round(p99[1]["ratio"], 1) == 6.4 and p99[1]["winner"] == "aggregated"
    assert p99[1]["disaggregated"] - p99[1]["aggregated"] == 1153  # the seed's 1,153 ms


def test_throughput_per_gpu_and_user_and_itl_winner(tables):
    tput = tables["Output tok/s total"][100]
    assert round(tput["ratio"] - 1, 2) == 0.26 and tput["winner"] == "aggregated"
    gpu = tables["Output tok/s per GPU"][100]
    assert (round(gpu["aggregated"], 1), round(gpu["disaggregated"], 1)) == (399.0, 315.8)
    user = tables["Output tok/s per user"][100]
    assert (round(user["aggregated"], 1), round(user["disaggregated"], 1)) == (39.9, 31.6)
    itl = tables["ITL avg (ms)"]
    assert all(r["winner"] == "disaggregated" for r in itl.values())
    assert sorted(tables["Request latency p99 (ms)"]) == [50, 100]


def test_cli_writes_tables_and_pareto(tmp_path):
    r = run_kvprof("compare", "--baseline", SEED / "agg", "--candidate", SEED / "disagg",
                   "--gpus", "10", "--gpus", "10", "--baseline-name", NAMES[0],
                   "--candidate-name", NAMES[1], "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "| 100 | 3,990.1 | 3,158.4 | aggregated | 1.26x |" in r.stdout
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (tmp_path / "pareto.svg").read_text()
    assert "<svg" in svg and "aggregated" in svg
    doc = json.loads((tmp_path / "compare.json").read_text())
    assert doc["baseline"]["gpus"] == 10 and len(doc["tables"]) == 8


def test_real_aiperf_run_as_a_tree(tmp_path):
    # The recorded aiperf 0.13 run, in a one-concurrency tree named as the seed's script does.
    for side in ("a", "b"):
        shutil.copytree(FIXTURES / "aiperf_c2", tmp_path / side / "c2")
    tree = load_tree(tmp_path / "a", 1)
    assert tree["concurrency"].tolist() == [2]
    assert tree["time_to_first_token.p99"].iloc[0] == pytest.approx(131.17084441)
    assert tree["tps_per_user"].iloc[0] == pytest.approx(227.56107843008516 / 2)


def _copy(tmp_path, src, dst, *names):
    dst = tmp_path / dst
    dst.mkdir(parents=True)
    for name in names or [p.name for p in src.iterdir()]:
        shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture
def mixed_trees(tmp_path):
    """The same two real runs (aiperf 0.13 at c2, 0.1.1 at c100) read two ways per side."""
    _copy(tmp_path, V013, "a/c2")                               # schema 1.4 JSON
    _copy(tmp_path, V011, "a/c100")                             # 0.1.1 "records" JSON
    _copy(tmp_path, V013, "b/c2", "profile_export.jsonl")       # records only: recomputed
    _copy(tmp_path, V011, "b/c100", "profile_export_aiperf.csv")  # CSV only
    return tmp_path / "a", tmp_path / "b"


def test_trees_of_every_schema_compare_alike(mixed_trees):
    base, cand = load_tree(mixed_trees[0], 1), load_tree(mixed_trees[1], 1)
    assert base["concurrency"].tolist() == cand["concurrency"].tolist() == [2, 100]
    assert cand["recomputed"].tolist() == [True, False]
    assert cand["summary_source"].tolist() == ["recomputed from profile_export.jsonl",
                                               "profile_export_aiperf.csv"]
    assert not base["recomputed"].any()
    tables = {t["label"]: {r["concurrency"]: r for r in t["rows"]}
              for t in comparison_tables(base, cand, NAMES)}
    for label in ("TTFT avg (ms)", "TTFT p99 (ms)", "ITL avg (ms)", "Request latency p99 (ms)"):
        assert tables[label][2]["winner"] == "tie"  # recomputed == aiperf, to float rounding
        assert tables[label][100]["ratio"] == pytest.approx(1.0, abs=2e-4)  # CSV: 2 decimals
    # Throughput: 0.13 divides by its phase window, the recomputation by first request to
    # last response (said in the output); 0.1.1's CSV is its JSON rounded.
    assert tables["Output tok/s total"][2]["ratio"] == pytest.approx(1.0, abs=0.02)
    assert tables["Output tok/s total"][100]["ratio"] == pytest.approx(1.0, rel=1e-4)


def test_cli_says_which_runs_were_recomputed(mixed_trees, tmp_path):
    r = run_kvprof("compare", "--baseline", mixed_trees[0], "--candidate", mixed_trees[1],
                   "--baseline-name", "full", "--candidate-name", "partial",
                   "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    assert ("partial: c2 had no aiperf summary: aggregates recomputed from "
            "profile_export.jsonl as aiperf computes them.") in r.stdout
    assert "partial: c100 read from profile_export_aiperf.csv" in r.stdout
    assert "phase window" in r.stdout
    assert "full: c" not in r.stdout
    doc = json.loads((tmp_path / "o" / "compare.json").read_text())
    runs = {r["concurrency"]: r for r in doc["candidate"]["runs"]}
    assert runs[2]["recomputed"] and not runs[100]["recomputed"]
    assert doc["baseline"]["runs"][1]["source"].startswith("profile_export_aiperf.json (aiperf")


@pytest.mark.parametrize("extra, code, words", [
    (["--gpus", "10"], 2, "give --gpus twice"),
    (["--gpus", "0", "--gpus", "10"], 2, ">= 1"),
])
def test_cli_usage_errors(extra, code, words, tmp_path):
    r = run_kvprof("compare", "--baseline", SEED / "agg", "--candidate", SEED / "disagg",
                   "--out", tmp_path, *extra)
    assert r.returncode == code and words in r.stderr


def test_cli_bad_trees(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_kvprof("compare", "--baseline", tmp_path / "empty", "--candidate", SEED / "disagg",
                   "--out", tmp_path / "o")
    assert r.returncode == 3 and "no aiperf runs" in r.stderr
    (tmp_path / "bad" / "c1").mkdir(parents=True)
    (tmp_path / "bad" / "c1" / "profile_export_aiperf.json").write_text("[1, 2]")
    r = run_kvprof("compare", "--baseline", tmp_path / "bad", "--candidate", SEED / "disagg",
                   "--out", tmp_path / "o")
    assert r.returncode == 3 and "profile_export_aiperf.json" in r.stderr


def test_cli_bad_runs_in_a_tree(tmp_path):
    text = (V011 / "profile_export_aiperf.json").read_text()
    (tmp_path / "cut" / "c1").mkdir(parents=True)
    (tmp_path / "cut" / "c1" / "profile_export_aiperf.json").write_text(text[:4000])
    (tmp_path / "junk" / "c1").mkdir(parents=True)
    (tmp_path / "junk" / "c1" / "profile_export.jsonl").write_text("not json\n")
    for tree, words in (("cut", "truncated"), ("junk", "is not JSON")):
        r = run_kvprof("compare", "--baseline", tmp_path / tree, "--candidate",
                       SEED / "disagg", "--out", tmp_path / "o")
        assert r.returncode == 3 and words in r.stderr and "Hint:" in r.stderr
