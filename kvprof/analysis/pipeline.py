"""The report pipeline: sources -> breakdown -> causes -> capacity -> what-if, as one Report.

``build_report`` is the one place that decides what a report holds; views/ only render the
``Report`` it returns (html, md, json), and commands only call it. Each step below adds its part
to the same JSON-able ``data`` dict, so a new analysis (step records, CPU waits, capacity, the
what-if model) is one more step here, not a change in a renderer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kvprof import semconv as sc
from kvprof.analysis.breakdown import LEG, PHASES, build_breakdown, leg_order
from kvprof.errors import BadInputError, KvprofError

log = logging.getLogger(__name__)

MAX_REQUEST_ROWS = 2000  # the JSON lists requests up to this many; counts cover all


@dataclass
class ReportInputs:
    """Paths and options of one report."""

    traces: str
    samples: Path | None = None
    aiperf: Path | None = None
    microbench: Path | None = None
    placement: Path | None = None
    vllm_log: Path | list[Path] | None = None
    vllm_metrics: Path | None = None
    service: str | None = None
    lookback: str = "1h"
    client_host: str | None = None
    one_clock: bool = False
    # NVIDIA Dynamo's request_end records (frontend log / request-trace sink files); files in
    # the traces folder that hold such records are read too (kvprof.analysis.coarse uses them).
    dynamo_log: Path | list[Path] | None = None
    # Who reads trace files: "pandas" (kvprof's loader) or "chdb" (the SQL of
    # kvprof.analysis.clickhouse, in-process); a clickhouse:// source is read by its server.
    engine: str = "pandas"
    # Streamed analysis (kvprof.analysis.stream): "auto" (when the local trace files pass
    # stream.STREAM_BYTES), "on", "off"; ``shards``: how many shards of requests (None: by size).
    stream: str = "auto"
    shards: int | None = None


@dataclass
class Report:
    """The numbers (``data``, what the JSON holds) and the figures of one report."""

    data: dict[str, Any]
    plots: dict[str, bytes] = field(default_factory=dict)


def records(frame, columns: list[str], limit: int | None = None) -> list[dict]:
    out = []
    for row in frame[columns].head(limit).itertuples(index=False):
        rec = {}
        for c, v in zip(columns, row, strict=True):
            if hasattr(v, "item"):
                v = v.item()
            if isinstance(v, float) and math.isnan(v):
                v = None
            rec[c] = v
        out.append(rec)
    return out


def _links_data(links) -> dict:
    if links is None or not len(links):
        return {"transfers": 0, "by_path": []}
    by_path = []
    for path, grp in links.groupby("path"):
        by_path.append({
            "path": path, "transfers": int(len(grp)),
            "entities": sorted(set(grp["entity"].dropna().astype(str))),
            "median_transfer_ms": float(grp["transfer_ms"].median()),
            "median_achieved_gbps": float(grp["achieved_gbps"].median()),
            "median_link_gbps": float(grp["link_gbps"].median()),
            "link_rate_gbps": float(grp["link_rate_gbps"].median()),
            "rate_source": ", ".join(sorted(set(grp["rate_source"].dropna().astype(str)))),
            "median_pct_of_link_rate": float(grp["pct_of_link_rate"].median()),
            "path_mismatches": int(grp["path_mismatch"].sum()),
        })
    return {"transfers": int(len(links)), "by_path": by_path}




def _add_vllm_logs(data: dict[str, Any], logs: Path | list[Path]) -> None:
    """Transfer-metrics lines (decode logs) and KV lease expiries (prefill logs) into the report."""
    import pandas as pd

    from kvprof.analysis.loaders.vllm_metrics import parse_kv_transfer_log, parse_lease_expiries

    paths = [logs] if isinstance(logs, (str, Path)) else list(logs)
    metrics = [parse_kv_transfer_log(p, required=False) for p in paths]
    expiries = [parse_lease_expiries(p) for p in paths]
    if not any(len(m) for m in metrics) and not any(len(e) for e in expiries):
        raise BadInputError(
            "no \"KV Transfer metrics\" or KV lease-expiry lines in "
            + ", ".join(str(p) for p in paths),
            hint="Pass the logs of vLLM workers using the NIXL connector (decode logs carry the "
            "transfer metrics, prefill logs the lease expiries).",
        )
    kv_log = pd.concat([m for m in metrics if len(m)] or metrics[:1], ignore_index=True)
    data["vllm_kv_transfer_log"] = records(kv_log, list(kv_log.columns))
    leases = pd.concat(expiries, ignore_index=True)
    data["vllm_lease_expiries"] = records(leases, list(leases.columns))
    unretrieved = leases[leases["retrieved_by"] == 0]
    if len(unretrieved):
        ids = ", ".join(unretrieved["request_id"].head(5))
        data["notes"].append(
            f"vLLM log: the prefill side released the KV of {len(unretrieved)} request(s) when "
            f"its NIXL send lease expired, retrieved by 0 decode workers ({ids}"
            f"{', ...' if len(unretrieved) > 5 else ''}): their decode side never pulled that KV "
            "in time, so their kv.hold ends at the lease and their transfer spans do not show "
            "a completed pull."
        )


@dataclass
class Sources:
    """What the inputs held, loaded once: spans, client records, samples, microbench."""

    spans_load: Any
    aiperf: Any = None
    samples_load: Any = None
    should: Any = None
    notes: list[str] = field(default_factory=list)
    dynamo_records: Any = None  # request_end records (loaders.dynamo_records), None if none
    streamed: bool = False  # spans_load holds no spans (kvprof.analysis.stream)


def load_sources(inputs: ReportInputs, data: dict[str, Any]) -> Sources:
    """Step 1: read every input given; what was read (and skipped) goes into ``data['inputs']``."""
    from kvprof.analysis.clickhouse.load import load_trace_source
    from kvprof.analysis.loaders.aiperf import load_aiperf_records
    from kvprof.analysis.loaders.traces import require_kvprof_spans

    spans_load = load_trace_source(inputs.traces, inputs.service, inputs.lookback, inputs.engine)
    foreign_only = require_kvprof_spans(spans_load, inputs.traces)
    aiperf = load_aiperf_records(inputs.aiperf) if inputs.aiperf else None
    src = Sources(spans_load=spans_load, aiperf=aiperf)
    src.notes = [*foreign_only, *spans_load.notes,
                 *(aiperf.attrs.get("notes", []) if aiperf is not None else [])]
    data["inputs"] = {"traces": {
        "source": str(inputs.traces), "files": len(spans_load.files),
        "spans": int(len(spans_load.spans)), "formats": sorted(spans_load.formats),
        "skipped": [{"file": f, "why": w} for f, w in spans_load.skipped],
        "spans_skipped": spans_load.spans_skipped,
        "parents_dropped": spans_load.parents_dropped}}
    if aiperf is not None:
        data["inputs"]["aiperf"] = {"source": str(inputs.aiperf), "records": int(len(aiperf))}
    load_dynamo_records(inputs, src, data)
    load_side_inputs(inputs, src, data)
    return src


def load_side_inputs(inputs: ReportInputs, src: Sources, data: dict[str, Any]) -> None:
    """Step 1c: the collector's samples and the microbench results, when given (the same for
    an in-memory and a streamed report)."""
    if inputs.samples:
        from kvprof.analysis.loaders.samples import load_samples

        src.samples_load = load_samples(inputs.samples)
        data["inputs"]["samples"] = {
            "source": str(inputs.samples), "files": len(src.samples_load.files),
            "samples": int(len(src.samples_load.samples)),
            "skipped": [{"file": f, "why": w} for f, w in src.samples_load.skipped]}
    if inputs.microbench:
        from kvprof.analysis.loaders.microbench_results import load_microbench

        src.should = load_microbench(inputs.microbench)
        data["should_cost"] = src.should.to_dict()


def load_dynamo_records(inputs: ReportInputs, src: Sources, data: dict[str, Any]) -> None:
    """Step 1b: Dynamo's request_end records, from --dynamo-log (a file without any is an
    error) and from the files of the traces folder the span loader skipped (quietly)."""
    import pandas as pd

    from kvprof.analysis.loaders.dynamo_records import load_request_end

    given = inputs.dynamo_log
    paths = [] if given is None else [given] if isinstance(given, (str, Path)) else list(given)
    frames = [load_request_end(paths)] if paths else []
    found = []
    for file, _why in list(src.spans_load.skipped):
        try:
            recs = load_request_end(file, required=False)
        except KvprofError:
            continue
        if len(recs):
            frames.append(recs)
            found.append(file)
    if found:  # not skipped after all: they were Dynamo's records, read as such
        src.spans_load.skipped = [(f, w) for f, w in src.spans_load.skipped if f not in found]
        data["inputs"]["traces"]["skipped"] = [
            x for x in data["inputs"]["traces"]["skipped"] if x["file"] not in found]
    if not frames:
        return
    src.dynamo_records = pd.concat(frames, ignore_index=True).drop_duplicates(
        "request_id", keep="last")
    data["inputs"]["dynamo_log"] = {
        "sources": [str(p) for p in paths] + [str(f) for f in found],
        "records": int(len(src.dynamo_records))}


def summarize(req, all_req, done) -> dict[str, Any]:
    """Step 2b: the headline numbers over the measured (non-warm-up) requests."""
    return {
        "requests": int(len(req)),
        "warmup_requests": int(len(all_req) - len(req)),
        "requests_with_ttft": int(len(done)),
        "pairs": int(req["pair"].nunique()),
        "first_contact_requests": int(all_req["first_contact"].sum()),
        "ttft_mean_ms": float(done["ttft_ms"].mean()) if len(done) else None,
        "ttft_p50_ms": float(done["ttft_ms"].quantile(0.5)) if len(done) else None,
        "ttft_p99_ms": float(done["ttft_ms"].quantile(0.99)) if len(done) else None,
        "stacked_mean_ms": float(done["stacked_ms"].mean()) if len(done) else None,
        "unaccounted_mean_ms": float(done["unaccounted_ms"].mean()) if len(done) else None,
        "unaccounted_share": (float(done["unaccounted_ms"].mean() / done["ttft_ms"].mean())
                              if len(done) and done["ttft_ms"].mean() else None),
        "chains": {str(k): int(v) for k, v in req["chain"].value_counts().items()},
        "failed_transfers": int(req["transfer_status"].astype(str).str.startswith(
            ("failed", "lease")).sum()),
        "ttft_sources": {str(k): int(v) for k, v in done["ttft_source"].value_counts().items()},
        # NVIDIA Dynamo's frontend measures TTFT too (http-request's ttft_ms): beside the
        # client's, the difference is the frontend -> client leg.
        "dynamo_ttft_mean_ms": (float(done["dynamo_ttft_ms"].mean())
                                if len(done) and done["dynamo_ttft_ms"].notna().any() else None),
        # Coarse legs (kvprof.analysis.coarse): time only Dynamo's / vLLM's own telemetry bounds.
        **_coarse_summary(done),
    }


def _coarse_summary(done) -> dict[str, Any]:
    cols = [c for c in done.columns if c.startswith(LEG + "~")]
    if not len(done) or not cols:
        return {"coarse_mean_ms": 0.0 if len(done) else None,
                "coarse_share": 0.0 if len(done) else None}
    mean = float(done[cols].sum(axis=1).mean())
    ttft = float(done["ttft_ms"].mean())
    return {"coarse_mean_ms": mean, "coarse_share": mean / ttft if ttft else None}


def add_links(data: dict[str, Any], bd, src: Sources, with_plots: bool):
    """Step 3: each traced transfer against the link counters the collector sampled."""
    from kvprof.analysis.links import link_timeline, transfer_links
    from kvprof.analysis.views import plots

    if src.samples_load is None:
        return None
    links = transfer_links(bd, src.spans_load.spans, src.samples_load.samples)
    timeline = link_timeline(src.samples_load.samples, bd.skew.offsets_ns)
    data["links"] = _links_data(links)
    if len(links):
        data["links"]["rows"] = records(links, list(links.columns), 200)
        plots_ok = links.dropna(subset=["achieved_gbps"])
        if len(plots_ok) and with_plots:
            data.setdefault("_plots", {})["transfer_rates"] = plots.transfer_rates(plots_ok)
    if len(timeline) and with_plots:
        data.setdefault("_plots", {})["link_timeline"] = plots.link_timeline(timeline)
    return links


def add_side_inputs(data: dict[str, Any], inputs: ReportInputs) -> None:
    """Step 4: placement records, vLLM's own logs and saved metrics, as given."""
    if inputs.placement:
        from kvprof.analysis.loaders.samples import load_samples, placement_records

        pl = placement_records(load_samples(inputs.placement).samples)
        data["placement"] = records(pl, list(pl.columns))
    if inputs.vllm_log:
        _add_vllm_logs(data, inputs.vllm_log)
    if inputs.vllm_metrics:
        from kvprof.analysis.loaders.vllm_metrics import nixl_summary, parse_nixl_prometheus

        data["nixl_metrics"] = nixl_summary(parse_nixl_prometheus(inputs.vllm_metrics))


def add_causes(data: dict[str, Any], req, done, links, should, bd=None, src=None,
               cpu=None) -> None:
    """Step 5: the ranked verdict, overall and per concurrency level, and the should-cost;
    the causes behind the legs (kvprof.analysis.causes) and the transfer split."""
    from kvprof.analysis.views.verdict import (
        rank_by_level,
        rank_causes,
        should_cost_line,
        traced_transfer,
    )

    data["verdict"] = rank_causes(req, links, should)
    data["verdict_by_level"] = rank_by_level(req)
    if should is not None:
        data["should_cost"]["against_traces"] = should.against(*traced_transfer(done))
        data["should_cost"]["summary"] = should_cost_line(should, done)
    if bd is not None and src is not None:
        try:
            add_why(data, bd, src, req, done, cpu)
        except Exception as exc:  # one section of the report: never lose the rest
            log.warning("causes: %r", exc, exc_info=True)
            data["notes"].append(f"causes could not be worked out ({exc!r}); legs as measured")


def add_why(data: dict[str, Any], bd, src: Sources, req, done, cpu) -> None:
    """Step 5b (issue 19): the transfer split summary, and per request and level the causes
    with their evidence (engine steps, NIXL telemetry, CPU waits)."""
    from kvprof.analysis import causes

    split = causes.transfer_split(req, causes.poll_gaps(src.spans_load.spans))
    if split is not None:
        data["summary"]["transfer_split"] = split
    steps = load_steps_if_any(src.spans_load.spans)
    per_request = causes.request_causes(bd, src.spans_load.spans, steps, cpu)
    data["_request_causes"] = per_request
    by_level = []
    if "concurrency" in done and done["concurrency"].notna().any():
        for level, grp in done.groupby(done["concurrency"].astype(float)):
            by_level.append({"concurrency": int(level), "requests": int(len(grp)),
                             "causes": causes.rank(grp, per_request)[:5]})
    data["causes"] = {"ranked": causes.rank(done, per_request), "by_level": by_level,
                      "transfer": split["sentence"] if split else None,
                      "engine_steps": int(len(steps)) if steps is not None else 0}


def add_request_causes(data: dict[str, Any], all_req) -> None:
    """Step 7c: each request row's causes and transfer split (issue 19)."""
    from kvprof.analysis import causes

    per_request = data.pop("_request_causes", None)
    if per_request is None:
        return
    splits = {str(k): causes.request_split(r) for k, r in
              all_req.set_index("key").iterrows()} if "kv.transfer" in all_req else {}
    for row in data.get("requests", []):
        key = str(row.get("key"))
        row["transfer_split"] = splits.get(key)
        row["causes"] = per_request.get(key, [])


def cpu_waits(bd, src: Sources):
    """Step 4b: per request and leg, the run-queue wait of the leg's process inside the leg's
    window (kvprof.analysis.cpu_wait); None without schedstat samples."""
    from kvprof.analysis import cpu_wait
    from kvprof.analysis.loaders.cpu_waits import cpu_waits_from_samples

    if src.samples_load is None:
        return None
    waits = cpu_waits_from_samples(src.samples_load.samples)
    if not len(waits):
        return None
    from kvprof.analysis.breakdown import span_request_keys

    spans = src.spans_load.spans
    pids = cpu_wait.side_pids(spans, span_request_keys(spans)) if len(spans) else {}
    return cpu_wait.attribute(cpu_wait.leg_windows(bd.milestones, bd.requests), waits, pids)


def add_cpu_waits(data: dict[str, Any], attribution, req) -> None:
    """Step 7b: the CPU waits per leg (summary) and per request (``cpu_wait_ms`` per leg)."""
    from kvprof.analysis import cpu_wait

    if attribution is None:
        return
    data["cpu_waits"] = cpu_wait.summarize(attribution, req)
    by_key: dict[str, dict[str, float]] = {}
    for key, leg, wait in zip(attribution["key"], attribution["leg"], attribution["wait_ms"],
                              strict=True):
        by_key.setdefault(str(key), {})[str(leg).removeprefix(LEG)] = round(float(wait), 3)
    for row in data.get("requests", []):
        if str(row.get("key")) in by_key:
            row["cpu_wait_ms"] = by_key[str(row["key"])]


def add_whatif(data: dict[str, Any], all_req, src: Sources) -> None:
    """Step 9: the what-if model (kvprof.analysis.whatif) calibrated on the lower concurrency
    levels, its prediction of the highest beside the measurement (``whatif``)."""
    from kvprof.analysis.whatif.compare import validate
    from kvprof.errors import KvprofError

    if src.aiperf is None or not len(src.aiperf):
        return
    from kvprof.analysis.whatif.calibrate import block_tokens_from_spans

    steps = load_steps_if_any(src.spans_load.spans)
    try:
        data["whatif"] = validate(all_req, src.aiperf, steps, block_tokens=block_tokens_from_spans(
            src.spans_load.spans, src.aiperf))
    except KvprofError as err:
        # The what-if is one section of the report: its failure must not lose the rest.
        data["whatif"] = {"error": err.message, "hint": err.hint}
        data["notes"].append(f"what-if model: {err.message}")


def add_capacity(data: dict[str, Any], bd, src: Sources, inputs: ReportInputs) -> None:
    """Step 10: per concurrency level and engine, busy time, scheduler queue, KV blocks and
    offered load against capacity, with a verdict on which queue grew (``capacity``)."""
    import numpy as np

    from kvprof.analysis.capacity import capacity_table, kv_blocks_from_logs

    spans = src.spans_load.spans
    # Block size: the transfer's tokens per block (prompt tokens / KV blocks).
    block_size = None
    if {"kv_blocks", "prompt_tokens"} <= set(spans.columns):
        per_trace = spans.groupby("trace_id")[["kv_blocks", "prompt_tokens"]].max().dropna()
        per_trace = per_trace[per_trace["kv_blocks"] > 0]
        if len(per_trace):
            ratio = float((per_trace["prompt_tokens"] / per_trace["kv_blocks"]).median())
            block_size = int(2 ** math.ceil(math.log2(ratio))) if ratio > 1 else None
    logs = inputs.vllm_log
    logs = [] if logs is None else [logs] if isinstance(logs, (str, Path)) else list(logs)
    output_tokens = None
    if src.aiperf is not None and "osl" in src.aiperf and src.aiperf["osl"].notna().any():
        output_tokens = float(np.nanmedian(src.aiperf["osl"].astype(float)))
    data["capacity"] = capacity_table(
        spans, bd.requests, bd.skew.offsets_ns, kv_blocks_from_logs(logs, block_size),
        output_tokens, block_size, load_steps_if_any(spans))


def load_steps_if_any(spans):
    """Engine step records (helper 19a's loader) when the traces hold any, else None."""
    try:
        from kvprof.analysis.loaders.steps import load_steps
    except ImportError:
        return None
    steps = load_steps(spans)
    return steps if len(steps) else None


def add_requests(data: dict[str, Any], req, all_req) -> None:
    """Step 7: the per-request rows (up to MAX_REQUEST_ROWS), each with its legs in path order."""
    legs = [c for c in leg_order() if c in all_req and all_req[c].notna().any()]
    cols = ["key", "x_request_id", "trace_id", "chain", "concurrency", "pair", "first_contact",
            "prefill_pod", "decode_pod", "prefill_node", "decode_node", "kv_path", "kv_bytes",
            *[p for p in PHASES if p in req], sc.SPAN_DECODE_KV_WAIT, "stacked_ms", "ttft_ms",
            "ttft_source", "unaccounted_ms", "unaccounted_detail", "transfer_gbps",
            "transfer_status", "dynamo_ttft_ms", "client_error"]
    data["requests"] = records(all_req, [*cols, "warmup", "dynamo_kv_bound_ms"], MAX_REQUEST_ROWS)
    for row, (_, legs_row) in zip(data["requests"], all_req[legs].head(MAX_REQUEST_ROWS).iterrows(),
                                  strict=False):
        # Path order, one entry per leg the request has: legs + unaccounted = TTFT.
        row["legs_ms"] = {c.removeprefix(LEG): float(v) for c, v in legs_row.items()
                          if v == v}
    if len(all_req) > MAX_REQUEST_ROWS:
        data["notes"].append(f"requests lists the first {MAX_REQUEST_ROWS} of {len(req)} "
                             "requests; every statistic covers all of them.")


def add_figures_data(data: dict[str, Any], req) -> None:
    """Step 8: what the first figures draw (issue 22): the p50 and p99 requests' legs on one
    time axis, and the mean per stage per concurrency level and deployment."""
    from kvprof.analysis.waterfall import stages_by_level, waterfall

    data["waterfall"] = waterfall(req)
    data["stages_by_level"] = stages_by_level(req)


def build_report(inputs: ReportInputs, with_plots: bool = True) -> Report:
    """Everything the report shows, as JSON-able data plus PNG figures.

    The steps, in order: sources -> breakdown (legs per request) -> links -> causes
    (-> capacity -> what-if, as they arrive) -> request rows -> figures.
    """
    from kvprof.analysis.views import plots
    from kvprof.analysis.views.summaries import (
        leg_stats,
        level_view,
        pair_view,
        percentile_view,
        phase_stats,
    )

    data: dict[str, Any] = {
        "title": "kvprof TTFT breakdown",
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": {}, "notes": [],  # filled below; keys first so the JSON reads top-down
    }
    from kvprof.analysis import stream

    if stream.wanted(inputs):  # more spans than memory holds: shard by shard
        src, bd = stream.load_streamed(inputs, data)
    else:
        src = load_sources(inputs, data)
        bd = build_breakdown(src.spans_load.spans, src.aiperf, inputs.client_host,
                             inputs.one_clock, dynamo_records=src.dynamo_records)
    data["notes"] = [*src.notes, *bd.notes]
    # aiperf's warm-up requests stay in the request list and the first-contact view (one may
    # be a pair's first contact); every statistic is over the measured ones, as aiperf's.
    all_req = bd.requests
    req = all_req[~all_req["warmup"].astype(bool)]
    done = req[req["ttft_ms"].notna()]
    data["summary"] = summarize(req, all_req, done)
    data["skew"] = bd.skew.to_dict()
    data["propagation"] = bd.propagation
    data["percentiles"] = percentile_view(req)
    data["legs"] = leg_stats(req)
    data["levels"] = level_view(req)
    data["phase_stats"] = phase_stats(req)
    data["pairs"] = pair_view(all_req)
    # A streamed run keeps no span table: the sections that read it are left out (a note).
    links = None if src.streamed else add_links(data, bd, src, with_plots)
    add_side_inputs(data, inputs)
    cpu = None if src.streamed else cpu_waits(bd, src)
    add_causes(data, req, done, links, src.should, bd=None if src.streamed else bd, src=src,
               cpu=cpu)
    add_requests(data, req, all_req)
    add_request_causes(data, all_req)
    add_figures_data(data, req)
    add_cpu_waits(data, cpu, req)
    if not src.streamed:
        add_whatif(data, all_req, src)
        add_capacity(data, bd, src, inputs)
    figures = data.pop("_plots", {})
    if data["percentiles"] and with_plots:
        figures["stacked_percentiles"] = plots.stacked_percentiles(data["percentiles"])
    if len(done) and with_plots:
        figures["ttft_by_pair"] = plots.ttft_by_pair(all_req)
    return Report(data=data, plots=figures)
