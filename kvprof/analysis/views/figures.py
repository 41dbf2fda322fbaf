"""The report's first figures as inline SVG: the request waterfall and the stages per level.

Inline SVG needs no network and stays crisp at any width: the waterfall of a representative
request and the stacked stages per concurrency level, in the verdict's words.
"""

from __future__ import annotations

import math

from kvprof.analysis.views import words as w
from kvprof.analysis.views.render import esc, fmt

WIDTH = 1160  # viewBox width; the SVG scales to the page (max-width 100%)
LABEL_W = 210  # left column: process / level names
RIGHT_PAD = 70
ROW_H = 30
BAR_H = 20
CHAR_W = 6.4  # average width of a 11px system-ui glyph, to decide whether a label fits

CSS = """
.fig{margin:.4rem 0 1.2rem}.fig svg{width:100%;height:auto;display:block}
.fig svg text{font:11px system-ui,-apple-system,Segoe UI,Roboto,sans-serif;fill:#222}
.fig svg text.in{fill:#111}.fig svg text.axis{fill:#555}.fig svg .grid{stroke:#e4e4e4}
.fig .caption{color:#444;font-size:.92rem;margin:.3rem 0 0}
.legend{display:flex;flex-wrap:wrap;gap:.2rem 1rem;font-size:.82rem;margin:.3rem 0;
padding:0;list-style:none}.legend li{display:flex;align-items:center;gap:.35rem}
.legend i{display:inline-block;width:.9rem;height:.9rem;border:1px solid #0002}
.legend i.wait{background-image:repeating-linear-gradient(45deg,#fff8 0 2px,transparent 2px 5px)}
.wf>input{position:absolute;opacity:0}.wf>label{display:inline-block;padding:.25rem .7rem;
border:1px solid #bbb;border-radius:4px;margin:0 .4rem .3rem 0;cursor:pointer;font-size:.9rem}
.wf>input:checked+label{background:#1f4e79;color:#fff;border-color:#1f4e79}
.wf>input:focus-visible+label{outline:2px solid #1f77b4}
.wf .panel{display:none}
"""


def _nice_step(span: float, ticks: int = 8) -> float:
    raw = max(span, 1e-9) / ticks
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def _axis(x0: float, scale: float, total: float, y_top: float, y_bottom: float,
          label: str) -> list[str]:
    out = []
    step = _nice_step(total)
    t = 0.0
    while t <= total * 1.0001:
        x = x0 + t * scale
        out.append(f'<line class="grid" x1="{x:.1f}" y1="{y_top}" x2="{x:.1f}" '
                   f'y2="{y_bottom}"/>')
        out.append(f'<text class="axis" x="{x:.1f}" y="{y_bottom + 14}" '
                   f'text-anchor="middle">{fmt(t, 0) if step >= 1 else fmt(t, 1)}</text>')
        t += step
    out.append(f'<text class="axis" x="{x0 + total * scale / 2:.1f}" y="{y_bottom + 30}" '
               f'text-anchor="middle">{esc(label)}</text>')
    return out


def _defs() -> str:
    # White diagonal stripes over a bar's colour mark waiting (queues, step boundaries).
    return ('<defs><pattern id="kvprof-wait" width="6" height="6" '
            'patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
            '<rect width="2.5" height="6" fill="#ffffff" fill-opacity="0.55"/></pattern></defs>')


def _fit(text: str, width: float) -> str | None:
    """``text`` cut to fit ``width`` px (with an ellipsis), or None when not even 6 chars fit."""
    room = int((width - 8) / CHAR_W)
    if room >= len(text):
        return text
    return text[:room - 1].rstrip() + "…" if room >= 6 else None


def _bar(x: float, y: float, width: float, colour: str, wait: bool, title: str,
         label: str | None) -> list[str]:
    out = [f'<g><title>{esc(title)}</title>'
           f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(width, 1.5):.1f}" height="{BAR_H}" '
           f'fill="{colour}" stroke="#fff" stroke-width="0.8"/>']
    if wait:
        out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(width, 1.5):.1f}" '
                   f'height="{BAR_H}" fill="url(#kvprof-wait)"/>')
    text = _fit(label, width) if label else None
    if text:
        out.append(f'<text class="in" x="{x + 4:.1f}" y="{y + BAR_H / 2 + 4:.1f}">'
                   f'{esc(text)}</text>')
    out.append("</g>")
    return out


def legend(stages: list[str], waits: bool = False) -> str:
    """The colour key of the stages shown, in words (and the hatching, when used)."""
    items = [f'<li><i style="background:{w.stage_colour(s)}"></i>{esc(w.stage_words(s))}</li>'
             for s in stages]
    if waits:
        items.append('<li><i class="wait" style="background-color:#999"></i>'
                     'hatched: waiting (a queue, a step boundary)</li>')
    return f'<ul class="legend">{"".join(items)}</ul>'


def waterfall_svg(req: dict) -> str:
    """One request: a row per process, each leg a bar at its time on a shared axis."""
    legs = req["legs"]
    rows: list[str] = []
    for leg in legs:
        if leg["process"] not in rows:
            rows.append(leg["process"])
    unacc = req.get("unaccounted_ms") or 0.0
    show_unacc = abs(unacc) >= max(0.5, 0.01 * req["ttft_ms"])
    if show_unacc:
        rows.append("not placed (unaccounted)")
    end = max([req["ttft_ms"], *[x["start_ms"] + x["ms"] for x in legs]])
    plot_w = WIDTH - LABEL_W - RIGHT_PAD
    scale = plot_w / end if end > 0 else 1.0
    top = 8
    height = top + ROW_H * len(rows) + 42
    out = [f'<svg viewBox="0 0 {WIDTH} {height}" role="img" '
           f'aria-label="{esc(_title(req))}" xmlns="http://www.w3.org/2000/svg">', _defs()]
    bottom = top + ROW_H * len(rows)
    out += _axis(LABEL_W, scale, end, top, bottom, "ms since the client sent the request")
    for i, name in enumerate(rows):
        y = top + i * ROW_H
        out.append(f'<text x="{LABEL_W - 8}" y="{y + ROW_H / 2 + 4:.1f}" '
                   f'text-anchor="end">{esc(name)}</text>')
    prev = None
    for leg in legs:
        y = top + rows.index(leg["process"]) * ROW_H + (ROW_H - BAR_H) / 2
        x = LABEL_W + leg["start_ms"] * scale
        if prev is not None and prev[1] != y:  # a hand-off between processes
            out.append(f'<line x1="{x:.1f}" y1="{min(prev[1], y) + BAR_H / 2:.1f}" '
                       f'x2="{x:.1f}" y2="{max(prev[1], y) + BAR_H / 2:.1f}" stroke="#999" '
                       'stroke-width="0.6" stroke-dasharray="2,2"/>')
        words = w.leg_words(leg["leg"], req["chain"])
        title = (f"{words}: {fmt(leg['ms'])} ms, from {fmt(leg['start_ms'])} ms "
                 f"({w.stage_words(leg['stage'])}; {leg['process']})")
        out += _bar(x, y, leg["ms"] * scale, w.stage_colour(leg["stage"]), leg["wait"], title,
                    f"{fmt(leg['ms'], 0)} ms {words}")  # the number first: it survives a cut
        prev = (x, y)
    if show_unacc:
        y = top + (len(rows) - 1) * ROW_H + (ROW_H - BAR_H) / 2
        out += _bar(LABEL_W, y, abs(unacc) * scale, w.stage_colour(w.UNACCOUNTED), False,
                    f"{fmt(unacc)} ms of TTFT no leg covers; where on the path is not known",
                    f"{fmt(unacc)} ms no leg covers (position unknown)")
    out.append("</svg>")
    return "".join(out)


def _title(req: dict) -> str:
    return (f"p{req['percentile']} request: TTFT {fmt(req['ttft_ms'])} ms, its legs per "
            "process on one time axis")


def waterfall_block(reqs: list[dict]) -> str:
    """The waterfall figure: the p50 and the p99 request, one shown at a time (radio buttons
    and CSS, no script), with its legend and a caption saying what to look at."""
    if not reqs:
        return ""
    parts = ['<div class="fig wf">']
    css = []
    for i, r in enumerate(reqs):
        rid = f"wf-p{r['percentile']}"
        checked = " checked" if i == 0 else ""
        parts.append(f'<input type="radio" name="wf" id="{rid}"{checked}>'
                     f'<label for="{rid}">p{r["percentile"]} request '
                     f'({fmt(r["ttft_ms"], 0)} ms)</label>')
        css.append(f"#{rid}:checked~.{rid}")
    for r in reqs:
        rid = f"wf-p{r['percentile']}"
        stages = list(dict.fromkeys(x["stage"] for x in r["legs"]))
        parts.append(f'<div class="panel {rid}">{waterfall_svg(r)}'
                     f'{legend(stages, any(x["wait"] for x in r["legs"]))}'
                     f'<p class="caption">{esc(waterfall_caption(r))}</p></div>')
    parts.append("</div>")
    return f"<style>{','.join(css)}{{display:block}}</style>" + "".join(parts)


def waterfall_caption(r: dict) -> str:
    """What to look at, and which p50 this is (the request's own vs the distribution's)."""
    legs = sorted(r["legs"], key=lambda x: x["ms"], reverse=True)
    top = legs[0] if legs else None
    where = (f" Its longest leg: {w.leg_words(top['leg'], r['chain'])}, {fmt(top['ms'])} ms "
             f"({fmt(100 * top['ms'] / r['ttft_ms'], 0)}% of its TTFT)." if top and r["ttft_ms"]
             else "")
    conc = f" at concurrency {r['concurrency']}" if r.get("concurrency") is not None else ""
    return (f"One real request{conc}, {'a first contact, ' if r['first_contact'] else ''}"
            f"traced end to end: each bar is one leg of its path, on the row of the process "
            f"it runs in (a hop between processes lands on the process it reaches); hatched "
            f"bars are waiting, the rest is work. Look for the longest bars.{where} This is the "
            f"p{r['percentile']} request (nearest rank): its TTFT is {fmt(r['ttft_ms'])} ms; "
            f"the p{r['percentile']} of all {r['requests']} TTFTs in the summary is "
            f"{fmt(r['distribution_ms'])} ms (interpolated between neighbouring requests).")


def _level_name(lv: dict) -> str:
    conc = ("all requests" if lv["concurrency"] is None else f"concurrency {lv['concurrency']}")
    return f"{conc} · {lv['chain'].replace('dynamo ', '')}"


def levels_svg(levels: list[dict]) -> str:
    """A stacked bar per concurrency level (and deployment), one colour per stage."""
    end = max((sum(lv["stages_ms"].values()) + max(lv["unaccounted_ms"], 0.0)
               for lv in levels), default=0.0)
    end = max(end, max((lv["ttft_mean_ms"] for lv in levels), default=0.0))
    plot_w = WIDTH - LABEL_W - RIGHT_PAD
    scale = plot_w / end if end > 0 else 1.0
    top = 8
    height = top + ROW_H * len(levels) + 42
    out = [f'<svg viewBox="0 0 {WIDTH} {height}" role="img" aria-label="mean TTFT per '
           'concurrency level, stacked by stage" xmlns="http://www.w3.org/2000/svg">', _defs()]
    bottom = top + ROW_H * len(levels)
    out += _axis(LABEL_W, scale, end, top, bottom, "mean ms per request, stages stacked in "
                 "path order")
    for i, lv in enumerate(levels):
        y = top + i * ROW_H + (ROW_H - BAR_H) / 2
        out.append(f'<text x="{LABEL_W - 8}" y="{y + BAR_H / 2 + 4:.1f}" text-anchor="end">'
                   f'{esc(_level_name(lv))} ({lv["requests"]})</text>')
        x = LABEL_W
        for stage, ms in lv["stages_ms"].items():
            words = w.stage_words(stage)
            out += _bar(x, y, ms * scale, w.stage_colour(stage), stage in w.WAIT_STAGES,
                        f"{words}: {fmt(ms)} ms mean", words)
            x += ms * scale
        if lv["unaccounted_ms"] > 0:
            out += _bar(x, y, lv["unaccounted_ms"] * scale, w.stage_colour(w.UNACCOUNTED),
                        False, f"{w.UNACCOUNTED_WORDS}: {fmt(lv['unaccounted_ms'])} ms mean",
                        None)
            x += lv["unaccounted_ms"] * scale
        out.append(f'<text x="{x + 5:.1f}" y="{y + BAR_H / 2 + 4:.1f}">'
                   f'{fmt(lv["ttft_mean_ms"], 0)} ms</text>')
    out.append("</svg>")
    return "".join(out)


def levels_block(levels: list[dict]) -> str:
    """The stacked-bars figure with its legend and caption."""
    if not levels:
        return ""
    stages = list(dict.fromkeys(s for lv in levels for s in lv["stages_ms"]))
    if any(lv["unaccounted_ms"] > 0 for lv in levels):
        stages.append(w.UNACCOUNTED)
    chains = sorted({lv["chain"].replace("dynamo ", "") for lv in levels})
    side = (" Aggregated and disaggregated bars of one level sit together."
            if len(chains) > 1 else f" Only the {chains[0]} deployment is in these traces.")
    return (f'<div class="fig">{levels_svg(levels)}'
            f'{legend(stages, any(s in w.WAIT_STAGES for s in stages))}'
            f'<p class="caption">Mean time per request in each stage, one bar per concurrency '
            f'level (requests in brackets, mean TTFT at the end of the bar), same colours as '
            f'above. Look at which colour grows as concurrency rises: that stage is what load '
            f'costs.{esc(side)}</p></div>')
