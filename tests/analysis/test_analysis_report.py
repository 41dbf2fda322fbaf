"""`kvprof report` through the real entry point: HTML / Markdown / JSON and bad input."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from conftest import FIXTURES, run_kvprof


@pytest.fixture(scope="module")
def report_json(golden, tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "r.json"
    r = run_kvprof("report", "--traces", golden.traces, "--samples", golden.samples,
                   "--aiperf", golden.aiperf, "--microbench", golden.microbench,
                   "--vllm-log", FIXTURES / "kv_transfer_log_lines.txt",
                   "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    assert "24 requests" in r.stderr and "top cause: prefill compute (" in r.stderr
    return json.loads(out.read_text())


def test_json_numbers(report_json):
    d = report_json
    assert d["summary"]["requests"] == 24 and d["summary"]["first_contact_requests"] == 4
    assert d["summary"]["unaccounted_mean_ms"] == pytest.approx(31.0)
    assert d["summary"]["unaccounted_share"] == pytest.approx(
        31.0 / d["summary"]["ttft_mean_ms"])
    assert d["skew"]["offsets_ms"]["gpu-node-1"] == pytest.approx(-49.5)
    assert [c["cause"] for c in d["verdict"][:3]] == ["prefill.compute", "kv.transfer",
                                                      "kv.handshake"]
    assert d["verdict"][-1]["cause"] == "unaccounted"
    # Every request: its legs in path order, and legs + unaccounted = TTFT.
    for row in d["requests"]:
        assert sum(row["legs_ms"].values()) + row["unaccounted_ms"] == pytest.approx(
            row["ttft_ms"], abs=1e-3)
        assert list(row["legs_ms"])[:2] == ["prefill.scheduled", "prefill.first_token"]
    assert {b["path"] for b in d["links"]["by_path"]} == {"infiniband", "tcp"}
    assert d["should_cost"]["total_ms"] == pytest.approx(14.1)
    assert len(d["vllm_kv_transfer_log"]) == 2 and len(d["requests"]) == 24
    transfer = next(c for c in d["verdict"] if c["cause"] == "kv.transfer")
    assert any("estimate: microbench" in e for e in transfer["evidence"])


def test_markdown_has_the_same_numbers(golden, report_json, tmp_path):
    out = tmp_path / "r.md"
    r = run_kvprof("report", "--traces", golden.traces, "--aiperf", golden.aiperf,
                   "--out", out, "--format", "md")
    assert r.returncode == 0, r.stderr
    md = out.read_text()
    assert "## Verdict" in md and "cmpl-00000003-aaaa-4bbb-8ccc-000000000003-0 |" in md
    assert f"{report_json['summary']['ttft_p99_ms']:.1f}" in md


def test_html_is_self_contained_with_plots(golden, tmp_path):
    out = tmp_path / "r.html"
    r = run_kvprof("report", "--traces", golden.traces, "--samples", golden.samples,
                   "--aiperf", golden.aiperf, "--out", out)
    assert r.returncode == 0, r.stderr
    html = out.read_text()
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 4
    assert not re.search(r'(src|href)="https?://', html)
    assert "<script" not in html and "Verdict" in html


def test_bad_trace_directory_exits_3_naming_files(tmp_path):
    (tmp_path / "a.jsonl").write_text("garbage\n")
    (tmp_path / "b.json").write_text('{"kind": "PodList"}')
    r = run_kvprof("report", "--traces", tmp_path, "--out", tmp_path / "r.html")
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert "a.jsonl" in r.stderr and "b.json" in r.stderr and "Hint:" in r.stderr


def test_spans_without_kvprof_names_exit_3(tmp_path):
    r = run_kvprof("report", "--traces", FIXTURES / "otlp_opentelemetry-proto_examples_trace.json",
                   "--out", tmp_path / "r.html")
    assert r.returncode == 3 and "none that kvprof's probes write" in r.stderr


def test_partial_directory_still_reports_and_lists_skipped(golden, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(golden.traces, d)
    (d / "zz-broken.json").write_text("{")
    r = run_kvprof("report", "--traces", d, "--out", tmp_path / "r.json", "--format", "json")
    assert r.returncode == 0 and "skipped 1 trace file(s): zz-broken.json" in r.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["inputs"]["traces"]["skipped"][0]["file"].endswith("zz-broken.json")


def test_bad_format_and_bad_aiperf(golden, tmp_path):
    r = run_kvprof("report", "--traces", golden.traces, "--format", "pdf")
    assert r.returncode == 2 and "--format 'pdf'" in r.stderr
    (tmp_path / "profile_export.jsonl").write_text('{"metrics": {"x": {"value": 1}}}\n')
    r = run_kvprof("report", "--traces", golden.traces, "--aiperf", tmp_path,
                   "--out", tmp_path / "r.md", "--format", "md")
    assert r.returncode == 3 and "unknown aiperf record schema" in r.stderr


def test_report_lists_placement_records(golden, tmp_path):
    import pandas as pd

    from kvprof.analysis.pipeline import ReportInputs, build_report

    pd.DataFrame([{"ts": 1.0, "node": "gpu-node-1", "collector": "placement",
                   "entity": "qwen32b-disagg-vllmdecodeworker-0",
                   "metric": "kvprof_placement_info", "value": 1.0,
                   "labels": json.dumps({"pod": "qwen32b-disagg-vllmdecodeworker-0",
                                         "namespace": "ns", "node": "gpu-node-1",
                                         "gpu_uuid": "GPU-1", "role": "decode"})}]
                 ).to_parquet(tmp_path / "p.parquet")
    rep = build_report(ReportInputs(traces=str(golden.traces), placement=tmp_path),
                       with_plots=False)
    assert rep.data["placement"][0]["gpu_uuid"] == "GPU-1"
    assert rep.plots == {} and rep.data["summary"]["ttft_sources"] == {"spans (estimate)": 24}


def test_lease_expiries_from_a_real_prefill_log_become_a_note(golden, tmp_path):
    """A prefill log's NIXL lease expiries say which requests' KV was never pulled."""
    from kvprof.analysis.loaders.vllm_metrics import parse_lease_expiries

    log = FIXTURES / "vllm_prefill_lease_expiry.log"
    leases = parse_lease_expiries(log)
    assert list(leases["retrieved_by"]) == [0, 0, 0]
    assert leases["request_id"].iloc[0] == "cmpl-c75c5d52-c7db-4cf6-8b55-bc2283b8de0a-0-af6ef720"
    out = tmp_path / "r.json"
    r = run_kvprof("report", "--traces", golden.traces, "--vllm-log", log,
                   "--vllm-log", FIXTURES / "kv_transfer_log_lines.txt", "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert len(d["vllm_lease_expiries"]) == 3
    assert len(d["vllm_kv_transfer_log"]) == 2
    note = [n for n in d["notes"] if "lease expired" in n]
    assert note and "3 request(s)" in note[0] and "cmpl-c75c5d52" in note[0]


def test_log_without_nixl_lines_is_bad_input(golden, tmp_path):
    log = tmp_path / "other.log"
    log.write_text("INFO nothing about KV here\n")
    r = run_kvprof("report", "--traces", golden.traces, "--vllm-log", log,
                   "--out", tmp_path / "r.json", "--json")
    assert r.returncode == 3
    assert "Error: no \"KV Transfer metrics\" or KV lease-expiry lines" in r.stderr
    assert "Hint:" in r.stderr and "Traceback" not in r.stderr
