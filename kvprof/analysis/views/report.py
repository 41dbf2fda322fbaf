"""`kvprof report`: render a built Report (html, md, json) and run the command."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from kvprof import semconv as sc
from kvprof.analysis.breakdown import UNACCOUNTED
from kvprof.analysis.pipeline import (  # noqa: F401 (ReportInputs, build_report: re-exported)
    MAX_REQUEST_ROWS,
    Report,
    ReportInputs,
    build_report,
)
from kvprof.analysis.views import (
    capacity_view,
    causes_view,
    cpu_waits_view,
    figures,
    whatif_view,
)
from kvprof.analysis.views.outputs import resolve_output, write_public
from kvprof.analysis.views.render import (
    NO_DATA,
    esc,
    fmt,
    html_img,
    html_page,
    html_table,
    md_table,
    sig,
)
from kvprof.analysis.views.words import span_words, stage_words

log = logging.getLogger(__name__)

FORMATS = ("html", "md", "json")
DEFAULT_OUT = Path("out/report.html")  # its suffix follows --format


def _steady_handshake(pair: dict):
    """Later requests without a handshake span paid none (the first one shows it is traced)."""
    if pair["steady_handshake_ms"] is None and pair["first_handshake_ms"] is not None \
            and pair["requests"] > 1:
        return "none"
    return pair["steady_handshake_ms"]


def _size(n) -> str:
    return "unknown bytes" if n is None else f"{int(n):,} bytes"


# --- rendering -----------------------------------------------------------------------------

def _verdict_lines(data: dict) -> list[tuple[dict, str]]:
    return [(c, f"{c['headline']} ({fmt(100 * c['share'], 0)}% of mean TTFT)"
                + (" — estimate" if c["estimate"] else ""))
            for c in data["verdict"]]


def _level_lines(data: dict) -> list[str]:
    """Per concurrency level: the top stages in words, and what is left unaccounted."""
    out = []
    for lv in data.get("verdict_by_level", []):
        top = "; ".join(f"{t['headline']} ({100 * t['share']:.0f}%)" for t in lv["top"])
        out.append(f"concurrency {lv['concurrency']} ({lv['requests']} requests, TTFT mean "
                   f"{fmt(lv['ttft_mean_ms'])} ms): {top}; unaccounted "
                   f"{fmt(lv['unaccounted_mean_ms'])} ms ({fmt(100 * lv['unaccounted_share'])}%)")
    return out


def _tables(data: dict) -> dict[str, tuple[list[str], list[list]]]:
    """Every table of the report, once, for both Markdown and HTML."""
    t: dict[str, tuple[list[str], list[list]]] = {}
    view = data["percentiles"]
    stages = list(dict.fromkeys(k for v in view for k in v["stages_ms"] if k != UNACCOUNTED))
    # Stages as rows, percentiles as columns: stays narrow however long the request ids are.
    dynamo = any(v.get("dynamo_ttft_ms") is not None for v in view)
    # The request AT each percentile (nearest rank), not the percentile of the distribution.
    t["percentiles"] = (["", *[f"p{v['percentile']} request" for v in view]],
                        [["TTFT ms", *[v["ttft_ms"] for v in view]],
                         *([["Dynamo frontend's own TTFT ms (not stacked)",
                             *[v.get("dynamo_ttft_ms") for v in view]]] if dynamo else []),
                         *[[f"{stage_words(p)} ms", *[v["stages_ms"].get(p) for v in view]]
                           for p in [*stages, UNACCOUNTED]],
                         [f"{span_words(sc.SPAN_KV_HOLD)} ms (overlaps, not stacked)",
                          *[v["kv_hold_ms"] for v in view]],
                         ["prefill -> decode pair", *[v["pair"] for v in view]],
                         ["first contact", *[v["first_contact"] for v in view]],
                         ["TTFT source", *[v["ttft_source"] for v in view]],
                         ["request", *[v["key"] for v in view]]])
    t["legs"] = (["leg (in path order)", "stage", "requests", "mean ms", "p50 ms", "p99 ms",
                  "max ms", "% of mean TTFT"],
                 [[x["label"], stage_words(x["stage"]) if x["stage"] == UNACCOUNTED
                   else x["stage"], x["count"], x["mean_ms"], x["p50_ms"], x["p99_ms"],
                   x["max_ms"], fmt(100 * x["share_of_ttft"]) if x["share_of_ttft"] is not None
                   else None] for x in data["legs"]])
    dyn_levels = any(lv.get("dynamo_ttft_mean_ms") is not None for lv in data["levels"])
    t["levels"] = (["concurrency", "requests", "TTFT mean ms", "TTFT p99 ms",
                    *(["Dynamo ttft_ms mean"] if dyn_levels else []),
                    "unaccounted mean ms", "unaccounted % of TTFT", "largest stage"],
                   [[lv["concurrency"], lv["requests"], lv["ttft_mean_ms"], lv["ttft_p99_ms"],
                     *([lv.get("dynamo_ttft_mean_ms")] if dyn_levels else []),
                     lv["unaccounted_mean_ms"],
                     fmt(100 * lv["unaccounted_share"]) if lv["unaccounted_share"] is not None
                     else None,
                     next((f"{stage_words(k)} ({fmt(v)} ms)" for k, v in lv["stages_ms"].items()
                           if k != UNACCOUNTED), None)] for lv in data["levels"]])
    t["phases"] = (["span", "requests", "mean ms", "p50 ms", "p99 ms", "max ms"],
                   [[span_words(s["phase"]), s["count"], s["mean_ms"], s["p50_ms"], s["p99_ms"],
                     s["max_ms"]] for s in data["phase_stats"]])
    t["pairs"] = (["pair", "requests", "path", "first TTFT ms", "first handshake ms",
                   "steady TTFT ms (median)", "steady handshake ms", "steady transfer ms",
                   "transfer GB/s"],
                  [[p["pair"], p["requests"], p["path"], p["first_ttft_ms"],
                    p["first_handshake_ms"], p["steady_ttft_ms"], _steady_handshake(p),
                    p["steady_transfer_ms"], sig(p["median_transfer_gbps"])]
                   for p in data["pairs"]])
    t["propagation"] = (
        ["hop", "should carry", "requests", "same trace", "joined by id only",
         "upstream found no partner", "downstream found no partner"],
        [[h["hop"], h["carries"], h["requests"],
          "n/a" if h["same_trace"] is None else h["same_trace"],
          h["joined_by_id_only"] + h.get("joined_by_time_window", 0),
          "n/a" if h["upstream_without_downstream"] is None else h["upstream_without_downstream"],
          h["downstream_without_upstream"]] for h in data.get("propagation", [])])
    skew = data["skew"]
    t["skew"] = (["clock (node/host)", "offset applied ms"],
                 [[k, v] for k, v in skew["offsets_ms"].items()])
    t["skew_pairs"] = (["clocks (A -> B)", "offset(B) - offset(A): lower ms", "upper ms",
                        "estimate ms", "constraints", "consistent", "estimate from"],
                       [[" -> ".join(i["clocks"]), i["lower_ms"], i["upper_ms"],
                         i["estimate_ms"], i["constraints"], i["consistent"],
                         i.get("method")]
                        for i in skew["pair_intervals"]])
    if "links" in data:
        t["links"] = (["path seen on counters", "transfers", "links", "median ms",
                       "achieved GB/s (traced bytes)", "link GB/s (counters)",
                       "link rate GB/s", "% of rate", "rate from",
                       "transfers on another link than traced"],
                      [[b["path"], b["transfers"], ", ".join(b["entities"]) or NO_DATA,
                        b["median_transfer_ms"], sig(b["median_achieved_gbps"]),
                        sig(b["median_link_gbps"]), sig(b["link_rate_gbps"]),
                        sig(b["median_pct_of_link_rate"]), b["rate_source"] or NO_DATA,
                        b["path_mismatches"]] for b in data["links"]["by_path"]])
    if "should_cost" in data:
        sc_ = data["should_cost"]
        cmp = sc_.get("against_traces") or {}
        differs = cmp.get("same_geometry") is False
        rows = [[n, s.get("median_ms"), s.get("p10_ms"), s.get("p90_ms"), sig(s.get("gbps"))]
                for n, s in sc_["steps"].items() if not (differs and n == "total")]
        if differs:
            total = sc_["steps"].get("total", {})
            rows.append([f"total for the microbench's {_size(sc_['kv_bytes'])}",
                         sc_["total_ms"], total.get("p10_ms"), total.get("p90_ms"),
                         sig(sc_.get("steady_gbps"))])
            if cmp.get("basis") == "scaled estimate":
                rows.append([f"scaled estimate for the traced {_size(cmp['traced_bytes'])}",
                             sig(cmp["expected_ms"]), None, None, sig(sc_.get("steady_gbps"))])
        else:
            rows.append(["total (what one transfer should cost)", sc_["total_ms"], None,
                         None, sig(sc_.get("steady_gbps"))])
        t["should_cost"] = (["microbench step", "median ms", "p10 ms", "p90 ms", "GB/s"], rows)
    if data.get("vllm_kv_transfer_log"):
        rows = data["vllm_kv_transfer_log"]
        t["kv_log"] = (list(rows[0].keys()), [list(r.values()) for r in rows])
    if data.get("nixl_metrics"):
        t["nixl"] = (["vllm:nixl metric", "value"], [[k, v] for k, v in
                                                     data["nixl_metrics"].items()])
    if data.get("placement"):
        rows = data["placement"]
        t["placement"] = (list(rows[0].keys()), [list(r.values()) for r in rows])
    cap = capacity_view.capacity_table(data)
    if cap is not None:
        t["capacity"] = cap
    wif = whatif_view.whatif_table(data)
    if wif is not None:
        t["whatif"] = wif
    inputs = data["inputs"]
    skipped = inputs["traces"]["skipped"] + inputs.get("samples", {}).get("skipped", [])
    t["skipped"] = (["skipped file", "why"], [[s["file"], s["why"]] for s in skipped])
    return t


def _empty_sentences(d: dict) -> dict[str, str]:
    """What to say instead of a table with no rows."""
    clocks = list(d["skew"].get("offsets_ms", {}))
    return {
        "skew": "No clock offsets: the spans carry no node or host to tell clocks apart.",
        "skew_pairs": (f"Only one clock ({clocks[0]}): no pair of clocks to bound, "
                       "nothing to correct." if len(clocks) == 1 else
                       "No span crossed between clocks, so no offset between them is bounded."),
        "links": "No transfer window matched the collector samples.",
    }


def _say(text: str) -> str:
    """The sentence under a figure: what to look at."""
    return f'<p class="note">{esc(text)}</p>'


def _percentile_note(d: dict) -> str:
    """Which p50 is which: the request at a percentile vs the percentile of all TTFTs."""
    s = d["summary"]
    view = {v["percentile"]: v for v in d["percentiles"]}
    if 50 not in view or s.get("ttft_p50_ms") is None:
        return ""
    return (f"Each column is one real request: the one at that percentile of TTFT (nearest "
            f"rank), so its legs add up. The p50 request's TTFT is "
            f"{fmt(view[50]['ttft_ms'])} ms; the summary's p50 of all TTFTs is "
            f"{fmt(s['ttft_p50_ms'])} ms, interpolated between the two middle requests.")


def _summary_sentence(d: dict) -> str:
    s = d["summary"]
    share = s.get("unaccounted_share")
    return (f"{s['requests']} requests over {s['pairs']} prefill->decode pairs "
            f"({s['first_contact_requests']} first contacts) from "
            f"{d['inputs']['traces']['spans']} spans; over all requests TTFT mean "
            f"{fmt(s['ttft_mean_ms'])} ms, p50 {fmt(s['ttft_p50_ms'])} ms, p99 "
            f"{fmt(s['ttft_p99_ms'])} ms (percentiles of the distribution). The legs cover "
            f"{fmt(s['stacked_mean_ms'])} ms on average"
            + (f" ({fmt(s['coarse_mean_ms'])} ms of it only in coarse legs, from Dynamo's and "
               "vLLM's own telemetry)" if s.get("coarse_mean_ms") else "")
            + f"; {fmt(s['unaccounted_mean_ms'])} ms"
            + (f" ({fmt(100 * share)}% of TTFT)" if share is not None else "")
            + " is unaccounted. TTFT sources: "
            + ", ".join(f"{v} x {k}" for k, v in s["ttft_sources"].items()) + "."
            + (f" NVIDIA Dynamo's frontend measured a mean TTFT of "
               f"{fmt(s['dynamo_ttft_mean_ms'])} ms (its ttft_ms)."
               if s.get("dynamo_ttft_mean_ms") is not None else ""))


def render_markdown(report: Report) -> str:
    """The report as Markdown (same numbers as the JSON)."""
    d = report.data
    t = _tables(d)
    out = [f"# {d['title']}", "", _summary_sentence(d), "",
           "## Verdict: where TTFT goes, stage by stage", ""]
    for n, (c, line) in enumerate(_verdict_lines(d), start=1):
        out.append(f"{n}. **{line}**")
        out.extend(f"   - {e}" for e in c["evidence"])
    levels = _level_lines(d)
    if levels:
        out += ["", "Per concurrency level:", ""] + [f"- {x}" for x in levels]
    out += causes_view.markdown(d)  # issue 19: why the legs were long
    out += cpu_waits_view.markdown(d)  # issue 19: which process waited for a core
    sections = [("TTFT per concurrency level", "levels"),
                (capacity_view.TITLE, "capacity"),
                (whatif_view.TITLE, "whatif"),
                ("The requests at p50, p90 and p99 (stages stacked, ms)", "percentiles"),
                ("Every leg of TTFT, in path order", "legs"),
                ("Each span on its own", "phases"),
                ("First contact vs steady state per pair", "pairs"),
                ("Trace propagation, hop by hop", "propagation"),
                ("Clock skew (offsets added to each clock)", "skew"),
                ("Skew bounds per pair of clocks", "skew_pairs"),
                ("Links during transfer windows", "links"),
                ("What this transfer should cost (microbench, an estimate for this path)",
                 "should_cost"),
                ("vLLM KV Transfer metrics log lines", "kv_log"),
                ("vllm:nixl_* metrics", "nixl"), ("Placement records", "placement"),
                ("Skipped inputs", "skipped")]
    empty = _empty_sentences(d)
    for title, key in sections:
        if key in t and (t[key][1] or key in empty):
            out += ["", f"## {title}", "", md_table(*t[key], empty=empty.get(key))]
            if key == "percentiles" and _percentile_note(d):
                out += ["", _percentile_note(d)]
            if key == "should_cost" and d["should_cost"].get("summary"):
                out += ["", d["should_cost"]["summary"]]
            if key == "capacity":
                out += [""] + capacity_view.capacity_text(d)
            if key == "whatif":
                out += [""] + [f"- {x}" for x in whatif_view.whatif_text(d)]
    sk = d["skew"]
    out += ["", f"Residual causal violations after skew correction: "
            f"{sk['residual_violations']} (before: {sk['violations_before_correction']}); "
            f"worst {fmt(sk['worst_residual_ms'])} ms."]
    if d["notes"]:
        out += ["", "## Notes", ""] + [f"- {n}" for n in d["notes"]]
    return "\n".join(out) + "\n"


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page with its figures embedded."""
    d = report.data
    t = _tables(d)
    p = report.plots
    sections: list[tuple[str, str]] = []
    summary = f"<p>{esc(_summary_sentence(d))}</p>"
    # Picture first (issue 22): the figures open the page, above the verdict.
    glance = figures.waterfall_block(d.get("waterfall", [])) + figures.levels_block(
        d.get("stages_by_level", []))
    if glance:
        sections.append(("At a glance: where one request's time goes, and what load costs",
                         f"<style>{figures.CSS}</style>{glance}"))
    items = "".join(
        f"<li><b>{esc(line)}</b><ul>" + "".join(f"<li>{esc(e)}</li>" for e in c["evidence"])
        + "</ul></li>" for c, line in _verdict_lines(d))
    levels = "".join(f"<li>{esc(x)}</li>" for x in _level_lines(d))
    sections.append(("Summary", summary))
    sections.append(("Verdict: where TTFT goes, stage by stage",
                     f"<ol class=\"verdict\">{items}</ol>"
                     + (f"<p>Per concurrency level:</p><ul>{levels}</ul>" if levels else "")
                     + "<p class=\"note\">Share = a stage's mean per request over the mean "
                     "TTFT. Stages sum the legs between milestones of the request's path; "
                     "unaccounted is what no leg covers. Lines marked estimate rest on "
                     "something not measured in these traces.</p>"))
    if causes_view.html(d, esc):
        sections.append((causes_view.TITLE, causes_view.html(d, esc)))
    if cpu_waits_view.html(d, esc):
        sections.append((cpu_waits_view.TITLE, cpu_waits_view.html(d, esc)))
    sections.append(("TTFT per concurrency level", html_table(*t["levels"])))
    if "capacity" in t:
        sections.append((capacity_view.TITLE, html_table(*t["capacity"]) + "".join(
            f"<p class=\"note\">{esc(x)}</p>" for x in capacity_view.capacity_text(d))))
    if "whatif" in t:
        sections.append((whatif_view.TITLE, html_table(*t["whatif"]) + "".join(
            f"<p class=\"note\">{esc(x)}</p>" for x in whatif_view.whatif_text(d))))
    block = ""
    if "stacked_percentiles" in p:
        block += html_img(p["stacked_percentiles"], "stacked breakdown per percentile") + _say(
            "The p50, p90 and p99 requests side by side, stages stacked: look at which colour "
            "makes the slow request slow; the table below has the numbers.")
    sections.append(("Percentile view", block + html_table(*t["percentiles"])
                     + f"<p class=\"note\">{esc(_percentile_note(d))}</p>"))
    sections.append(("Every leg of TTFT, in path order", html_table(*t["legs"])))
    sections.append(("Each span on its own", html_table(*t["phases"])
                     + "<p class=\"note\">Spans overlap (the KV held by prefill runs beside "
                     "the decode side's handshake and transfer); the legs above do not.</p>"))
    block = html_img(p["ttft_by_pair"], "TTFT per pair") + _say(
        "TTFT of each request in the order it reached its prefill -> decode pair, the first "
        "contact circled: a first point far above the rest is the one-time cost of a new "
        "pair (handshake, registration).") if "ttft_by_pair" in p else ""
    sections.append(("First contact vs steady state per pair", block + html_table(*t["pairs"])))
    if t["propagation"][1]:
        sections.append(("Trace propagation, hop by hop", html_table(*t["propagation"])
                         + "<p class=\"note\">Per hop: requests whose two sides share a "
                         "trace (traceparent forwarded), those joined by a request id only, "
                         "and sides that found no partner (that hop dropped both; the "
                         "notes name it). For the client, joined by id counts aiperf records "
                         "matched by X-Request-Id (or by time window).</p>"))
    sk = d["skew"]
    empty = _empty_sentences(d)
    sections.append(("Clock skew", html_table(*t["skew"], empty=empty["skew"])
                     + html_table(*t["skew_pairs"], empty=empty["skew_pairs"])
                     + f"<p>Residual causal violations after correction: "
                     f"<b>{sk['residual_violations']}</b> (before: "
                     f"{sk['violations_before_correction']}; worst "
                     f"{esc(fmt(sk['worst_residual_ms']))} ms). Reference clock: "
                     f"{esc(sk['reference_clock'])}.</p>"))
    if "links" in t:
        block = html_table(*t["links"], empty=empty["links"])
        if "transfer_rates" in p:
            block += html_img(p["transfer_rates"], "transfer GB/s vs link rate") + _say(
                "Each transfer's achieved GB/s against the dashed rate of its link: points far "
                "below the line are transfers that did not use the link's bandwidth.")
        if "link_timeline" in p:
            block += html_img(p["link_timeline"], "link utilisation timeline") + _say(
                "GB/s on each link counter over the run: bursts line up with KV transfers; a "
                "busy link outside them is other traffic sharing it.")
        sections.append(("Links during transfer windows", block))
    else:
        sections.append(("Links during transfer windows",
                         "<p class=\"note\">No collector samples given (--samples): link "
                         "utilisation has no data.</p>"))
    if "should_cost" in t:
        sections.append(("What this transfer should cost",
                         "<p class=\"estimate\">Estimate: measured by kvprof microbench, not "
                         "in these traces.</p>" + html_table(*t["should_cost"])
                         + (f"<p>{esc(d['should_cost']['summary'])}</p>"
                            if d["should_cost"].get("summary") else "")))
    for title, key in (("vLLM KV Transfer metrics log lines", "kv_log"),
                       ("vllm:nixl_* metrics", "nixl"), ("Placement records", "placement")):
        if key in t:
            sections.append((title, html_table(*t[key])))
    if t["skipped"][1]:
        sections.append(("Skipped inputs", html_table(*t["skipped"])))
    if d["notes"]:
        sections.append(("Notes", "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in d["notes"])
                         + "</ul>"))
    subtitle = (f"{d['inputs']['traces']['spans']} spans from {d['inputs']['traces']['source']}"
                f" · generated {d['generated_at']}")
    return html_page(d["title"], subtitle, sections)


def write_report(report: Report, out: Path, fmt_name: str) -> Path:
    """Write the report in one format; the parent folder is created."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt_name == "json":
        # NaN is not JSON: a missing number is null, as everywhere else in the report.
        text = json.dumps(_no_nan(report.data), indent=1, default=str, allow_nan=False)
    elif fmt_name == "md":
        text = render_markdown(report)
    else:
        text = render_html(report)
    return write_public(out, text)


def _no_nan(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nan(v) for v in value]
    return value


def run_report_command(traces: str, samples: Path | None, aiperf: Path | None,
                       microbench: Path | None, placement: Path | None, service: str | None,
                       lookback: str, out: Path | None, fmt: str | None,
                       vllm_log: Path | list[Path] | None = None,
                       vllm_metrics: Path | None = None, client_host: str | None = None,
                       one_clock: bool = False,
                       dynamo_log: Path | list[Path] | None = None,
                       engine: str = "pandas", stream: str = "auto",
                       shards: int | None = None) -> str:
    """The body of `kvprof report`; returns the one-line summary the CLI prints.

    ``fmt`` None: from ``out``'s suffix (html without one); ``out`` None: out/report.<fmt>."""
    out, fmt_name = resolve_output(out, fmt, FORMATS, "html", DEFAULT_OUT)
    from kvprof.outputs import check_output

    check_output(out, "--out")  # before minutes of work, not after (issue 21)
    if stream not in ("auto", "on", "off"):
        from kvprof.errors import UsageError

        raise UsageError(f"--stream {stream}: not auto, on or off",
                         hint="--stream on breaks large traces down shard by shard.")
    if shards is not None:
        from kvprof.inputs import option_number

        option_number(shards, "--shards", minimum=1, strict=False)
    report = build_report(ReportInputs(
        traces=traces, samples=samples, aiperf=aiperf, microbench=microbench,
        placement=placement, vllm_log=vllm_log, vllm_metrics=vllm_metrics, service=service,
        lookback=lookback, client_host=client_host, one_clock=one_clock,
        dynamo_log=dynamo_log, engine=engine, stream=stream, shards=shards),
        with_plots=fmt_name == "html")
    path = write_report(report, out, fmt_name)
    s = report.data["summary"]
    top = report.data["verdict"][0] if report.data["verdict"] else None
    skipped = len(report.data["inputs"]["traces"]["skipped"])
    line = (f"Wrote {path}: {s['requests']} requests, TTFT p99 {_ms(s['ttft_p99_ms'])}"
            + (_blind_spot_words(top) if top and top["cause"] == "blind_spot" else
               f"; top cause: {stage_words(top['cause'])} ({100 * top['share']:.0f}% of mean "
               "TTFT)" if top else ""))
    if skipped:
        line += f"; skipped {skipped} trace file(s): " + ", ".join(
            Path(x["file"]).name for x in report.data["inputs"]["traces"]["skipped"])
    return line


def _blind_spot_words(top: dict) -> str:
    """The verdict's blind-spot lead (kvprof.analysis.blind_spot), short: how much of TTFT is
    not measured finely and the command that would measure it, before any named cause."""
    return (f"; {100 * top['share']:.0f}% of mean TTFT not measured finely "
            f"({top['unaccounted_ms']:.1f} ms unaccounted, {top['coarse_ms']:.1f} ms coarse);"
            f" measure it: {top['command']}")


def _ms(v) -> str:
    return NO_DATA if v is None else f"{v:.0f} ms"
