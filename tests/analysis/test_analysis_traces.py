"""Trace loaders: OTLP/JSON (Arrow and stdlib paths), Jaeger JSON, directories, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import FIXTURES

from kvprof import semconv as sc
from kvprof.analysis.loaders.span_schema import finalize_spans
from kvprof.analysis.loaders.traces import _Columns, _load_file, load_spans, trace_files
from kvprof.errors import BadInputError


def test_otlp_proto_example_normalises_ids_and_times():
    load = load_spans(FIXTURES / "otlp_opentelemetry-proto_examples_trace.json")
    row = load.spans.iloc[0]
    assert len(load.spans) == 1 and load.formats == {"otlp"}
    assert row["trace_id"] == "5b8efff798038103d269b633813fc60c"  # uppercase in the file
    assert row["parent_span_id"] == "eee19b7ec3c1b173"
    assert row["start_ns"] == 1544712660000000000 and row["end_ns"] == 1544712661000000000
    assert row["service"] == "my.service" and row["name"] == "I'm a server span"


def test_jaeger_ui_trace_loads_with_microseconds_and_services():
    load = load_spans(FIXTURES / "jaeger_ui_testTraceNormal.json")
    df = load.spans
    assert load.formats == {"jaeger"} and len(df) == 5
    first = df[df["span_id"] == "622a5079b565623e"].iloc[0]
    assert first["start_ns"] == 1579070675085840 * 1000
    assert first["end_ns"] - first["start_ns"] == 52 * 1000
    assert first["parent_span_id"] == "e821b549888cbc3b"
    assert set(df["service"].astype(str)) >= {"api-gateway", "customers-service"}


def test_arrow_and_stdlib_paths_give_the_same_table(golden):
    fast = load_spans(golden.traces).spans
    cols = _Columns()
    for p in trace_files(golden.traces):
        assert _load_file(p, cols, set()) == []
    slow = finalize_spans(cols.frame())
    key = ["span_id"]
    fast = fast.sort_values(key).reset_index(drop=True)
    slow = slow.sort_values(key).reset_index(drop=True)
    assert len(fast) == len(slow) == 24 * 12
    for col in fast.columns:
        if col == "source":
            continue
        a, b = fast[col].astype(object), slow[col].astype(object)
        same = (a == b) | (a.isna() & b.isna())
        assert same.all(), col


def test_span_attributes_and_resource_defaults(golden_spans):
    df = golden_spans.spans
    xfer = df[df["name"] == sc.SPAN_KV_TRANSFER]
    assert (xfer["kv_bytes"] == 524_288_000).all()
    assert set(xfer["kv_path"].astype(str)) == {"infiniband", "tcp"}
    # Node, pod and engine come from the resource, so every span has them.
    assert df["node"].notna().all() and df["engine_id"].notna().all()
    assert set(df["clock"].astype(str)) == {"gpu-node-1", "gpu-node-2"}


def test_directory_keeps_readable_files_and_lists_the_rest(golden, tmp_path):
    d = tmp_path / "mixed"
    shutil.copytree(golden.traces, d)
    (d / "garbage.json").write_text("this is not json")
    (d / "other.json").write_text(json.dumps({"kind": "PodList", "items": []}))
    (d / ".partial.jsonl").write_text("{")  # a temp file being written: ignored
    (d / "being-written.jsonl.tmp").write_text("{")
    with (d / "decode-0.jsonl").open("a") as fh:  # a truncated last line
        fh.write('{"resourceSpans": [{"resource": {"attr')
    load = load_spans(d)
    assert len(load.spans) == 24 * 12
    skipped = {p.split("/")[-1]: why for p, why in load.skipped}
    assert set(skipped) == {"garbage.json", "other.json", "decode-0.jsonl"}
    assert "not JSON" in skipped["garbage.json"]
    assert "another kind" in skipped["other.json"]
    assert skipped["decode-0.jsonl"].startswith("partly read")


@pytest.mark.parametrize("content, words", [
    ("", "empty"), ("garbage", "not JSON"), ('{"data": 1}', "another kind"),
])
def test_single_bad_file_is_bad_input_naming_it(tmp_path, content, words):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(BadInputError) as err:
        load_spans(f)
    assert "bad.json" in err.value.message and words in err.value.message
    assert err.value.exit_code == 3


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        load_spans(tmp_path / "nope")
    with pytest.raises(BadInputError, match="no trace files"):
        load_spans(tmp_path)


def test_status_and_aliased_attributes_on_both_paths(golden, tmp_path):
    """Error statuses (number or STATUS_CODE_* name) and attributes several keys feed
    (Dynamo's x_request_id, kvprof's own) read the same through Arrow and the stdlib."""
    line = next(iter(trace_files(golden.traces))).read_text().splitlines()[0]
    doc = json.loads(line)
    spans = doc["resourceSpans"][0]["scopeSpans"][0]["spans"]
    spans[0]["status"] = {"code": 2, "message": "NIXL reported the KV receive as failed"}
    spans[1]["status"] = {"code": "STATUS_CODE_ERROR"}
    spans[2]["attributes"].append({"key": "x_request_id", "value": {"stringValue": "dyn-1"}})
    spans[3]["attributes"].append({"key": sc.ATTR_X_REQUEST_ID,
                                   "value": {"stringValue": "kv-1"}})
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(doc) + "\n")
    fast = load_spans(path).spans.set_index("span_id")
    cols = _Columns()
    assert _load_file(path, cols, set()) == []
    slow = finalize_spans(cols.frame()).set_index("span_id")
    for table in (fast, slow):
        ids = [s["spanId"] for s in spans[:4]]
        assert table.loc[ids[0], "status_code"] == 2
        assert table.loc[ids[0], "status_message"] == "NIXL reported the KV receive as failed"
        assert table.loc[ids[1], "status_code"] == 2
        assert table.loc[ids[2], "x_request_id"] == "dyn-1"
        assert table.loc[ids[3], "x_request_id"] == "kv-1"
        assert table["status_code"].isna().sum() == len(table) - 2
