"""The TTFT breakdown on the golden scenario, against values worked out by hand.

Scenario (kvprof.analysis.scenario): 24 requests; request k uses prefill-(k%2), decode-(k%4);
the pair prefill-1 -> decode-3 (k = 3, 7, 11, 15, 19, 23) transfers over TCP in 420 ms, the
others over InfiniBand in 20 ms; the first request of each pair (k = 0..3) pays a 300 ms
handshake, later ones 0.5 ms. Engine spans: queue 5 + compute 180 + serialize 2, then (20 ms
later, on the decode node) handshake, transfer, deserialize 3, decode queue 4, first step 25.
aiperf TTFT = 8 (client -> prefill) + 214 + 20 (hand-over) + handshake + transfer + 3 + 4 +
25 + 3 (first token -> client). With engine spans only, no leg covers the 8, 20 and 3 ms:
unaccounted = 31 ms for every request. With ``full_path`` (router and API-server spans) every
one of them is a leg and nothing is unaccounted.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_kvprof

from kvprof import semconv as sc
from kvprof.analysis.breakdown import (
    LEG,
    SOURCE_ID,
    SOURCE_SPANS,
    SOURCE_WINDOW,
    build_breakdown,
)
from kvprof.analysis.loaders.aiperf import load_aiperf_records
from kvprof.analysis.loaders.traces import load_spans
from kvprof.analysis.scenario import (
    AFTER_FIRST_TOKEN,
    BEFORE_PREFILL,
    HANDOVER,
    ScenarioSpec,
    write_scenario,
)
from kvprof.analysis.views.summaries import leg_stats, pair_view, percentile_view, phase_stats
from kvprof.analysis.views.verdict import rank_by_level, rank_causes

FIXED = 5 + 180 + 2 + 3 + 4 + 25


def expected_ttft(k: int) -> float:
    handshake = 300.0 if k < 4 else 0.5
    transfer = 420.0 if k % 4 == 3 else 20.0
    return 8 + FIXED + 20 + handshake + transfer + 3


def key(k: int) -> str:
    return f"cmpl-{k:08x}-aaaa-4bbb-8ccc-{k:012x}-0"


@pytest.fixture(scope="module")
def bd(golden, golden_spans):
    return build_breakdown(golden_spans.spans, load_aiperf_records(golden.aiperf))


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The same deployment with every leg traced (router + API servers)."""
    sc_ = write_scenario(tmp_path_factory.mktemp("full"), ScenarioSpec(full_path=True),
                         samples=False)
    return build_breakdown(load_spans(sc_.traces).spans, load_aiperf_records(sc_.aiperf))


def test_every_request_is_joined_even_without_traceparent(bd):
    req = bd.requests
    # 24 requests, not 26: the last two decode sides lost the traceparent (own trace id) and
    # are joined by request id.
    assert len(req) == 24
    assert req[sc.SPAN_KV_TRANSFER].notna().all() and req[sc.SPAN_PREFILL_COMPUTE].notna().all()
    assert (req["ttft_source"] == SOURCE_ID).all()
    assert (req["chain"] == "disaggregated").all()
    assert set(req["x_request_id"]) == {key(k)[5:-2] for k in range(24)}


def test_legs_ttft_and_unaccounted_per_request(bd):
    req = bd.requests.set_index("key")
    for k in range(24):
        row = req.loc[key(k)]
        assert row[LEG + "prefill.scheduled"] == pytest.approx(5.0)
        assert row[LEG + "prefill.first_token"] == pytest.approx(180.0)
        assert row[LEG + "kv.serialize.end"] == pytest.approx(2.0)
        assert row[LEG + "kv.load.start"] == pytest.approx(0.0)
        assert row[LEG + "kv.handshake.end"] == pytest.approx(300.0 if k < 4 else 0.5)
        assert row[LEG + "kv.transfer.end"] == pytest.approx(420.0 if k % 4 == 3 else 20.0)
        assert row[LEG + "kv.deserialize.end"] == pytest.approx(3.0)
        assert row[LEG + "decode.scheduled"] == pytest.approx(4.0)
        assert row[LEG + "decode.first_token"] == pytest.approx(25.0)
        # No router or API-server spans: those legs are not there, their time is a gap.
        assert pd_isna(row[LEG + "router.recv"]) and pd_isna(row[LEG + "decode.api.recv"])
        assert row[sc.SPAN_KV_HOLD] == pytest.approx(row[sc.SPAN_KV_HANDSHAKE] + 20
                                                     + row[sc.SPAN_KV_TRANSFER] + 1)
        assert row["ttft_ms"] == pytest.approx(expected_ttft(k))
        assert row["stacked_ms"] == pytest.approx(expected_ttft(k) - 31)
        assert row["unaccounted_ms"] == pytest.approx(31.0)
        assert row["stacked_ms"] + row["unaccounted_ms"] == pytest.approx(row["ttft_ms"],
                                                                          abs=1e-3)
        detail = row["unaccounted_detail"]
        assert detail.count("ms between") == 3
        assert "the router received it" in detail and "the decode API server received it" in detail
        assert row["first_contact"] == (k < 4)
        assert row["pair"] == f"prefill-{k % 2} -> decode-{k % 4}"
        assert row["kv_path"] == ("tcp" if k % 4 == 3 else "infiniband")
        assert row["transfer_status"] == "ok"
        assert row["transfer_gbps"] == pytest.approx(
            524_288_000 / ((420.0 if k % 4 == 3 else 20.0) / 1e3) / 1e9)


def pd_isna(v) -> bool:
    return v is None or v != v


def test_clock_skew_estimate_and_residuals(bd):
    # Decode clock = true + 40 ms. Bounds on off(decode) - off(prefill):
    #   the decode EngineCore gets the request after the prefill side serialized (20 ms
    #   hand-over): >= -(20 + 40) = -60
    #   hold ends after transfer end + 1 ms: <= 1 - 40 = -39
    # The estimate is the middle: (-60 - 39) / 2 = -49.5 ms.
    skew = bd.skew.to_dict()
    assert skew["reference_clock"] == "gpu-node-2"
    assert skew["offsets_ms"]["gpu-node-1"] == pytest.approx(-49.5)
    assert skew["offsets_ms"]["client"] == pytest.approx(0.0)
    pair = next(p for p in skew["pair_intervals"] if set(p["clocks"]) == {"gpu-node-1",
                                                                           "gpu-node-2"})
    assert pair["clocks"] == ["gpu-node-2", "gpu-node-1"]
    assert pair["lower_ms"] == pytest.approx(-60.0) and pair["upper_ms"] == pytest.approx(-39.0)
    # Raw clocks break "hold outlasts transfer" and put the client's first bytes before the
    # decode engine made them (40 ms ahead): 2 x 24; corrected, nothing is left.
    assert skew["violations_before_correction"] == 48
    assert skew["residual_violations"] == 0


def test_pair_estimate_moves_a_clock_only_as_far_as_causality_proves():
    import numpy as np

    from kvprof.analysis import skew as sk

    ms = 1e6
    # 0 inside the interval: the raw clocks break nothing, however lopsided the slack
    # (0.2 ms out, 5 ms back): no shift, where a midpoint would invent 2.4 ms.
    lows, highs = np.array([-0.2 * ms, -np.inf]), np.array([np.inf, 5 * ms])
    assert sk.pair_estimate(-0.2 * ms, 5 * ms, lows, highs) == (0.0, sk.NO_SKEW)
    # Proven apart (40 ms skew, 21 ms of slack): the middle of what is feasible.
    assert sk.pair_estimate(-60 * ms, -39 * ms, np.array([-60 * ms]), np.array([-39 * ms])
                            ) == (-49.5 * ms, sk.MIDPOINT)
    assert sk.pair_estimate(3 * ms, np.inf, np.array([3 * ms]), np.array([np.inf])
                            ) == (3 * ms, sk.ONE_SIDED)
    # Contradictory: one odd lower bound of 4.7 ms against 50 upper bounds near 0.1 ms. The
    # shift breaking the bounds least stays at the majority's edge.
    lows = np.r_[4.7 * ms, np.full(50, -0.5 * ms)]
    highs = np.r_[np.inf, np.linspace(0.1, 3, 50) * ms]
    d, how = sk.pair_estimate(lows.max(), highs.min(), lows, highs)
    assert how == sk.LEAST_BROKEN and d == pytest.approx(0.1 * ms)
    # Contradiction spread evenly: nearest 0 among the equally good shifts.
    d, _ = sk.pair_estimate(1 * ms, -1 * ms, np.array([1 * ms, -np.inf]),
                            np.array([np.inf, -1 * ms]))
    assert d == 0.0


def test_full_path_every_leg_is_traced_and_nothing_is_unaccounted(full):
    req = full.requests.set_index("key")
    assert len(req) == 24
    for k in range(24):
        row = req.loc[key(k)]
        assert row["unaccounted_ms"] == pytest.approx(0.0, abs=0.01), row["unaccounted_detail"]
        assert row["stacked_ms"] == pytest.approx(expected_ttft(k), abs=0.01)
        # The 8 ms before the prefill, leg by leg (the router's clock is corrected).
        before = [row[LEG + m] for m in ("router.recv", "router.prefill.send",
                                         "prefill.api.recv", "prefill.api.input",
                                         "prefill.api.handoff", "prefill.core.arrive")]
        # The client's clock is placed by the NTP midpoint of its 2 ms out and 0.5 ms back
        # legs: 0.75 ms off; everything else sits within a quarter millisecond.
        assert before[0] == pytest.approx(BEFORE_PREFILL[0] - 0.75, abs=0.01)
        assert before[1:] == pytest.approx(BEFORE_PREFILL[1:], abs=0.26)
        assert sum(before) == pytest.approx(8.0 - 0.75, abs=0.01)
        hand = [row[LEG + m] for m in ("prefill.api.output", "prefill.api.answered",
                                       "router.prefill.done", "router.decode.send",
                                       "decode.api.recv", "decode.api.input",
                                       "decode.api.handoff", "decode.core.arrive")]
        assert hand[0] == pytest.approx(HANDOVER[0]) and hand[5:] == pytest.approx(
            HANDOVER[5:])  # same-clock legs are exact
        # The decode node's clock comes from the router's 1 ms out / 0.5 ms back: 0.25 ms off.
        assert sum(hand) == pytest.approx(20.0 - 0.25, abs=0.01)
        after = [row[LEG + m] for m in ("decode.api.output", "decode.api.answered",
                                        "router.first.read", "router.first.write",
                                        "client.first")]
        assert sum(after) == pytest.approx(3.0 + 0.75 + 0.25, abs=0.01)
        assert after[:2] == pytest.approx(AFTER_FIRST_TOKEN[:2])
    # Four clocks: the router's -25 ms is bounded from both sides by its calls to the engines.
    offsets = full.skew.to_dict()["offsets_ms"]
    assert offsets["frontend-0"] == pytest.approx(25.0, abs=0.6)
    assert offsets["gpu-node-1"] == pytest.approx(-40.0, abs=1.1)


def test_proxy_forwarding_only_x_request_id_still_joins(tmp_path):
    sc_ = write_scenario(tmp_path, ScenarioSpec(full_path=True, router_own_trace=True),
                         samples=False)
    spans = load_spans(sc_.traces).spans
    router_traces = set(spans.loc[spans["name"] == sc.SPAN_ROUTER_REQUEST, "trace_id"])
    engine_traces = set(spans.loc[spans["name"] == sc.SPAN_PREFILL, "trace_id"])
    assert not router_traces & engine_traces  # no traceparent reached the engines
    bd_ = build_breakdown(spans, load_aiperf_records(sc_.aiperf))
    req = bd_.requests
    assert len(req) == 24
    assert req[LEG + "router.recv"].notna().all()
    assert req["unaccounted_ms"].abs().max() < 0.01
    # The report says where the trace was lost: both router hops, by id only, every request.
    hops = {h["hop"]: h for h in bd_.propagation}
    for hop in ("router -> prefill engine", "router -> decode engine"):
        assert (hops[hop]["same_trace"], hops[hop]["joined_by_id_only"]) == (0, 24)
    assert hops["prefill engine -> decode engine"]["same_trace"] == 22  # 2 broken on purpose
    assert any(n.startswith("router -> prefill engine: 24 of 24 request(s) kept their ids "
                            "but not their trace") for n in bd_.notes)
    assert not any("Propagation broke" in n for n in bd_.notes)


def _drop_context_to_decode(traces, rename):
    """Rewrite the decode engines' spans as a proxy that forwarded nothing would leave them:
    a trace of their own, vLLM's own request id, no X-Request-Id, no remote request id."""
    for path in traces.glob("decode-*.jsonl"):
        docs = [json.loads(line) for line in path.read_text().splitlines()]
        for doc in docs:
            for rs in doc["resourceSpans"]:
                for ss in rs["scopeSpans"]:
                    for span in ss["spans"]:
                        span["traceId"] = rename(span["traceId"])
                        if span["name"] == sc.SPAN_DECODE:  # its parent was the caller's
                            span.pop("parentSpanId", None)
                        attrs = []
                        for a in span.get("attributes", []):
                            if a["key"] in (sc.ATTR_REMOTE_REQUEST_ID, *sc.X_REQUEST_ID_KEYS):
                                continue
                            if a["key"] == sc.ATTR_REQUEST_ID:
                                a = {"key": a["key"], "value": {"stringValue": "cmpl-own-"
                                     + rename(a["value"]["stringValue"])[:12]}}
                            attrs.append(a)
                        span["attributes"] = attrs
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))


def test_the_report_names_the_hop_that_dropped_every_id(tmp_path):
    import hashlib

    sc_ = write_scenario(tmp_path, ScenarioSpec(full_path=True), samples=False)
    _drop_context_to_decode(sc_.traces, lambda v: hashlib.md5(v.encode()).hexdigest())
    bd_ = build_breakdown(load_spans(sc_.traces).spans, load_aiperf_records(sc_.aiperf))
    hops = {h["hop"]: h for h in bd_.propagation}
    pd_hop = hops["prefill engine -> decode engine"]
    assert (pd_hop["same_trace"], pd_hop["joined_by_id_only"]) == (0, 0)
    assert (pd_hop["upstream_without_downstream"], pd_hop["downstream_without_upstream"]) == (
        24, 24)
    assert hops["router -> prefill engine"]["same_trace"] == 24  # the first hop was fine
    broke = [n for n in bd_.notes if n.startswith("Propagation broke at ")]
    assert any(n.startswith("Propagation broke at prefill engine -> decode engine: 24 "
                            "prefill engine request(s) found no decode engine request; 24 "
                            "decode engine request(s) found no prefill engine request") and
               "kv_transfer_params" in n for n in broke)
    assert any(n.startswith("Propagation broke at router -> decode engine") for n in broke)
    # The decode side's rows stand alone: 24 joined requests plus 24 orphans.
    assert len(bd_.requests) == 48
    assert hops["client -> router"]["joined_by_id_only"] == 24
    assert hops["client -> router"]["downstream_without_upstream"] == 24


def test_propagation_in_the_report(tmp_path, golden):
    out = tmp_path / "r.md"
    r = run_kvprof("report", "--traces", golden.traces, "--aiperf", golden.aiperf,
                   "--format", "md", "--out", out)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "## Trace propagation, hop by hop" in text
    assert ("| prefill engine -> decode engine | kv_transfer_params (traceparent, "
            "remote_request_id) | 24 | 22 | 2 | 0 | 0 |") in text


def test_a_transfer_whose_lease_expired_is_reported_failed(tmp_path):
    """The prefill worker's kv.lease_expired span (its NIXL send lease ran out before the
    decode side read the KV) turns that request's transfer into a failure, with the reason,
    even though the decode side's kv.transfer span ended normally."""
    sc_ = write_scenario(tmp_path, ScenarioSpec(), samples=False)
    spans = load_spans(sc_.traces).spans
    victim = spans[(spans["name"] == sc.SPAN_PREFILL)].iloc[5]
    t = int(victim["end_ns"])
    doc = {"resourceSpans": [{"resource": {"attributes": [
        {"key": sc.RES_SERVICE_NAME, "value": {"stringValue": "vllm-prefill"}},
        {"key": sc.RES_HOST_NAME, "value": {"stringValue": "gpu-node-2"}}]},
        "scopeSpans": [{"spans": [{
            "traceId": victim["trace_id"], "spanId": "00000000000fee01",
            "parentSpanId": victim["span_id"], "name": sc.SPAN_KV_LEASE_EXPIRED,
            "startTimeUnixNano": str(t), "endTimeUnixNano": str(t),
            "status": {"code": 2, "message": "NIXL send lease expired"},
            "attributes": [
                {"key": sc.ATTR_REQUEST_ID, "value": {"stringValue": victim["request_id"]}},
                {"key": sc.ATTR_ROLE, "value": {"stringValue": sc.ROLE_PREFILL}},
                {"key": sc.ATTR_FAILURE, "value": {"stringValue": "lease_expired"}}]}]}]}]}
    (sc_.traces / "prefill-worker.jsonl").write_text(json.dumps(doc) + "\n")
    req = build_breakdown(load_spans(sc_.traces).spans,
                          load_aiperf_records(sc_.aiperf)).requests.set_index("key")
    status = req["transfer_status"]
    assert status[victim["request_id"]].startswith("lease expired: ")
    assert (status.drop(victim["request_id"]) == "ok").all()


def test_percentile_view_uses_nearest_rank(bd):
    # Sorted TTFTs: 15 x 270.5 (steady IB), 3 x 570 (first-contact IB), 5 x 670.5 (steady
    # TCP), 1 x 970 (first-contact TCP). Nearest rank: p50 -> 12th, p90 -> 22nd, p99 -> 24th.
    view = {v["percentile"]: v for v in percentile_view(bd.requests)}
    assert view[50]["ttft_ms"] == pytest.approx(270.5)
    assert view[90]["ttft_ms"] == pytest.approx(670.5)
    assert view[99]["ttft_ms"] == pytest.approx(970.0)
    assert view[99]["key"] == key(3)
    assert view[99]["stages_ms"]["kv.handshake"] == pytest.approx(300.0)
    assert sum(view[99]["stages_ms"].values()) == pytest.approx(970.0)
    assert sum(view[99]["legs_ms"].values()) == pytest.approx(970.0)


def test_phase_stats_leg_stats_and_pairs(bd):
    stats = {s["phase"]: s for s in phase_stats(bd.requests)}
    assert stats[sc.SPAN_KV_TRANSFER]["mean_ms"] == pytest.approx((18 * 20 + 6 * 420) / 24)
    assert stats[sc.SPAN_KV_HANDSHAKE]["mean_ms"] == pytest.approx((4 * 300 + 20 * 0.5) / 24)
    assert stats[sc.SPAN_KV_TRANSFER]["p50_ms"] == pytest.approx(20.0)
    legs = {x["leg"]: x for x in leg_stats(bd.requests)}
    mean_ttft = sum(expected_ttft(k) for k in range(24)) / 24
    assert legs["kv.transfer.end"]["share_of_ttft"] == pytest.approx(120.0 / mean_ttft)
    assert list(legs)[-1] == "unaccounted"
    assert legs["unaccounted"]["mean_ms"] == pytest.approx(31.0)
    pairs = {p["pair"]: p for p in pair_view(bd.requests)}
    tcp = pairs["prefill-1 -> decode-3"]
    assert tcp["path"] == "tcp" and tcp["requests"] == 6
    assert tcp["first_ttft_ms"] == pytest.approx(expected_ttft(3))
    assert tcp["steady_ttft_ms"] == pytest.approx(expected_ttft(7))
    assert pairs["prefill-0 -> decode-0"]["steady_handshake_ms"] == pytest.approx(0.5)


def test_verdict_ranks_stages_and_lists_unaccounted_last(bd):
    causes = rank_causes(bd.requests)
    order = [c["cause"] for c in causes]
    # prefill compute 180, transfer 120, handshake 50.4, first decode step 25, ...
    assert order[:4] == ["prefill.compute", "kv.transfer", "kv.handshake", "decode.compute"]
    assert order[-1] == "unaccounted"
    mean_ttft = sum(expected_ttft(k) for k in range(24)) / 24
    transfer = causes[1]
    assert transfer["share"] == pytest.approx(120.0 / mean_ttft)
    assert transfer["headline"] == "moving the KV took 120.0 ms per request"
    text = " ".join(transfer["evidence"])
    assert "tcp: 6 transfers" in text and "prefill-1 -> decode-3" in text
    hs = causes[2]["evidence"]
    assert hs[0].startswith("the first request of each pair paid median 300.0 ms (4 requests")
    assert "20 of the 20 later requests paid one too, median 0.5 ms" in hs[1]
    assert causes[2]["headline"].startswith("300.0 ms on the first request per")
    unacc = causes[-1]
    assert unacc["mean_ms"] == pytest.approx(31.0) and not unacc["estimate"]
    assert any("milestones are missing" in e for e in unacc["evidence"])


def test_verdict_per_concurrency_level(tmp_path):
    sc_ = write_scenario(tmp_path, ScenarioSpec(full_path=True), samples=False)
    lines = (sc_.aiperf / "profile_export.jsonl").read_text().splitlines()
    (sc_.aiperf / "profile_export.jsonl").unlink()
    # Two "levels": the first 12 requests at concurrency 1, the rest at 4.
    for level, part in ((1, lines[:12]), (4, lines[12:])):
        (sc_.aiperf / f"c{level}").mkdir()
        (sc_.aiperf / f"c{level}" / "profile_export.jsonl").write_text("\n".join(part) + "\n")
    req = build_breakdown(load_spans(sc_.traces).spans,
                          load_aiperf_records(sc_.aiperf)).requests
    assert sorted(req["concurrency"].unique()) == [1, 4]
    levels = rank_by_level(req)
    assert [lv["concurrency"] for lv in levels] == [1, 4]
    for lv in levels:
        assert lv["requests"] == 12
        assert lv["top"][0]["cause"] == "prefill.compute"
        assert lv["unaccounted_share"] == pytest.approx(0.0, abs=1e-4)


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
    assert req.loc[key(3), "ttft_ms"] == pytest.approx(970)
    assert any("time window" in n for n in bd.notes)
    assert rank_causes(bd.requests)[-1]["estimate"]  # unaccounted now rests on an estimate


def test_records_of_another_run_are_not_matched_by_time(golden_spans, tmp_path):
    """A record sent long before any traced request is not that request's record."""
    rec = {"metadata": {"x_request_id": "unrelated", "request_start_ns": 1_000_000_000,
                        "benchmark_phase": "profiling"},
           "metrics": {"time_to_first_token": {"value": 50.0, "unit": "ms"}}}
    (tmp_path / "profile_export.jsonl").write_text(json.dumps(rec) + "\n")
    req = build_breakdown(golden_spans.spans, load_aiperf_records(tmp_path)).requests
    assert (req["ttft_source"] == SOURCE_SPANS).all()


def test_without_aiperf_the_path_envelope_is_an_estimate(golden_spans):
    bd = build_breakdown(golden_spans.spans)
    req = bd.requests.set_index("key")
    # True envelope of request 0 (prefill core -> decode first token):
    # 5+180+2+20+300+20+3+4+25 = 559 ms; the skew estimate is 9.5 ms off the true 40 ms, so
    # the corrected envelope reads 549.5 ms, the gap 20 - 9.5.
    row = req.loc[key(0)]
    assert row["ttft_ms"] == pytest.approx(549.5)
    assert row["ttft_source"] == SOURCE_SPANS
    assert row["unaccounted_ms"] == pytest.approx(20 - 9.5)


def test_aggregated_engine_requests(tmp_path):
    # What the probes write for an aggregated engine: vllm.request with queue, compute and
    # first-step children, all with kvprof.role=aggregated.
    from kvprof.analysis.loaders.otlp import records_to_otlp

    t0, ms = 1_761_000_000_000_000_000, 1_000_000
    res = {"service.name": "vllm-agg", "k8s.node.name": "gpu-node-1",
           "kvprof.engine_id": "agg-0"}

    def span(i, name, start, end, parent=""):
        return {"trace_id": f"{1:032x}", "span_id": f"{i:016x}", "parent_span_id": parent,
                "name": name, "kind": 1, "start_ns": t0 + start * ms, "end_ns": t0 + end * ms,
                "attributes": {"kvprof.role": "aggregated", "kvprof.request_id": "cmpl-a-0"},
                "resource": res}

    records = [span(1, sc.SPAN_REQUEST, 0, 5000), span(2, sc.SPAN_PREFILL_QUEUE, 0, 10, "1" * 16),
               span(3, sc.SPAN_PREFILL_COMPUTE, 10, 215, "1" * 16),
               span(4, sc.SPAN_DECODE_FIRST_TOKEN, 190, 215, "1" * 16)]
    (tmp_path / "agg.json").write_text(json.dumps(records_to_otlp(records)))
    req = build_breakdown(load_spans(tmp_path / "agg.json").spans).requests.iloc[0]
    assert req["pair"] == "agg-0 -> (aggregated)"
    assert req["chain"] == "aggregated"
    assert req["stacked_ms"] == pytest.approx(215.0) and req["ttft_ms"] == pytest.approx(215.0)
    assert req[LEG + "engine.first_token"] == pytest.approx(205.0)
