"""Malformed spans (bad ids or times) are skipped and counted, never fatal, on every loader.

The traces are the demo's real probe output (tests/fixtures/demo/run/traces/disagg) with one
span corrupted at a time; the rules are kvprof.analysis.loaders.otlp's module docstring.
"""

from __future__ import annotations

import base64
import copy
import json
import shutil
from pathlib import Path

import pytest
from conftest import FIXTURES, run_kvprof

from kvprof.analysis.loaders.jaeger import jaeger_to_records
from kvprof.analysis.loaders.otlp import SpanProblems, otlp_to_records
from kvprof.analysis.loaders.otlp_arrow import read_otlp_jsonl
from kvprof.analysis.loaders.traces import _Columns, _load_file, _readable, load_records, load_spans
from kvprof.errors import BadInputError

DEMO = Path(__file__).resolve().parents[1] / "fixtures" / "demo" / "run" / "traces" / "disagg"
DECODE = sorted(p.name for p in DEMO.glob("kvprof-dynamo-decode-*.jsonl"))[0]
ZERO_TRACE = "0" * 32


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write(path: Path, docs: list[dict]) -> None:
    path.write_text("".join(json.dumps(d, separators=(",", ":")) + "\n" for d in docs))


def _spans(doc: dict) -> list[dict]:
    return [sp for rs in doc["resourceSpans"] for ss in rs["scopeSpans"] for sp in ss["spans"]]


@pytest.fixture(scope="module")
def demo_total() -> int:
    return sum(len(_spans(d)) for p in DEMO.rglob("*.jsonl") for d in _lines(p))


def _corrupt(tmp_path: Path, mutate, index: int = 0) -> tuple[Path, dict]:
    """A copy of the demo traces whose decode file has span `index` of line 1 mutated."""
    d = tmp_path / "traces"
    shutil.copytree(DEMO, d)
    docs = _lines(d / DECODE)
    span = _spans(docs[0])[index]
    original = copy.deepcopy(span)
    mutate(span)
    _write(d / DECODE, docs)
    return d, original


def _set(**fields):
    def mutate(sp: dict) -> None:
        for key, value in fields.items():
            if value is _DROP:
                sp.pop(key, None)
            else:
                sp[key] = value
    return mutate


_DROP = object()

SKIPPED = [
    # (case, mutation, words of the reason)
    ("spanId not hex", _set(spanId="zz-not-hex-zz-zz"), "spanId 'zz-not-hex-zz-zz' is not 16"),
    ("spanId short", _set(spanId="abc123"), "spanId 'abc123' is not 16 hex digits"),
    ("spanId missing", _set(spanId=_DROP), "spanId is missing"),
    ("traceId missing", _set(traceId=_DROP), "traceId is missing"),
    ("traceId 31 digits", _set(traceId="a" * 31), "is not 32 hex digits"),
    ("traceId all zeros", _set(traceId=ZERO_TRACE), "traceId is all zeros"),
    ("traceId a number", _set(traceId=12345), "traceId is not a string (int 12345)"),
    ("start missing", _set(startTimeUnixNano=_DROP), "startTimeUnixNano is missing"),
    ("start not a number", _set(startTimeUnixNano="yesterday"),
     "startTimeUnixNano 'yesterday' is not a whole number"),
    ("start negative", _set(startTimeUnixNano="-5"), "startTimeUnixNano -5 is negative"),
    ("start fractional", _set(startTimeUnixNano=1.5), "is not a whole number"),
    ("start beyond int64", _set(startTimeUnixNano="99999999999999999999"), "beyond int64"),
    ("end zero", _set(endTimeUnixNano="0"), "endTimeUnixNano is 0 (unset)"),
    ("end before start", _set(endTimeUnixNano="1"), "endTimeUnixNano 1 is before"),
    ("end a boolean", _set(endTimeUnixNano=True), "endTimeUnixNano is a boolean"),
]


def _python_path(path: Path) -> tuple[int, SpanProblems, list[str]]:
    cols, spans = _Columns(), SpanProblems()
    problems = _load_file(path, cols, set(), spans)
    return len(cols.frame()), spans, problems


@pytest.mark.parametrize("case, mutate, words", SKIPPED, ids=[c[0] for c in SKIPPED])
def test_malformed_span_is_skipped_and_counted_on_both_paths(tmp_path, demo_total, case,
                                                             mutate, words):
    d, original = _corrupt(tmp_path, mutate)
    load = load_spans(d)
    assert len(load.spans) == demo_total - 1
    assert load.spans_skipped == 1 and load.parents_dropped == 0
    assert original["spanId"] not in set(load.spans["span_id"])
    (file, why), = load.skipped
    assert file.endswith(DECODE)
    assert why.startswith("partly read: 1 malformed span(s) skipped (first: span ")
    assert words in why
    assert len(load.notes) == 1 and "Skipped 1 malformed span(s) in 1 trace file(s)" in \
        load.notes[0] and words in load.notes[0]
    # The stdlib path on the same file agrees, span for span and reason for reason.
    n, spans, problems = _python_path(d / DECODE)
    assert problems == [] and spans.skipped == 1 and words in spans.first_skip
    assert n == len(_spans(_lines(DEMO / DECODE)[0])) - 1 + sum(
        len(_spans(doc)) for doc in _lines(DEMO / DECODE)[1:])


@pytest.mark.parametrize("case, mutate, words", [
    c for c in SKIPPED if c[0] in ("spanId not hex", "start not a number", "end before start")])
def test_arrow_path_itself_drops_the_span(tmp_path, case, mutate, words):
    d, original = _corrupt(tmp_path, mutate)
    spans = SpanProblems()
    table = read_otlp_jsonl(d / DECODE, spans)
    assert table is not None, "the Arrow path gave up; these cases must stay on it"
    good = sum(len(_spans(doc)) for doc in _lines(DEMO / DECODE))
    assert table.num_rows == good - 1 and spans.skipped == 1 and words in spans.first_skip
    assert original["spanId"] not in set(table.column("span_id").to_pylist())


def test_arrow_and_stdlib_paths_keep_and_drop_the_same_spans(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    docs = _lines(DEMO / DECODE)
    spans = [sp for doc in docs for sp in _spans(doc)]
    spans[0]["spanId"] = "not-hex-at-all!!"
    spans[1]["endTimeUnixNano"] = "5"
    spans[2]["parentSpanId"] = "xyz"
    spans[3]["traceId"] = spans[3]["traceId"].upper()
    spans[4]["parentSpanId"] = "0" * 16
    raw = bytes.fromhex(spans[5]["spanId"])
    spans[5]["spanId"] = base64.b64encode(raw).decode()
    _write(d / DECODE, docs)
    fast_problems = SpanProblems()
    fast = read_otlp_jsonl(d / DECODE, fast_problems).to_pandas()
    cols, slow_problems = _Columns(), SpanProblems()
    assert _load_file(d / DECODE, cols, set(), slow_problems) == []
    slow = cols.frame()
    assert fast_problems == slow_problems
    assert (fast_problems.skipped, fast_problems.parents_dropped) == (2, 1)
    key = ["trace_id", "span_id", "parent_span_id", "start_ns", "end_ns"]
    assert sorted(map(tuple, fast[key].astype(str).values)) == \
        sorted(map(tuple, slow[key].astype(str).values))
    by_span = fast.set_index("span_id")
    assert by_span.loc[raw.hex(), "trace_id"] == spans[5]["traceId"]  # base64 decoded
    assert by_span.loc[spans[2]["spanId"], "parent_span_id"] == ""  # malformed -> root
    assert by_span.loc[spans[4]["spanId"], "parent_span_id"] == ""  # zeros -> root


# The span the variants below rewrite: the first of the decode file's first line.
_FIRST = json.loads((DEMO / DECODE).read_text().splitlines()[0])["resourceSpans"][0][
    "scopeSpans"][0]["spans"][0]
_TRACE, _SPAN, _START = _FIRST["traceId"], _FIRST["spanId"], int(_FIRST["startTimeUnixNano"])


@pytest.mark.parametrize("case, mutate, check", [
    ("ids in upper case", _set(traceId=_TRACE.upper(), spanId=_SPAN.upper()),
     lambda row: row["trace_id"] == _TRACE),
    ("times as JSON integers", _set(startTimeUnixNano=_START, endTimeUnixNano=_START + 2302527),
     lambda row: row["end_ns"] - row["start_ns"] == 2302527),
    ("base64 ids", _set(traceId=base64.b64encode(bytes.fromhex(_TRACE)).decode(),
                        spanId=base64.b64encode(bytes.fromhex(_SPAN)).decode()),
     lambda row: row["trace_id"] == _TRACE),
    ("zero-length span", _set(endTimeUnixNano=str(_START)),
     lambda row: row["end_ns"] == row["start_ns"]),
])
def test_sound_variants_are_kept(tmp_path, demo_total, case, mutate, check):
    d, original = _corrupt(tmp_path, mutate)
    load = load_spans(d)
    assert len(load.spans) == demo_total and load.spans_skipped == 0 and not load.skipped
    row = load.spans[load.spans["span_id"] == original["spanId"]].iloc[0]
    assert check(row)


def test_malformed_parent_keeps_the_span_as_a_root_and_counts_it(tmp_path, demo_total):
    d, original = _corrupt(tmp_path, _set(parentSpanId="not-a-span-id"))
    load = load_spans(d)
    assert len(load.spans) == demo_total and load.spans_skipped == 0
    assert load.parents_dropped == 1 and not load.skipped
    row = load.spans[load.spans["span_id"] == original["spanId"]].iloc[0]
    assert row["parent_span_id"] == ""
    assert any("Kept 1 span(s) whose parent span id was malformed as roots" in n
               and "parentSpanId 'not-a-span-id'" in n for n in load.notes)


def test_pretty_printed_file_takes_the_stdlib_path_with_the_same_result(tmp_path):
    docs = _lines(DEMO / DECODE)
    _spans(docs[0])[0]["startTimeUnixNano"] = "yesterday"
    f = tmp_path / "one.json"
    f.write_text(json.dumps(docs[0], indent=2))  # not JSON lines: not for the Arrow path
    assert not _readable(f)
    load = load_spans(f)
    assert len(load.spans) == len(_spans(docs[0])) - 1 and load.spans_skipped == 1
    assert "'yesterday' is not a whole number" in load.skipped[0][1]


def test_file_without_one_usable_span_is_bad_input_naming_it(tmp_path):
    docs = _lines(DEMO / DECODE)[:2]
    for doc in docs:
        for sp in _spans(doc):
            sp["traceId"] = "nope"
    f = tmp_path / "all-bad.jsonl"
    _write(f, docs)
    total = sum(len(_spans(doc)) for doc in docs)
    with pytest.raises(BadInputError) as err:
        load_spans(f)
    assert err.value.exit_code == 3
    assert f"all-bad.jsonl: no usable span: {total} malformed span(s) skipped" in err.value.message
    assert "traceId 'nope' is not 32 hex digits" in err.value.message
    assert "32 hex digits" in err.value.hint


def test_directory_keeps_good_files_when_one_has_no_usable_span(tmp_path, demo_total):
    d = tmp_path / "traces"
    shutil.copytree(DEMO, d)
    docs = _lines(d / DECODE)
    bad = sum(len(_spans(doc)) for doc in docs)
    for doc in docs:
        for sp in _spans(doc):
            sp.pop("endTimeUnixNano")
    _write(d / DECODE, docs)
    load = load_spans(d)
    assert len(load.spans) == demo_total - bad and load.spans_skipped == bad
    (file, why), = load.skipped
    assert why.startswith(f"no usable span: {bad} malformed span(s) skipped")
    assert DECODE not in {Path(f).name for f in load.files}


# --- Jaeger JSON ---------------------------------------------------------------------------

def _jaeger(tmp_path: Path, mutate) -> Path:
    doc = json.loads((FIXTURES / "jaeger_ui_testTraceNormal.json").read_text())
    mutate(doc["spans"])
    f = tmp_path / "jaeger.json"
    f.write_text(json.dumps(doc))
    return f


def test_jaeger_bad_spans_are_skipped_and_a_bad_reference_drops_the_parent(tmp_path):
    def mutate(spans):
        spans[0]["spanID"] = "xyz!"
        spans[1]["duration"] = -3
        spans[2].pop("startTime")
        spans[3]["references"][0]["spanID"] = "not-hex"

    f = _jaeger(tmp_path, mutate)
    load = load_spans(f)
    assert len(load.spans) == 2 and load.spans_skipped == 3 and load.parents_dropped == 1
    why = load.skipped[0][1]
    assert why.startswith("partly read: 3 malformed span(s) skipped (first: span ")
    assert "spanID 'xyz!' is not 1-16 hex digits" in why
    row = load.spans[load.spans["span_id"] == "22be69e72cbcde0b"].iloc[0]
    assert row["parent_span_id"] == ""
    records, skipped = load_records(f)
    assert len(records) == 2
    assert [w.split(" (first")[0] for _, w in skipped] == [
        "partly read: 3 malformed span(s) skipped",
        "1 span(s) with a malformed parent id kept as roots"]


def test_jaeger_short_ids_are_left_padded_to_the_otlp_length(tmp_path):
    def mutate(spans):
        for sp in spans:
            sp["traceID"] = "e55417fc296fd101"  # a 64-bit Jaeger trace id
        spans[4]["spanID"] = "5b46b"  # leading zeros dropped by old Jaeger versions

    f = _jaeger(tmp_path, mutate)
    load = load_spans(f)
    assert load.spans_skipped == 0 and len(load.spans) == 5
    assert set(load.spans["trace_id"]) == {"0" * 16 + "e55417fc296fd101"}
    assert "00000000000" + "5b46b" in set(load.spans["span_id"])


def test_record_readers_raise_without_a_counter():
    doc = json.loads((FIXTURES / "otlp_opentelemetry-proto_examples_trace.json").read_text())
    _spans(doc)[0]["spanId"] = "bad"
    with pytest.raises(BadInputError, match="spanId 'bad'"):
        list(otlp_to_records(doc))
    problems = SpanProblems()
    assert list(otlp_to_records(doc, problems)) == [] and problems.skipped == 1
    jdoc = json.loads((FIXTURES / "jaeger_ui_testTraceNormal.json").read_text())
    jdoc["spans"][0]["startTime"] = "soon"
    with pytest.raises(BadInputError, match="startTime 'soon'"):
        list(jaeger_to_records(jdoc))


# --- through the real command line ---------------------------------------------------------

def test_report_cli_skips_and_reports_the_bad_span(tmp_path, demo_total):
    # The bug this guards: a bad start time used to end in "internal error: ValueError: All
    # arrays must be of the same length" (exit 1).
    d, _ = _corrupt(tmp_path, _set(startTimeUnixNano="yesterday"))
    out = tmp_path / "r.json"
    r = run_kvprof("report", "--traces", d, "--format", "json", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert f"skipped {d / DECODE}: partly read: 1 malformed span(s) skipped" in r.stderr
    data = json.loads(out.read_text())
    traces = data["inputs"]["traces"]
    assert traces["spans"] == demo_total - 1 and traces["spans_skipped"] == 1
    assert traces["parents_dropped"] == 0
    assert "startTimeUnixNano 'yesterday' is not a whole number" in traces["skipped"][0]["why"]
    assert any(n.startswith("Skipped 1 malformed span(s) in 1 trace file(s)")
               for n in data["notes"])


def test_report_cli_file_without_usable_span_exits_3(tmp_path):
    docs = _lines(DEMO / DECODE)
    for doc in docs:
        for sp in _spans(doc):
            sp["startTimeUnixNano"] = "-1"
    f = tmp_path / "bad.jsonl"
    _write(f, docs)
    r = run_kvprof("report", "--traces", f, "--format", "json", "--out", tmp_path / "r.json")
    assert r.returncode == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    errors = [x for x in lines if x.startswith("Error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        f"Error: no spans could be read from {f} (bad.jsonl: no usable span: ")
    assert "startTimeUnixNano -1 is negative" in errors[0]
    assert lines[-1].startswith("Hint: Each span needs a traceId of 32 hex digits")
    assert "Traceback" not in r.stderr


def test_convert_cli_skips_and_counts_the_bad_span(tmp_path):
    d, original = _corrupt(tmp_path, _set(spanId="zz"))
    out = tmp_path / "j.json"
    r = run_kvprof("traces", "convert", d / DECODE, "--to", "jaeger", "--out", out)
    assert r.returncode == 0, r.stderr
    good = sum(len(_spans(doc)) for doc in _lines(DEMO / DECODE)) - 1
    assert f"Converted {good} spans" in r.stderr
    assert "partly read: 1 malformed span(s) skipped (first: span " in r.stderr
    spans = [sp for t in json.loads(out.read_text())["data"] for sp in t["spans"]]
    assert len(spans) == good and original["spanId"] not in {sp["spanID"] for sp in spans}


def test_convert_cli_without_usable_span_exits_3(tmp_path):
    doc = json.loads((FIXTURES / "otlp_opentelemetry-proto_examples_trace.json").read_text())
    _spans(doc)[0]["endTimeUnixNano"] = "12"
    f = tmp_path / "one.json"
    f.write_text(json.dumps(doc))
    r = run_kvprof("traces", "convert", f, "--to", "perfetto")
    assert r.returncode == 3, r.stderr
    assert r.stderr.startswith(f"Error: no spans could be read from {f} (one.json: no usable "
                               "span: 1 malformed span(s) skipped")
    assert "\nHint: " in r.stderr and "Traceback" not in r.stderr


def test_vectorised_id_check_flags_exactly_the_bad_rows():
    import pyarrow as pa

    from kvprof.analysis.loaders.otlp_arrow import _bad_ids

    good = ["0123456789abcdef", "fedcba9876543210"]
    assert _bad_ids(pa.array(good), 16) is None
    # Each byte class around the hex digits: '/' (before '0'), ':' and '@' and '`' (between
    # '9' and 'a'), 'g' (after 'f'), a non-ASCII character, and wrong lengths / all zeros.
    bad = ["012345678/abcdef", "012345678:abcdef", "0123456789@bcdef", "0123456789`bcdef",
           "0123456789abcdeg", "0123456789abcdé", "0123456789abcde", "0" * 16, ""]
    flags = _bad_ids(pa.array(good + bad + good), 16)
    assert flags.tolist() == [False] * 2 + [True] * len(bad) + [False] * 2
    assert _bad_ids(pa.array(["", *good]), 16, empty_ok=True) is None
    sliced = pa.array(["zz", *good, "xx"]).slice(1, 2)  # an offset into the buffers
    assert _bad_ids(sliced, 16) is None
