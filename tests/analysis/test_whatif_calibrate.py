"""The what-if model on a real recorded demo run (tests/fixtures/demo): calibration, replay,
hold-out validation, the report's ``whatif`` section, and the seed model given as inputs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from kvprof.analysis.whatif.calibrate import LEG, SIMULATED, WIRE_LEG, calibrate, load_levels
from kvprof.analysis.whatif.compare import measured, predict, validate

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "tests" / "fixtures" / "demo" / "run"
SEED = REPO / "examples" / "whatif" / "seed-h200.json"


@pytest.fixture(scope="module", params=["disagg", "agg"])
def run(request):
    from kvprof.analysis.breakdown import build_breakdown
    from kvprof.analysis.loaders.aiperf import load_aiperf_records
    from kvprof.analysis.loaders.traces import load_spans

    spans = load_spans(str(RUN / "traces" / request.param), None, "1h")
    ap = load_aiperf_records(RUN / "aiperf" / request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        req = build_breakdown(spans.spans, ap, None, True).requests
    return request.param, req, ap


def test_levels_replay_aiperf_load(run):
    _, _, ap = run
    loads = load_levels(ap)
    assert sorted(loads) == [1, 2, 4]
    for c, ld in loads.items():
        assert (ld.concurrency, ld.requests, ld.warmup) == (c, 8, 1)
        assert set(ld.isl) == {512} and set(ld.osl) == {16}


def test_calibration_reads_the_run(run):
    mode, req, ap = run
    cal = calibrate(req, ap, levels=[1, 2], link_gbytes_per_s=4.5, link_source="microbench")
    assert cal.calibrated_on == [1, 2]
    assert len(cal.overheads.samples) == 16  # 8 measured requests per level, warm-up left out
    assert any("one input length" in t for t in cal.thin)
    if mode == "disagg":
        assert cal.kind == "disaggregated" and cal.workers == {"prefill": 1, "decode": 1}
        assert cal.kv_bytes_per_token == pytest.approx(131072 / 512)
        # The one NIXL handshake was paid by the warm-up request (first contact).
        warm = req[req["warmup"].astype(bool)]
        assert cal.handshake_ms == pytest.approx(warm[LEG + "kv.handshake.end"].dropna().iloc[0])
    else:
        assert cal.kind == "aggregated" and cal.workers == {"aggregated": 1}
        assert cal.kv_bytes_per_token == 0


def test_calibration_conserves_each_requests_ttft(run):
    # Overheads + the legs the simulator models + the modelled wire = the measured TTFT at the
    # lowest level: the cut loses or double-counts no leg. Above it, the step-boundary legs
    # are capped (their excess is a wait the simulator makes), so the sum can only be less.
    mode, req, ap = run
    rate = 4.5
    cal = calibrate(req, ap, levels=[1, 2], link_gbytes_per_s=rate)
    done = req[~req["warmup"].astype(bool) & req["concurrency"].isin([1, 2])]
    assert len(done) == len(cal.overheads.samples)
    lowest = 0
    for sample, (_, row) in zip(cal.overheads.samples, done.iterrows(), strict=True):
        sim = sum(float(row[LEG + n]) for n in SIMULATED
                  if LEG + n in row and row[LEG + n] == row[LEG + n])
        wire = 0.0
        if mode == "disagg" and row.get(LEG + WIRE_LEG) != row.get(LEG + WIRE_LEG):
            wire = min(float(row["kv_bytes"]) / (rate * 1e9) * 1e3,
                       float(row[LEG + "kv.transfer.end"]))
        if row["concurrency"] == 1:
            lowest += 1
            assert sum(sample) + sim + wire == pytest.approx(float(row["ttft_ms"]), abs=1e-3)
        else:
            assert sum(sample) + sim + wire <= float(row["ttft_ms"]) + 1e-3
    assert lowest == 8


def test_replay_reproduces_the_calibration_levels(run):
    # The lowest level (idle engines) must come back closely; the second within the model's
    # stated accuracy on this 2-core machine, where CPU contention it does not model grows.
    mode, req, ap = run
    cal = calibrate(req, ap, levels=[1, 2])
    loads = load_levels(ap)
    pred = predict(cal.deployment(), [loads[c] for c in (1, 2, 4)])
    meas = measured(req, "x")
    for c, bound in ((1, 0.15), (2, 0.45)):
        err = abs(pred[c].ttft_mean_ms - meas[c].ttft_mean_ms) / meas[c].ttft_mean_ms
        assert err < bound, (mode, c, pred[c], meas[c])


def test_validate_fills_the_report_section(run):
    mode, req, ap = run
    out = validate(req, ap)
    assert out["calibrated_on"] == [1, 2] and out["predicted_level"] == 4
    meas4 = req[~req["warmup"].astype(bool) & (req["concurrency"] == 4)]["ttft_ms"]
    assert out["measured_ttft_mean_ms"] == pytest.approx(meas4.mean())
    assert out["measured_ttft_p99_ms"] == pytest.approx(meas4.quantile(0.99))
    assert out["error_pct"] == pytest.approx(
        100 * (out["predicted_ttft_mean_ms"] / out["measured_ttft_mean_ms"] - 1))
    assert out["error_p99_pct"] == pytest.approx(
        100 * (out["predicted_ttft_p99_ms"] / out["measured_ttft_p99_ms"] - 1))
    assert "prediction" in out["label"]
    sources = [r["source"] for r in out["levels"]]
    assert sources == ["measured", "predicted"] * 3
    json.dumps(out)  # JSON-able as report.json needs


def test_seed_model_lands_near_the_seed_table():
    # The H200 service times in the file are derived from public specs, not fitted; the
    # aggregated deployment's measured mean TTFT must come out within 25% at C=1 and C=100.
    from kvprof.analysis.whatif.command import run_given

    out = run_given(SEED, [1, 100])
    rows = {(r["deployment"], r["concurrency"], r["source"]): r for r in out["rows"]}
    agg = "aggregated: 5 x TP2"
    for c in (1, 100):
        assert abs(rows[(agg, c, "predicted")]["error_mean_pct"]) <= 25
    dis = "disaggregated: 2 prefill TP1 + 4 decode TP2"
    assert abs(rows[(dis, 1, "predicted")]["error_mean_pct"]) <= 25
    assert out["summary"]["recommendation"]["100"] == agg


def test_step_records_fit_the_step_cost_and_say_where_thin():
    # Steps in load_steps' schema whose durations follow a known law: the least-squares fit
    # must give it back, per role, and name the batch sizes seen fewer than 5 times.
    import pandas as pd

    from kvprof.analysis.whatif.calibrate import _step_costs

    rows = []
    for i in range(40):
        tokens = 0 if i % 2 else 100 * (1 + i % 5)
        seqs = 1 + i % 4
        rows.append({"role": "prefill", "prefill_tokens": tokens or 50, "decode_seqs": 0,
                     "duration_ms": 2.0 + 0.05 * (tokens or 50)})
        rows.append({"role": "decode", "prefill_tokens": 0, "decode_seqs": seqs,
                     "duration_ms": 4.0 + 0.5 * seqs})
    rows.append({"role": "decode", "prefill_tokens": 0, "decode_seqs": 9,
                 "duration_ms": 4.0 + 0.5 * 9})
    steps = pd.DataFrame(rows)
    thin: list[str] = []
    costs, counts = _step_costs(steps, "disaggregated", thin)
    assert costs["prefill"].base_ms == pytest.approx(2.0)
    assert costs["prefill"].per_prefill_token_ms == pytest.approx(0.05)
    assert costs["decode"].base_ms == pytest.approx(4.0)
    assert costs["decode"].per_decode_seq_ms == pytest.approx(0.5)
    assert counts == {"prefill": 40, "decode": 41}
    assert any("batch size(s) [9]" in t for t in thin)
    assert any("up to 9" in t for t in thin)


def test_report_json_carries_the_whatif_section():
    from kvprof.analysis.pipeline import ReportInputs, build_report

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = build_report(ReportInputs(traces=str(RUN / "traces" / "disagg"),
                                         aiperf=RUN / "aiperf" / "disagg", one_clock=True),
                            with_plots=False).data
    w = data["whatif"]
    for key in ("calibrated_on", "predicted_level", "predicted_ttft_mean_ms",
                "measured_ttft_mean_ms", "error_pct", "predicted_ttft_p99_ms",
                "measured_ttft_p99_ms", "error_p99_pct"):
        assert w[key] is not None, key
    assert w["calibrated_on"] == [1, 2] and w["predicted_level"] == 4
    assert list(data).index("whatif") > list(data).index("requests")
    # The report's section: every predicted row says so, and the sentence gives both figures.
    from kvprof.analysis.views.whatif_view import whatif_table, whatif_text

    header, rows = whatif_table(data)
    assert [r[0] for r in rows] == [1, 1, 2, 2, 4, 4]
    assert [r[1] for r in rows] == ["measured", "predicted (model)"] * 3
    sentence = " ".join(whatif_text(data))
    assert "predict 4: predicted mean TTFT" in sentence and "not measurements" in sentence
    assert "Per leg at 4 (predicted - measured, mean ms per request): " in sentence


def _sweep(name: str, kind: str):
    from kvprof.analysis.breakdown import build_breakdown
    from kvprof.analysis.loaders.aiperf import load_aiperf_records
    from kvprof.analysis.loaders.traces import load_spans
    from kvprof.analysis.pipeline import load_steps_if_any
    from kvprof.analysis.whatif.calibrate import block_tokens_from_spans

    sweep = REPO / "tests" / "fixtures" / "whatif" / name
    spans = load_spans(str(sweep / "traces" / kind), None, "1h")
    ap = load_aiperf_records(sweep / "aiperf" / kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        req = build_breakdown(spans.spans, ap, None, True).requests
    steps = load_steps_if_any(spans.spans)
    assert steps is not None and len(steps) > 100
    return req, ap, steps, block_tokens_from_spans(spans.spans, ap)


def test_saturating_disaggregated_sweep_predicts_the_top_level():
    # A real disaggregated sweep to saturation on a quiet machine (1, 4, 16 users; one prefill
    # and one decode engine of 4 sequences each), with engine step records: calibrated on 1
    # and 4, the model must predict 16 within the goal (mean TTFT within 25%, p99
    # within 40%). Before helper 20c's changes (trimmed-mean costs with the kernel-build
    # steps in them, one step-ratio pool for both roles) it predicted +81% / +71% here.
    req, ap, steps, bt = _sweep("sweep-disagg", "disagg")
    out = validate(req, ap, steps, block_tokens=bt)
    cal = out["calibration"]
    assert cal["kind"] == "disaggregated" and cal["max_batch"] == 4
    assert cal["kv_blocks"] == {"prefill": 128, "decode": 128}
    assert out["calibrated_on"] == [1, 4] and out["predicted_level"] == 16
    assert abs(out["error_pct"]) <= 25, out
    assert abs(out["error_p99_pct"]) <= 40, out
    legs = out["predicted_legs_ms"]
    assert sum(legs.values()) == pytest.approx(out["predicted_ttft_mean_ms"])
    # The measured side of the per-leg comparison: the breakdown's legs in the model's
    # groups add up to the measured mean TTFT too.
    meas = out["measured_legs_ms"]
    assert sum(meas.values()) == pytest.approx(out["measured_ttft_mean_ms"], rel=1e-6)
    assert {"in", "prefill.queue", "prefill.compute", "mid", "kv.transfer", "decode.queue",
            "decode.compute", "out"} <= set(meas)


def test_saturating_sweep_on_a_loaded_machine_is_underpredicted():
    # The aggregated half of a sweep recorded while other jobs loaded the 2-core machine
    # (load average 10-27): there the same 4-sequence decode step took 14 ms at 4 users and
    # 36 ms at 16, a slowdown levels 1 and 4 do not show, so no model calibrated on them can
    # see it coming. The model under-predicts 16 (-37% / -40% when written); this pins that
    # honestly rather than a bound it does not meet, and catches a change that swings it.
    req, ap, steps, bt = _sweep("sweep", "agg")
    out = validate(req, ap, steps, block_tokens=bt)
    assert out["calibration"]["step_source"] == "step records"
    assert out["calibrated_on"] == [1, 4] and out["predicted_level"] == 16
    assert -50 <= out["error_pct"] <= -25, out
    assert -55 <= out["error_p99_pct"] <= -25, out


def test_first_step_at_a_new_shape_is_left_out_of_the_cost_law():
    # Each engine's first step at a token count builds that shape's kernels: it is marked,
    # per engine, in time order, whatever the row order; later steps of the shape are not.
    import pandas as pd

    from kvprof.analysis.whatif.calibrate import first_of_shape

    steps = pd.DataFrame({"engine": ["a", "a", "b", "a", "b", "a"],
                          "tokens": [4, 4, 4, 1, 4, 4],
                          "start_ns": [30, 10, 5, 20, 1, 40]}, index=[7, 3, 9, 1, 2, 5])
    assert first_of_shape(steps).to_dict() == {7: False, 3: True, 9: False, 1: True,
                                               2: True, 5: False}
