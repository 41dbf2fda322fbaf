"""The TTFT breakdown on the golden scenario, against values worked out by hand.

Scenario (kvprof.analysis.scenario): 24 requests; request k uses prefill-(k%2), decode-(k%4);
the pair prefill-1 -> decode-3 (k = 3, 7, 11, 15, 19, 23) transfers over TCP in 420 ms, the
others over InfiniBand in 20 ms; the first request of each pair (k = 0..3) pays a 300 ms
handshake, later ones 0.5 ms. Fixed phases: queue 5 + compute 180 + serialize 2 +
deserialize 3 + decode queue 4 + first step 25 = 219 ms. aiperf TTFT = 8 (client->prefill)
+ 219 + 20 (hand-over) + handshake + transfer + 3 (first token -> client), so
unaccounted = 8 + 20 + 3 = 31 ms for every request.
"""

from __future__ import annotations

import json

import pytest

from kvprof import semconv as sc
from kvprof.analysis.aiperf import load_aiperf_records
from kvprof.analysis.breakdown import (
    SOURCE_ID,
    SOURCE_SPANS,
    SOURCE_WINDOW,
    build_breakdown,
    pair_view,
    percentile_view,
    phase_stats,
)
from kvprof.analysis.verdict import rank_causes

FIXED = 5 + 180 + 2 + 3 + 4 + 25


def expected_ttft(k: int) -> float:
    handshake = 300.0 if k < 4 else 0.5
    transfer = 420.0 if k % 4 == 3 else 20.0
    return 8 + FIXED + 20 + handshake + transfer + 3


@pytest.fixture(scope="module")
def bd(golden, golden_spans):
    return build_breakdown(golden_spans.spans, load_aiperf_records(golden.aiperf))


def test_every_request_is_joined_even_without_traceparent(bd):
    req = bd.requests
    # 24 requests, not 26: the last two decode sides lost the traceparent (own trace id) and
    # are joined by request id.
    assert len(req) == 24
    assert req[sc.SPAN_KV_TRANSFER].notna().all() and req[sc.SPAN_PREFILL_COMPUTE].notna().all()
    assert (req["ttft_source"] == SOURCE_ID).all()


def test_phases_ttft_and_unaccounted_per_request(bd):
    req = bd.requests.set_index("key")
    for k in range(24):
        row = req.loc[f"cmpl-{k:08x}-aaaa-4bbb-8ccc-{k:012x}-0"]
        assert row[sc.SPAN_PREFILL_QUEUE] == pytest.approx(5.0)
        assert row[sc.SPAN_PREFILL_COMPUTE] == pytest.approx(180.0)
        assert row[sc.SPAN_KV_HANDSHAKE] == pytest.approx(300.0 if k < 4 else 0.5)
        assert row[sc.SPAN_KV_TRANSFER] == pytest.approx(420.0 if k % 4 == 3 else 20.0)
        assert row[sc.SPAN_KV_HOLD] == pytest.approx(row[sc.SPAN_KV_HANDSHAKE] + 20
                                                     + row[sc.SPAN_KV_TRANSFER] + 1)
        assert row["ttft_ms"] == pytest.approx(expected_ttft(k))
        assert row["stacked_ms"] == pytest.approx(expected_ttft(k) - 31)
        assert row["unaccounted_ms"] == pytest.approx(31.0)
        assert row["first_contact"] == (k < 4)
        assert row["pair"] == f"prefill-{k % 2} -> decode-{k % 4}"
        assert row["kv_path"] == ("tcp" if k % 4 == 3 else "infiniband")
        assert row["transfer_gbps"] == pytest.approx(
            524_288_000 / ((420.0 if k % 4 == 3 else 20.0) / 1e3) / 1e9)


def test_clock_skew_estimate_and_residuals(bd):
    # Decode clock = true + 40 ms. Bounds on off(decode) - off(prefill):
    #   transfer starts >= prefill done: >= -(20 + handshake + 40) -> tightest -60.5 (0.5 ms)
    #   hold ends after transfer end + 1 ms: <= 1 - 40 = -39
    # The estimate is the middle: (-60.5 - 39) / 2 = -49.75 ms.
    skew = bd.skew.to_dict()
    assert skew["reference_clock"] == "gpu-node-2"
    assert skew["offsets_ms"]["gpu-node-1"] == pytest.approx(-49.75)
    pair = skew["pair_intervals"][0]
    assert pair["clocks"] == ["gpu-node-2", "gpu-node-1"]
    assert pair["lower_ms"] == pytest.approx(-60.5) and pair["upper_ms"] == pytest.approx(-39.0)
    assert pair["estimate_ms"] == pytest.approx(-49.75)
    # Raw clocks break "hold outlasts transfer" on all 24 requests; corrected, nothing is left.
    assert skew["violations_before_correction"] == 24
    assert skew["residual_violations"] == 0


def test_percentile_view_uses_nearest_rank(bd):
    # Sorted TTFTs: 15 x 270.5 (steady IB), 3 x 570 (first-contact IB), 5 x 670.5 (steady
    # TCP), 1 x 970 (first-contact TCP). Nearest rank: p50 -> 12th, p90 -> 22nd, p99 -> 24th.
    view = {v["percentile"]: v for v in percentile_view(bd.requests)}
    assert view[50]["ttft_ms"] == pytest.approx(270.5)
    assert view[90]["ttft_ms"] == pytest.approx(670.5)
    assert view[99]["ttft_ms"] == pytest.approx(970.0)
    assert view[99]["key"] == "cmpl-00000003-aaaa-4bbb-8ccc-000000000003-0"
    assert view[99]["phases_ms"][sc.SPAN_KV_HANDSHAKE] == pytest.approx(300.0)
    assert sum(view[99]["phases_ms"].values()) == pytest.approx(970.0)


def test_phase_stats_and_pairs(bd):
    stats = {s["phase"]: s for s in phase_stats(bd.requests)}
    assert stats[sc.SPAN_KV_TRANSFER]["mean_ms"] == pytest.approx((18 * 20 + 6 * 420) / 24)
    assert stats[sc.SPAN_KV_HANDSHAKE]["mean_ms"] == pytest.approx((4 * 300 + 20 * 0.5) / 24)
    assert stats[sc.SPAN_KV_TRANSFER]["p50_ms"] == pytest.approx(20.0)
    pairs = {p["pair"]: p for p in pair_view(bd.requests)}
    tcp = pairs["prefill-1 -> decode-3"]
    assert tcp["path"] == "tcp" and tcp["requests"] == 6
    assert tcp["first_ttft_ms"] == pytest.approx(expected_ttft(3))
    assert tcp["steady_ttft_ms"] == pytest.approx(expected_ttft(7))
    assert pairs["prefill-0 -> decode-0"]["steady_handshake_ms"] == pytest.approx(0.5)


def test_verdict_ranks_transfer_then_handshake_then_handover(bd):
    causes = rank_causes(bd.requests)
    assert [c["cause"] for c in causes[:3]] == [sc.SPAN_KV_TRANSFER, sc.SPAN_KV_HANDSHAKE,
                                                "unaccounted"]
    overhead = 120.0 + 1210 / 24 + 31 + 4 + 3 + 2
    assert causes[0]["share"] == pytest.approx(120.0 / overhead)
    text = " ".join(causes[0]["evidence"])
    assert "tcp: 6 transfers" in text and "prefill-1 -> decode-3" in text
    hs = causes[1]["evidence"]
    assert hs[0].startswith("the first request of each pair paid median 300.0 ms (4 requests")
    assert "20 of the 20 later requests paid one too, median 0.5 ms" in hs[1]
    assert causes[1]["headline"].startswith("300.0 ms on the first request per")
    assert not causes[2]["estimate"]  # TTFT from aiperf by request id: measured


def test_time_window_fallback_when_ids_do_not_match(golden, golden_spans, tmp_path):
    lines = (golden.aiperf / "profile_export.jsonl").read_text().splitlines()
    out = []
    for line in lines:
        rec = json.loads(line)
        rec["metadata"]["x_request_id"] = "other-" + rec["metadata"]["x_request_id"][:8]
        out.append(json.dumps(rec))
    (tmp_path / "profile_export.jsonl").write_text("\n".join(out) + "\n")
    bd = build_breakdown(golden_spans.spans, load_aiperf_records(tmp_path))
    req = bd.requests.set_index("key")
    assert (req["ttft_source"] == SOURCE_WINDOW).all()
    assert req.loc["cmpl-00000003-aaaa-4bbb-8ccc-000000000003-0", "ttft_ms"] == pytest.approx(970)
    assert any("time window" in n for n in bd.notes)
    assert rank_causes(bd.requests)[2]["estimate"]  # unaccounted now rests on an estimate


def test_without_aiperf_the_span_envelope_is_an_estimate(golden_spans):
    bd = build_breakdown(golden_spans.spans)
    req = bd.requests.set_index("key")
    # True envelope of request 0: 5+180+2+20+300+20+3+4+25 = 559 ms; the skew estimate is
    # 9.75 ms off the true 40 ms, so the corrected envelope reads 549.25 ms.
    row = req.loc["cmpl-00000000-aaaa-4bbb-8ccc-000000000000-0"]
    assert row["ttft_ms"] == pytest.approx(549.25)
    assert row["ttft_source"] == SOURCE_SPANS
    assert row["unaccounted_ms"] == pytest.approx(20 - 9.75)


def test_aggregated_engine_requests(tmp_path):
    # What the probes write for an aggregated engine: vllm.request with queue, compute and
    # first-step children, all with kvprof.role=aggregated.
    from kvprof.analysis.otlp import records_to_otlp
    from kvprof.analysis.traces import load_spans

    t0, ms = 1_761_000_000_000_000_000, 1_000_000
    res = {"service.name": "vllm-agg", "k8s.node.name": "gpu-node-1",
           "kvprof.engine_id": "agg-0"}

    def span(i, name, start, end, parent=""):
        return {"trace_id": f"{1:032x}", "span_id": f"{i:016x}", "parent_span_id": parent,
                "name": name, "kind": 1, "start_ns": t0 + start * ms, "end_ns": t0 + end * ms,
                "attributes": {"kvprof.role": "aggregated", "kvprof.request_id": "cmpl-a-0"},
                "resource": res}

    records = [span(1, sc.SPAN_REQUEST, 0, 5000), span(2, sc.SPAN_PREFILL_QUEUE, 0, 10, "1" * 16),
               span(3, sc.SPAN_PREFILL_COMPUTE, 10, 190, "1" * 16),
               span(4, sc.SPAN_DECODE_FIRST_TOKEN, 190, 215, "1" * 16)]
    (tmp_path / "agg.json").write_text(json.dumps(records_to_otlp(records)))
    req = build_breakdown(load_spans(tmp_path / "agg.json").spans).requests.iloc[0]
    assert req["pair"] == "agg-0 -> (aggregated)"
    assert req["stacked_ms"] == pytest.approx(215.0) and req["ttft_ms"] == pytest.approx(215.0)
    assert req["unaccounted_ms"] == pytest.approx(0.0)
