"""Every aiperf schema kvprof reads, on real aiperf files: records, summaries, recomputation.

Fixtures (tests/fixtures/analysis/SOURCES.md): ``aiperf_c2`` is a real aiperf 0.13.0 run
(records + schema_version 1.4 summary + CSV); ``aiperf_v0_1_1_run1`` aiperf's own example run of
release 0.1.1 (``timestamp_ns`` / ``ttft`` records with 11 cancelled requests, the pre-1.0
``records`` summary, its CSV); ``aiperf_v0_8_0_smoke_100k`` an aiperf 0.8.0 summary
(schema_version 1.0) and CSV without records. Records-only and CSV-only folders are made here
by copying one real file of those runs alone.

The recomputation mirrors aiperf's code, read in its sources: 0.13.0
``aiperf/metrics/metric_dicts.py`` ``metric_result_from_array`` (linear-interpolated p1..p99,
np.std ddof=0, avg = sum / n) driven by ``aiperf/metrics/accumulator.py`` ``_compute_results``
(NaN-free values of each metric column, profiling phase only; timestamps in float64 columns)
and ``aiperf/metrics/types/benchmark_duration_metric.py`` / ``min_request_metric.py`` /
``max_response_metric.py``; 0.1.1 ``aiperf/metrics/metric_dicts.py`` ``MetricArray.to_result``
(np.percentile, np.std, np.mean). The tests hold kvprof's numbers to aiperf's own summary of
the same run.
"""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest
from conftest import FIXTURES, run_kvprof

from kvprof.analysis.loaders.aiperf import (
    RECORDS_FILE,
    SUMMARY_CSV,
    SUMMARY_JSON,
    load_aiperf_records,
    load_aiperf_summary,
    summarise_records,
)
from kvprof.errors import BadInputError

V013 = FIXTURES / "aiperf_c2"
V011 = FIXTURES / "aiperf_v0_1_1_run1"
V080 = FIXTURES / "aiperf_v0_8_0_smoke_100k"
# aiperf 0.13 divides these by its profiling phase window, which only its summary holds.
WINDOWED = {"request_throughput", "output_token_throughput"}


def _only(tmp_path, run, name, folder="run"):
    d = tmp_path / folder
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / name, d / name)
    return d


def _compare(mine: dict, theirs: dict) -> list[tuple[str, str, float, float]]:
    """(metric, stat, kvprof, aiperf) for every stat both summaries hold."""
    return [(m, k, v, theirs[m][k]) for m, stats in mine.items() if m in theirs
            for k, v in stats.items() if k in theirs[m]]


# --- recomputation equals aiperf's own summary --------------------------------------------------

def test_recomputed_from_0_13_records_equals_aiperf_0_13_summary(tmp_path):
    run = _only(tmp_path, V013, RECORDS_FILE)
    mine = load_aiperf_summary(run)
    theirs = load_aiperf_summary(V013)
    assert mine.recomputed and mine.kind == f"recomputed from {RECORDS_FILE}"
    assert not theirs.recomputed and "schema_version 1.4" in theirs.kind
    pairs = _compare(mine, theirs)
    assert len({m for m, *_ in pairs}) >= 30  # every record metric aiperf 0.13 wrote
    for metric, stat, v, a in pairs:
        if metric in WINDOWED:
            continue
        assert v == pytest.approx(a, rel=1e-12, abs=1e-12), (metric, stat)
    # The client-leg metrics the report uses, each with all of aiperf's stats.
    for metric in ("time_to_first_token", "inter_token_latency", "request_latency",
                   "http_req_waiting", "http_req_sending", "http_req_connecting"):
        assert set(theirs[metric]) <= set(mine[metric])
    assert mine["time_to_first_token"]["p99"] == pytest.approx(131.17084441, rel=1e-12)
    assert mine["inter_chunk_latency"]["count"] == 129  # list values flattened
    # benchmark_duration to the ns: aiperf 0.13 subtracts float64-rounded timestamps.
    assert mine["benchmark_duration"]["avg"] == theirs["benchmark_duration"]["avg"]
    assert (mine["request_count"]["avg"], mine["total_osl"]["avg"]) == (20, 388)
    for metric in WINDOWED:  # first request -> last response vs aiperf's phase window
        assert mine[metric]["avg"] == pytest.approx(theirs[metric]["avg"], rel=0.02)
    assert any("phase window" in n for n in mine.notes)
    assert any("recomputed" in n for n in mine.notes)


def test_recomputed_from_0_1_1_records_equals_its_records_summary(tmp_path):
    run = _only(tmp_path, V011, RECORDS_FILE)
    mine = load_aiperf_summary(run)
    theirs = load_aiperf_summary(V011)
    assert theirs.kind == 'profile_export_aiperf.json (aiperf 0.1.x, "records")'
    assert set(theirs) <= set(mine)  # every metric aiperf 0.1.1 summarised, throughputs too
    pairs = _compare(mine, theirs)
    assert len(pairs) == 141  # 11 distributions x 12 stats + 9 run totals
    for metric, stat, v, a in pairs:
        assert v == pytest.approx(a, rel=1e-12, abs=1e-12), (metric, stat)
    # Error records counted, never used: 89 error-free, 11 cancelled.
    assert mine["request_count"]["avg"] == 89 == theirs["time_to_first_token"]["count"]
    assert mine["error_request_count"]["avg"] == 11 == theirs["error_request_count"]["avg"]
    assert mine["benchmark_duration"]["avg"] == pytest.approx(9317.788951, abs=1e-9)
    assert mine["request_throughput"]["avg"] == pytest.approx(89 / 9.317788951, rel=1e-12)
    assert not any("phase window" in n for n in mine.notes)  # 0.1 used the same duration


def test_warmup_records_are_left_out_of_the_recomputed_summary(tmp_path):
    lines = (V013 / RECORDS_FILE).read_text().splitlines()
    docs = [json.loads(x) for x in lines]
    for d in docs[:2]:
        d["metadata"]["benchmark_phase"] = "warmup"
    run = tmp_path / "c2"
    run.mkdir()
    (run / RECORDS_FILE).write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    s = summarise_records(run)
    assert s["request_count"]["avg"] == 18 and s["time_to_first_token"]["count"] == 18
    rec = load_aiperf_records(run)
    assert len(rec) == 20 and (rec["benchmark_phase"] == "warmup").sum() == 2


# --- summaries of every release -----------------------------------------------------------------

@pytest.mark.parametrize("run, kind, ttft_p99, duration_ms, requests, conc", [
    (V013, "schema_version 1.4, aiperf 0.13.0", 131.17084441, 1681.089792, 20, 2),
    (V011, '(aiperf 0.1.x, "records")', 3833.3894000399996, 9317.788951, 89, 100),
    (V080, "schema_version 1.0, aiperf 0.8.0", 36193.81841633999, 141583.32399600002,
     481414, 100000),
], ids=["0.13.0", "0.1.1", "0.8.0"])
def test_summary_json_of_every_release(run, kind, ttft_p99, duration_ms, requests, conc):
    from kvprof.analysis.loaders.aiperf import concurrency_of

    s = load_aiperf_summary(run)
    assert kind in s.kind
    assert s["time_to_first_token"]["p99"] == pytest.approx(ttft_p99, rel=1e-15)
    assert s["benchmark_duration"]["avg"] == pytest.approx(duration_ms, rel=1e-15)
    assert s.units["time_to_first_token"] == s.units["benchmark_duration"] == "ms"
    assert s["request_count"]["avg"] == requests
    # A count is a count whatever the unit: aiperf 0.13 gives time metrics one in ms.
    assert s["time_to_first_token"].get("count", requests) == requests
    assert concurrency_of(run / "x", run / SUMMARY_JSON) == conc


def test_0_8_0_summary_holds_its_errors():
    s = load_aiperf_summary(V080)
    assert s["error_request_count"]["avg"] == 18586
    assert s["request_count"]["avg"] == 481414
    assert s["output_token_throughput"]["avg"] == pytest.approx(343421.89904634305)


@pytest.mark.parametrize("run", [V013, V011, V080], ids=["0.13.0", "0.1.1", "0.8.0"])
def test_csv_only_folder_equals_the_json_summary(run, tmp_path):
    from_csv = load_aiperf_summary(_only(tmp_path, run, SUMMARY_CSV))
    from_json = load_aiperf_summary(run)
    assert from_csv.kind == SUMMARY_CSV and not from_csv.recomputed
    pairs = _compare(from_csv, from_json)
    metrics = {m for m, *_ in pairs}
    assert {"time_to_first_token", "request_latency", "inter_token_latency", "request_count",
            "request_throughput", "output_token_throughput", "benchmark_duration", "total_osl",
            "total_isl"} <= metrics
    for metric, stat, v, a in pairs:
        if stat == "sum":
            continue  # 0.13's CSV sums the displayed values; the JSON keeps full precision
        # aiperf's CSV prints 2 decimals of the displayed unit (seconds for the duration).
        tol = 0.0051 * (1e3 if metric == "benchmark_duration" else 1.0)
        assert v == pytest.approx(a, abs=tol + abs(a) * 1e-15), (metric, stat)


# --- the record table ---------------------------------------------------------------------------

def test_0_13_records_carry_the_client_leg():
    rec = load_aiperf_records(V013)
    raw = [json.loads(x) for x in (V013 / RECORDS_FILE).read_text().splitlines()]
    assert len(rec) == 20 and rec.attrs["error_records"] == 0 and rec.attrs["bad_lines"] == 0
    for row, doc in zip(rec.itertuples(index=False), raw, strict=True):
        meta, metrics = doc["metadata"], doc["metrics"]
        assert row.x_request_id == meta["x_request_id"]
        assert row.request_start_ns == meta["request_start_ns"]
        assert row.request_ack_ns == meta["request_ack_ns"]
        assert row.request_end_ns == meta["request_end_ns"]
        ttft_ns = round(metrics["time_to_first_token"]["value"] * 1e6)
        assert row.first_response_ns == meta["request_start_ns"] + ttft_ns
        assert row.request_start_ns < row.request_ack_ns < row.first_response_ns
        assert row.first_response_ns <= row.request_end_ns
        for part in ("blocked", "dns_lookup", "connecting", "sending", "waiting",
                     "receiving", "duration", "connection_overhead", "total"):
            tag = f"http_req_{part}"
            assert getattr(row, f"{tag}_ms") == metrics[tag]["value"]
        assert row.http_req_connection_reused == metrics["http_req_connection_reused"]["value"]
    assert rec["concurrency"].tolist() == [2] * 20
    assert not rec["error"].any() and (rec["error_detail"] == "").all()
    assert str(rec["first_response_ns"].dtype) == "Int64"
    assert rec["request_start_ns"].dtype == "int64"


def test_0_1_1_records_flag_their_errors():
    rec = load_aiperf_records(V011)
    assert len(rec) == 100 and rec.attrs["error_records"] == 11
    assert rec.attrs["schemas"] == ["aiperf 0.1.x (timestamp_ns, ttft)"]
    err = rec[rec["error"]]
    assert len(err) == 11
    assert err["ttft_ms"].isna().all() and err["first_response_ns"].isna().all()
    assert err["error_detail"].str.startswith("499 RequestCancellationError: ").all()
    ok = rec[~rec["error"]]
    assert ok["ttft_ms"].notna().all()
    assert ok["ttft_ms"].mean() == pytest.approx(2343.219436988764, rel=1e-12)
    first = ok["request_start_ns"] + (ok["ttft_ms"] * 1e6).round().astype("int64")
    assert (ok["first_response_ns"].astype("int64") == first).all()
    # 0.1.x wrote no ack/end timestamps: "no data", never 0.
    assert rec["request_ack_ns"].isna().all() and rec["request_end_ns"].isna().all()
    assert rec["concurrency"].tolist() == [100] * 100  # input_config.loadgen of its summary
    assert (rec["benchmark_phase"] == "profiling").all()
    assert rec["http_req_waiting_ms"].isna().all()
    assert any("11 error records" in n for n in rec.attrs["notes"])


def test_error_record_with_a_ttft_is_flagged_not_used(tmp_path):
    lines = (V013 / RECORDS_FILE).read_text().splitlines()
    doc = json.loads(lines[0])
    doc["error"] = {"code": 500, "type": "ServerError", "message": "boom"}
    run = tmp_path / "c2"
    run.mkdir()
    (run / RECORDS_FILE).write_text("\n".join([json.dumps(doc), *lines[1:]]) + "\n")
    rec = load_aiperf_records(run)
    assert rec["error"].tolist() == [True] + [False] * 19
    assert math.isnan(rec["ttft_ms"].iloc[0]) and pd.isna(rec["first_response_ns"].iloc[0])
    assert rec["error_detail"].iloc[0] == "500 ServerError: boom"
    s = summarise_records(run)
    assert s["time_to_first_token"]["count"] == 19 and s["error_request_count"]["avg"] == 1


def test_a_tree_of_runs_concatenates_with_their_concurrency(tmp_path):
    shutil.copytree(V013, tmp_path / "c2")
    _only(tmp_path, V011, RECORDS_FILE, folder="c100")
    rec = load_aiperf_records(tmp_path)
    assert len(rec) == 120 and rec.attrs["error_records"] == 11
    assert rec.groupby("concurrency").size().to_dict() == {2: 20, 100: 100}
    assert len(rec.attrs["schemas"]) == 2


def test_summary_only_folders_give_an_empty_table_that_says_why(tmp_path):
    for run in (V080, _only(tmp_path, V013, SUMMARY_CSV)):
        rec = load_aiperf_records(run)
        assert len(rec) == 0 and "ttft_ms" in rec and "first_response_ns" in rec
        assert "only aiperf summaries" in rec.attrs["notes"][0]


# --- bad inputs ---------------------------------------------------------------------------------

def test_garbage_line_is_counted_and_the_good_records_kept(tmp_path):
    lines = (V013 / RECORDS_FILE).read_text().splitlines()
    run = tmp_path / "c2"
    run.mkdir()
    (run / RECORDS_FILE).write_text("\n".join([*lines[:5], "{garbage", *lines[5:]]) + "\n")
    rec = load_aiperf_records(run)
    assert len(rec) == 20 and rec.attrs["bad_lines"] == 1
    assert "line 6 is not JSON" in rec.attrs["notes"][0]
    s = load_aiperf_summary(run)
    assert s["time_to_first_token"]["avg"] == pytest.approx(
        load_aiperf_summary(V013)["time_to_first_token"]["avg"], rel=1e-12)
    assert any("1 of 21 lines" in n for n in s.notes)


def test_truncated_records_keep_what_was_written(tmp_path):
    data = (V013 / RECORDS_FILE).read_bytes()
    cut = data.index(b"\n", len(data) // 2) + 40  # 40 bytes into the next record
    run = tmp_path / "c2"
    run.mkdir()
    (run / RECORDS_FILE).write_bytes(data[:cut])
    rec = load_aiperf_records(run)
    whole = data[:cut].count(b"\n")
    assert len(rec) == whole and rec.attrs["bad_lines"] == 1
    assert "is truncated" in rec.attrs["notes"][0]
    assert summarise_records(run)["request_count"]["avg"] == whole


@pytest.mark.parametrize("content, words", [
    ("{garbage\n", "is not JSON"),
    ('{"metrics": {"ttft": {"val', "is truncated"),
    ("[1, 2]\n", "not an aiperf record"),
    ("", "holds no aiperf records"),
])
def test_records_file_with_no_good_record_is_bad_input(tmp_path, content, words):
    (tmp_path / RECORDS_FILE).write_text(content)
    with pytest.raises(BadInputError, match=words) as err:
        load_aiperf_records(tmp_path)
    assert err.value.hint and err.value.exit_code == 3
    with pytest.raises(BadInputError, match=words):
        load_aiperf_summary(tmp_path)


def test_truncated_summary_json_is_bad_input(tmp_path):
    text = (V011 / SUMMARY_JSON).read_text()
    (tmp_path / SUMMARY_JSON).write_text(text[: len(text) // 2])
    with pytest.raises(BadInputError, match="truncated") as err:
        load_aiperf_summary(tmp_path)
    assert err.value.hint
    (tmp_path / SUMMARY_JSON).write_text("")
    with pytest.raises(BadInputError, match="is empty"):
        load_aiperf_summary(tmp_path)


def test_empty_folder_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="no aiperf files") as err:
        load_aiperf_records(tmp_path)
    assert "profile_export.jsonl" in err.value.hint
    with pytest.raises(BadInputError, match="profile_export_aiperf.json"):
        load_aiperf_summary(tmp_path)


# --- through the CLI ----------------------------------------------------------------------------

@pytest.mark.parametrize("make, records", [
    (lambda tmp: V011, 100),
    (lambda tmp: V080, 0),
    (lambda tmp: _only(tmp, V013, SUMMARY_CSV), 0),
    (lambda tmp: _only(tmp, V013, RECORDS_FILE), 20),
], ids=["0.1.1", "0.8.0-summary-only", "csv-only", "records-only"])
def test_report_accepts_every_schema(golden, tmp_path, make, records):
    out = tmp_path / "r.json"
    r = run_kvprof("report", "--traces", golden.traces, "--aiperf", make(tmp_path),
                   "--out", out, "--format", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["inputs"]["aiperf"]["records"] == records


def _garbage(tmp):
    (tmp / RECORDS_FILE).write_text("{garbage\n")
    return tmp


@pytest.mark.parametrize("make, words", [
    (lambda tmp: tmp, "no aiperf files"),
    (_garbage, "is not JSON"),
], ids=["empty-folder", "garbage"])
def test_report_bad_aiperf_exits_3_with_a_hint(golden, tmp_path, make, words):
    r = run_kvprof("report", "--traces", golden.traces, "--aiperf", make(tmp_path),
                   "--out", tmp_path / "r.md", "--format", "md")
    assert r.returncode == 3 and words in r.stderr and "Hint:" in r.stderr
    assert "Traceback" not in r.stderr
