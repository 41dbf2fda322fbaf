"""What a serving engineer reads: no NaN, GB/s with significant digits, honest microbench maths.

The "loopback" scenario mirrors the demo's real run: small KV (131,072 bytes) moved at well
under 1 GB/s, a handshake only on the first request of each pair, and a microbench measured
for another geometry (the seed's 524,288,000 bytes).
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import run_kvprof

from kvprof.analysis.scenario import KV_BYTES, ScenarioSpec, write_scenario
from kvprof.analysis.views.render import fmt_sig, html_table, md_table

SMALL_KV = 131_072
NAN_WORD = re.compile(r"\bnan\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def loopback(tmp_path_factory):
    spec = ScenarioSpec(steady_handshake_ms=0.0, kv_bytes=SMALL_KV)
    return write_scenario(tmp_path_factory.mktemp("loopback"), spec)


@pytest.fixture(scope="module")
def outputs(loopback, tmp_path_factory):
    root = tmp_path_factory.mktemp("loopback-out")
    texts = {}
    for fmt in ("md", "json", "html"):
        out = root / f"r.{fmt}"
        r = run_kvprof("report", "--traces", loopback.traces, "--samples", loopback.samples,
                       "--aiperf", loopback.aiperf, "--microbench", loopback.microbench,
                       "--out", out, "--format", fmt)
        assert r.returncode == 0, r.stderr
        texts[fmt] = out.read_text()
    return texts


def test_no_nan_in_any_format(outputs):
    for fmt, text in outputs.items():
        assert not NAN_WORD.search(text), f"nan in the {fmt} report"
    # Strict JSON: NaN / Infinity are not JSON and must come out as null.
    json.loads(outputs["json"], parse_constant=lambda c: pytest.fail(f"{c} in report JSON"))


def test_later_requests_that_paid_no_handshake_say_so(outputs):
    d = json.loads(outputs["json"])
    hs = next(c for c in d["verdict"] if c["cause"] == "kv.handshake")
    assert hs["headline"].startswith("300.0 ms on the first request per prefill->decode pair "
                                     "(4 requests)")
    assert hs["evidence"][0].startswith("the first request of each pair paid median 300.0 ms "
                                        "(4 requests of 24")
    assert hs["evidence"][1] == "the 20 later requests paid none"
    assert hs["evidence"][2] == "amortised over all 24 requests: mean 50.0 ms per request"
    assert "the 20 later requests paid none" in outputs["md"]


def test_small_rates_keep_significant_digits(outputs):
    d = json.loads(outputs["json"])
    # InfiniBand pairs move 131,072 bytes in 20 ms: 0.0065536 GB/s, shown as 0.00655.
    ib_gbps = SMALL_KV / 0.020 / 1e9
    assert fmt_sig(ib_gbps) == "0.00655"
    evidence = " ".join(next(c for c in d["verdict"] if c["cause"] == "kv.transfer")["evidence"])
    assert "infiniband: 18 transfers, median 20.0 ms at 0.00655 GB/s" in evidence
    assert "0.00655" in outputs["md"] and "0.00655" in outputs["html"]
    tcp_row = next(line for line in outputs["md"].splitlines()
                   if line.startswith("| prefill-1 -> decode-3 |"))
    assert tcp_row.endswith("| 0.000312 |")  # transfer GB/s: 131,072 bytes in 420 ms
    for fmt in ("md", "html"):
        assert not re.search(r"\b0\.0+ GB/s|\b0\.0x", outputs[fmt]), fmt


def test_microbench_of_another_geometry_is_scaled_not_compared(outputs):
    d = json.loads(outputs["json"])
    cmp = d["should_cost"]["against_traces"]
    assert cmp["same_geometry"] is False and cmp["basis"] == "scaled estimate"
    assert cmp["microbench_bytes"] == KV_BYTES and cmp["traced_bytes"] == SMALL_KV
    # Steady state of the scenario's microbench: its bytes over the summed step medians.
    steady = KV_BYTES / (14.1 / 1e3) / 1e9
    assert cmp["steady_gbps"] == pytest.approx(steady)
    assert cmp["expected_ms"] == pytest.approx(SMALL_KV / (steady * 1e9) * 1e3)
    assert cmp["ratio"] == pytest.approx(20.0 / cmp["expected_ms"])
    line = d["should_cost"]["summary"]
    assert line.startswith("scaled estimate:") and "524,288,000 bytes" in line
    assert "131,072 bytes" in line and f"{fmt_sig(cmp['expected_ms'])} ms" in line
    assert "scaled estimate for the traced 131,072 bytes" in outputs["md"]
    assert "scaled estimate" in outputs["html"]


def test_same_geometry_compares_milliseconds(golden, tmp_path):
    out = tmp_path / "r.json"
    r = run_kvprof("report", "--traces", golden.traces, "--aiperf", golden.aiperf,
                   "--microbench", golden.microbench, "--out", out, "--format", "json")
    assert r.returncode == 0, r.stderr
    cmp = json.loads(out.read_text())["should_cost"]["against_traces"]
    assert cmp["same_geometry"] is True and cmp["basis"] == "measured"
    assert cmp["expected_ms"] == pytest.approx(14.1)
    assert cmp["ratio"] == pytest.approx(20.0 / 14.1)


@pytest.mark.parametrize(("value", "text"), [
    (0.021345, "0.0213"), (26.2, "26.2"), (450.0, "450"), (1.2483, "1.25"), (0.0, "0"),
    (12345.6, "12,346"), (float("nan"), "no data"), (None, "no data")])
def test_fmt_sig(value, text):
    assert fmt_sig(value) == text


def test_empty_tables_become_a_sentence():
    assert md_table(["a", "b"], [], empty="Nothing here.") == "Nothing here."
    assert html_table(["a", "b"], [], empty="Nothing here.") == (
        '<p class="note">Nothing here.</p>')
    assert "<table>" in html_table(["a"], [[1]])
