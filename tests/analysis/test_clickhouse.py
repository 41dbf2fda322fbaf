"""Traces through SQL (kvprof.analysis.clickhouse): local files read by chDB, and the
OpenTelemetry Collector ClickHouse exporter's otel_traces table (Map and JSON attributes)
read over ClickHouse's HTTP interface, give the report the pandas loader gives."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvprof.analysis.pipeline import ReportInputs, build_report

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "tests" / "fixtures" / "demo" / "run"
DYNAMO = REPO / "tests" / "fixtures" / "analysis" / "dynamo_native"


def _report(traces: str, aiperf: Path | None, **kw) -> dict:
    data = build_report(ReportInputs(traces=traces, aiperf=aiperf, one_clock=True, **kw),
                        with_plots=False).data
    data = copy.deepcopy(data)
    data.pop("generated_at")
    return data


@pytest.fixture(scope="module")
def pandas_demo() -> dict:
    return _report(str(DEMO / "traces"), DEMO / "aiperf")


@pytest.mark.parametrize("where", ["demo", "dynamo_native"])
def test_files_through_chdb_give_the_pandas_report(where, pandas_demo):
    """Same span table (row order, dtypes, categories) and so the same report.json, whole."""
    import pandas as pd

    from kvprof.analysis.clickhouse.load import load_files_chdb
    from kvprof.analysis.loaders.traces import load_spans

    traces, aiperf = (DEMO / "traces", DEMO / "aiperf") if where == "demo" else (DYNAMO, None)
    a, b = load_spans(traces), load_files_chdb(traces)
    pd.testing.assert_frame_equal(a.spans, b.spans, check_exact=True, check_categorical=True)
    assert (a.files, a.skipped, a.formats) == (b.files, b.skipped, b.formats)
    want = pandas_demo if where == "demo" else _report(str(traces), aiperf)
    got = _report(str(traces), aiperf, engine="chdb")
    assert got == want


@pytest.fixture(scope="module", params=["map", "json"])
def clickhouse(request):
    """chDB behind ClickHouse's HTTP interface on 127.0.0.1, the demo's spans inserted into
    the exporter's otel_traces table as the exporter writes them (tests/clickhouse_server.py)."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "clickhouse_server.py"), "--traces",
         str(DEMO / "traces"), "--variant", request.param],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("PORT "), line
        yield f"clickhouse://127.0.0.1:{line.split()[1]}/otel", int(line.split()[3])
    finally:
        proc.stdin.close()  # the server ends when its stdin closes
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        proc.stdout.close()


def _engines_by_name(capacity: dict) -> list:
    return [sorted(lv["engines"], key=lambda e: e["engine"]) for lv in capacity["levels"]]


def test_exporter_table_gives_the_pandas_report(clickhouse, pandas_demo):
    """Every leg, request row, statistic and verdict equal; only the inputs' description and
    the capacity table's engine order (order of first appearance) may differ."""
    url, rows = clickhouse
    assert rows == pandas_demo["inputs"]["traces"]["spans"]
    got = _report(url, DEMO / "aiperf")
    assert got["inputs"]["traces"]["formats"] == ["clickhouse"]
    for key in pandas_demo:
        if key in ("inputs", "capacity"):
            continue
        assert got[key] == pandas_demo[key], key
    assert got["summary"]["requests"] == 48 and got["legs"]
    assert _engines_by_name(got["capacity"]) == _engines_by_name(pandas_demo["capacity"])


def test_service_and_lookback_filter_on_the_server(clickhouse):
    """--service keeps whole traces that passed through that service; --lookback counts back
    from the newest span stored."""
    from kvprof.analysis.clickhouse.engines import parse_url
    from kvprof.analysis.clickhouse.load import load_clickhouse

    engine = parse_url(clickhouse[0])
    every = load_clickhouse(engine, None, 3600.0).spans
    prefill = load_clickhouse(engine, "dynamo-prefill", 3600.0).spans
    traces = set(prefill["trace_id"])
    assert 0 < len(prefill) < len(every)
    assert traces == set(every.loc[every["service"] == "dynamo-prefill", "trace_id"])
    assert len(every[every["trace_id"].isin(traces)]) == len(prefill)
    newest = int(every["start_ns"].max())
    recent = load_clickhouse(engine, None, 5.0).spans
    assert 0 < len(recent) < len(every) and (recent["start_ns"] >= newest - 5e9).all()
