"""`kvprof whatif`: calibrate on a run (or read a given model), replay it, predict other setups."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvprof.analysis.whatif.compare import (
    PREDICTED,
    Row,
    fmt_ms,
    measured,
    predict,
    render_table,
    with_errors,
)
from kvprof.analysis.whatif.simulate import AGGREGATED, DECODE, PREFILL, Link, StepCost
from kvprof.errors import BadInputError, UsageError

log = logging.getLogger(__name__)

NO_STEPS_HINT = ("Record the run with kvprof's engine probes, which emit one vllm.engine.step "
                 "span per EngineCore step (kvprof attach), or pass --without-steps to "
                 "calibrate from the spans and aiperf records alone (no decode batching term).")


def parse_levels(text: str | None, option: str) -> list[int] | None:
    if not text:
        return None
    try:
        levels = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"{option} {text!r}: not a comma-separated list of integers",
                         hint=f"For example {option} 1,4,16.") from None
    if not levels or min(levels) < 1:
        raise UsageError(f"{option} {text!r}: levels must be 1 or more",
                         hint=f"For example {option} 1,4,16.")
    return levels


def _link_rate(link_gbps: float | None, microbench: Path | None) -> tuple[float | None, str]:
    if link_gbps is not None:
        return link_gbps, "given (--link-gbps)"
    if microbench is None:
        return None, ""
    from kvprof.analysis.loaders.microbench_results import load_microbench

    should = load_microbench(microbench)
    wire = should.steps.get("wire", {}).get("gbps")
    rate = wire or should.steady_gbps
    if not rate:
        raise BadInputError(f"{microbench} has no wire rate",
                            hint="Pass a `kvprof microbench --json` file from a run that timed "
                            "the wire step, or give --link-gbps.")
    return float(rate), f"microbench {microbench} ({'wire step' if wire else 'steady'})"


def _convert_costs(costs: dict[str, StepCost], want: dict[str, int]) -> dict[str, StepCost]:
    """Engines of the other kind built from the calibrated ones (an aggregated engine runs the
    prefill and decode costs in one step; split ones run their part each)."""
    out = dict(costs)
    if want.get(AGGREGATED) and AGGREGATED not in costs:
        p, d = costs[PREFILL], costs[DECODE]
        out[AGGREGATED] = StepCost(d.base_ms, p.per_prefill_token_ms, d.per_decode_seq_ms)
    if (want.get(PREFILL) or want.get(DECODE)) and AGGREGATED in costs:
        a = costs[AGGREGATED]
        out.setdefault(PREFILL, StepCost(0.0, a.per_prefill_token_ms, 0.0))
        out.setdefault(DECODE, StepCost(a.base_ms, 0.0, a.per_decode_seq_ms))
    return out


def check_workers(workers: dict[str, int | None]) -> None:
    """Refuse, before any loading, worker counts no deployment can have."""
    from kvprof.analysis.whatif.simulate import Deployment, WorkerGroup

    given = {k: v for k, v in workers.items() if v is not None}
    if not given:
        return
    if given.get(AGGREGATED) and (given.get(PREFILL) or given.get(DECODE)):
        raise UsageError("--aggregated with --prefill/--decode: a deployment is one or "
                         "the other", hint="Run kvprof whatif once for each.")
    if all(v == 0 for v in given.values()) or (PREFILL in given and DECODE in given):
        probe = StepCost(1.0)
        Deployment(tuple(WorkerGroup(r, n, probe) for r, n in given.items())).validate()


def run_from_traces(*, traces: str, aiperf: Path, one_clock: bool, client_host: str | None,
                    calibrate_on: list[int] | None, levels: list[int] | None,
                    workers: dict[str, int], tp: dict[str, int], max_batch: int | None,
                    token_budget: int | None, link_gbps: float | None, microbench: Path | None,
                    handshake_ms: float | None, prewarm: bool, without_steps: bool,
                    router: str) -> dict[str, Any]:
    """Calibrate on the run, replay its levels, predict the asked-for deployment."""
    from kvprof.analysis.breakdown import build_breakdown
    from kvprof.analysis.loaders.aiperf import load_aiperf_records
    from kvprof.analysis.loaders.traces import load_spans, require_kvprof_spans
    from kvprof.analysis.pipeline import load_steps_if_any
    from kvprof.analysis.whatif.calibrate import calibrate, load_levels

    spans = load_spans(traces, None, "1h")
    require_kvprof_spans(spans, traces)
    ap = load_aiperf_records(aiperf)
    steps = load_steps_if_any(spans.spans)
    if steps is None and not without_steps:
        raise BadInputError(f"the run in {traces} has no engine step records "
                            "(vllm.engine.step spans)", hint=NO_STEPS_HINT)
    bd = build_breakdown(spans.spans, ap, client_host, one_clock)
    req = bd.requests
    loads = load_levels(ap)
    meas = measured(req, "measured deployment")
    traced = sorted(c for c in meas if c in loads)
    if not traced:
        raise BadInputError("no traced request with a TTFT at any aiperf level",
                            hint="Pass the traces and aiperf records of the same run.")
    if calibrate_on is None:
        calibrate_on = traced[:-1] or traced
    rate, rate_src = _link_rate(link_gbps, microbench)
    # Calibration splits the measured transfer at the run's own link rate (the microbench's
    # when given); a --link-gbps is the new link of the what-if, not the measured one.
    cal_rate, cal_src = _link_rate(None, microbench)
    from kvprof.analysis.whatif.calibrate import block_tokens_from_spans

    cal = calibrate(req, ap, None if without_steps else steps, calibrate_on, cal_rate, cal_src,
                    block_tokens_from_spans(spans.spans, ap))
    if max_batch or token_budget:
        cal.max_batch = max_batch or cal.max_batch
        cal.token_budget = token_budget or cal.token_budget
    base = cal.deployment(tp=tp, router=router)
    label = f"as measured: {base.label()}"
    for row in meas.values():
        row.deployment = label
    replay = with_errors(predict(replace(base, name=label), [loads[c] for c in traced]), meas)
    rows: list[Row] = [r for c in traced for r in (meas[c], replay[c])]
    out: dict[str, Any] = {"calibration": cal.to_dict(), "link_rate_source": rate_src}
    changed = (any(v is not None for v in workers.values()) or rate is not None or prewarm
               or handshake_ms is not None or levels is not None)
    if changed:
        want = {k: v for k, v in workers.items() if v is not None}
        if want.get(AGGREGATED):
            want.setdefault(PREFILL, 0)
            want.setdefault(DECODE, 0)
        elif want.get(PREFILL) or want.get(DECODE):
            want.setdefault(AGGREGATED, 0)
        cal.costs = _convert_costs(cal.costs, want)
        counts = {**cal.workers, **want}
        if counts.get(PREFILL) and counts.get(DECODE) and not cal.kv_bytes_per_token:
            raise BadInputError("a disaggregated what-if from an aggregated run needs the KV "
                                "size per token", hint="Calibrate on a disaggregated run.")
        link = Link(rate if rate is not None else cal.link_gbytes_per_s,
                    handshake_ms if handshake_ms is not None else cal.handshake_ms, prewarm)
        dep = cal.deployment(workers=counts, tp=tp, link=link, router=router)
        desc = [dep.label()]
        if rate is not None:
            desc.append(f"link {rate:g} GB/s")
        if prewarm:
            desc.append("pre-warmed NIXL handshake")
        dep = replace(dep, name="what-if: " + ", ".join(desc))
        at = levels or traced
        extra = [loads[c] if c in loads else _level_like(loads, c) for c in at]
        pred = with_errors(predict(dep, extra), meas if dep.label() == label else {})
        rows += [pred[c] for c in at]
    out["rows"] = [r.to_dict() for r in rows]
    top = traced[-1]
    if len(traced) > 1 and top not in calibrate_on:
        from kvprof.analysis.whatif.calibrate import measured_legs

        out["validation"] = {"calibrated_on": calibrate_on, "predicted_level": top,
                             "error_pct": replay[top].error_mean_pct,
                             "error_p99_pct": replay[top].error_p99_pct,
                             "predicted_legs_ms": replay[top].legs_ms,
                             "measured_legs_ms": measured_legs(req, top)}
    out["_rows"] = rows
    return out


def _level_like(loads: dict, c: int):
    """A level the run did not have: the nearest measured level's lengths, C users."""
    from kvprof.analysis.whatif.simulate import Load

    near = loads[min(loads, key=lambda lv: abs(lv - c))]
    return Load(c, max(near.requests, 2 * c), near.isl, near.osl, warmup=near.warmup)


def run_given(path: Path, levels: list[int] | None) -> dict[str, Any]:
    """Every deployment of a given model at its load; measured rows where the file has them."""
    from kvprof.analysis.whatif.given import attach_errors, load_given, measured_rows

    given = load_given(path)
    loads = given["loads"]
    if levels:
        from kvprof.analysis.whatif.simulate import Load

        by = {ld.concurrency: ld for ld in loads}
        loads = [by.get(c) or Load(c, loads[-1].requests, loads[-1].isl, loads[-1].osl)
                 for c in levels]
    rows: list[Row] = []
    summary: dict[str, Any] = {"deployments": {}, "recommendation": {}}
    preds = {}
    for dep in given["deployments"]:
        meas = measured_rows(given["measured"], dep.label())
        pred = predict(dep, loads, min_requests=200)
        attach_errors(pred, meas)
        preds[dep.label()] = pred
        for ld in loads:
            if ld.concurrency in meas:
                rows.append(meas[ld.concurrency])
            rows.append(pred[ld.concurrency])
        summary["deployments"][dep.label()] = {"gpus": dep.gpus()}
    for ld in loads:
        best = min(preds, key=lambda k: preds[k][ld.concurrency].ttft_mean_ms or float("inf"))
        summary["recommendation"][str(ld.concurrency)] = best
    return {"rows": [r.to_dict() for r in rows], "summary": summary, "_rows": rows,
            "sources": given["doc"].get("sources", [])}


def render(result: dict[str, Any]) -> str:
    rows = result.pop("_rows")
    lines = ["Every row marked 'predicted' is a prediction of kvprof's what-if model, not a "
             "measurement.", "", render_table(rows)]
    cal = result.get("calibration")
    if cal:
        lines += ["", f"Calibrated on levels {cal['calibrated_on']} ({cal['step_source']}); "
                  f"link {cal['link_gbytes_per_s'] or 0:.3g} GB/s ({cal['link_source'] or '-'}), "
                  f"handshake {cal['handshake_ms']:.0f} ms."]
        for t in cal.get("thin", []):
            lines.append(f"  thin: {t}")
    v = result.get("validation")
    if v:
        lines.append(f"Validation: calibrated on {v['calibrated_on']}, level {v['predicted_level']}"
                     f" predicted within {v['error_pct']:+.0f}% (mean TTFT), "
                     f"{v['error_p99_pct']:+.0f}% (p99).")
        if v.get("predicted_legs_ms"):
            from kvprof.analysis.whatif.compare import leg_table

            lines += ["", f"Per leg at C={v['predicted_level']}, mean ms (the predicted column is "
                      "a prediction; each column sums to its mean TTFT):"]
            table = [("leg", "measured", "predicted", "predicted - measured")]
            table += [(k, fmt_ms(m), fmt_ms(p), "-" if d is None else f"{d:+,.0f}")
                      for k, m, p, d in leg_table(v["predicted_legs_ms"],
                                                  v.get("measured_legs_ms") or {})]
            widths = [max(len(r[i]) for r in table) for i in range(4)]
            lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                      .rstrip() for r in table]
    rec = (result.get("summary") or {}).get("recommendation")
    if rec:
        lines.append("Lowest predicted mean TTFT per level: "
                     + "; ".join(f"C={c}: {d}" for c, d in rec.items()))
    return "\n".join(lines)


def run_whatif_command(*, given: Path | None, fmt: str, out: Path | None,
                       **kw: Any) -> tuple[str, str]:
    """(text for stdout, one summary line for stderr)."""
    if fmt not in ("text", "json"):
        raise UsageError(f"--format {fmt!r}", hint="Use text or json.")
    if given is not None:
        result = run_given(given, kw.get("levels"))
    else:
        if not kw.get("traces") or not kw.get("aiperf"):
            raise UsageError("give --traces and --aiperf of one run, or --given MODEL.json",
                             hint="See kvprof whatif --help.")
        check_workers(kw["workers"])
        result = run_from_traces(**kw)
    rows = result["_rows"]
    n_pred = sum(r.source == PREDICTED for r in rows)
    text = json.dumps({k: v for k, v in result.items() if k != "_rows"}, indent=2,
                      default=str) if fmt == "json" else render(dict(result))
    if out is not None:
        from kvprof.outputs import atomic_write

        atomic_write(out, text + "\n", "--out")
        text = ""
    return text, f"kvprof whatif: {n_pred} predicted row(s), {len(rows) - n_pred} measured"
