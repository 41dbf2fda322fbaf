"""Matplotlib figures of the report, returned as PNG bytes (the HTML embeds them as base64)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from kvprof.analysis.breakdown import UNACCOUNTED
from kvprof.analysis.legs import STAGES
from kvprof.analysis.views.words import stage_colour, stage_words

if TYPE_CHECKING:
    import pandas as pd



def _mpl_colour(colour: str):
    """A CSS colour matplotlib can read (hsl() of a new stage -> an RGB tuple)."""
    if not colour.startswith("hsl("):
        return colour
    import colorsys

    h, sat, light = (float(x.strip("%")) for x in colour[4:-1].split(","))
    return colorsys.hls_to_rgb(h / 360, light / 100, sat / 100)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def stacked_percentiles(view: list[dict]) -> bytes:
    """Horizontal stacked bars: the stages of the p50 / p90 / p99 TTFT requests."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 0.9 + 0.7 * len(view)))
    labels = [f"p{v['percentile']} request ({v['ttft_ms']:.0f} ms)" for v in view]
    for row, v in enumerate(view):
        left = 0.0
        # Known stages in path order, then any a newer analysis added, unaccounted last.
        for stage in dict.fromkeys([*STAGES, *v["stages_ms"], UNACCOUNTED]):
            width = v["stages_ms"].get(stage) or 0.0
            if width <= 0:
                continue
            name = stage_words(stage)
            ax.barh(row, width, left=left, color=_mpl_colour(stage_colour(stage)),
                    label=name if name not in ax.get_legend_handles_labels()[1] else None,
                    edgecolor="white", linewidth=0.5)
            left += width
    ax.set_yticks(range(len(view)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("ms from the client's send (stages of the request's path, stacked)")
    ax.set_title("Where TTFT goes: the requests at p50, p90 and p99")
    handles, names = ax.get_legend_handles_labels()
    uniq = dict(zip(names, handles, strict=True))
    ax.legend(uniq.values(), uniq.keys(), loc="upper center", bbox_to_anchor=(0.5, -0.25),
              ncol=2, fontsize=8, frameon=False)
    return _png(fig)


def ttft_by_pair(req: pd.DataFrame) -> bytes:
    """TTFT against the request's index within its (prefill, decode) pair."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    for pair, grp in req.dropna(subset=["ttft_ms"]).groupby("pair", sort=True):
        ax.plot(grp["pair_index"], grp["ttft_ms"], marker="o", markersize=3, label=pair)
        first = grp[grp["first_contact"]]
        ax.scatter(first["pair_index"], first["ttft_ms"], s=70, facecolors="none",
                   edgecolors="black", zorder=3)
    ax.set_xlabel("request index within the pair (circled: first contact; "
                  "pairs with equal TTFTs overlap)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("TTFT per prefill -> decode pair")
    if ax.get_legend_handles_labels()[0]:  # one file may hold no pair with a TTFT
        ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    return _png(fig)


def transfer_rates(links: pd.DataFrame) -> bytes:
    """Achieved GB/s of each transfer against the rate of the link that carried it."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    for path, grp in links.groupby("path", sort=True):
        ax.scatter(range(len(grp)), grp["achieved_gbps"], s=14, label=f"{path}: achieved")
        rate = grp["link_rate_gbps"].dropna()
        if len(rate):
            ax.axhline(rate.median(), linestyle="--", linewidth=1,
                       color=ax.collections[-1].get_facecolor()[0],
                       label=f"{path}: link rate {rate.median():.1f} GB/s")
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("transfer (in time order, per path)")
    ax.set_ylabel("GB/s (log)")
    ax.set_title("KV transfer throughput vs link rate")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _png(fig)


def link_timeline(timeline: pd.DataFrame) -> bytes:
    """GB/s per link counter over time (seconds from the first sample)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    t0 = timeline["ts"].min()
    for (node, entity, metric), grp in timeline.groupby(["node", "entity", "metric"]):
        ax.plot(grp["ts"] - t0, grp["gbps"], linewidth=1,
                label=f"{node} {entity} {metric.replace('kvprof_', '')}")
    ax.set_xlabel("seconds since the first sample (reference clock)")
    ax.set_ylabel("GB/s")
    ax.set_title("Link utilisation timeline")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(fig)


def pareto(curves: dict[str, pd.DataFrame]) -> tuple[bytes, bytes]:
    """tok/s/GPU vs tok/s/user, one curve per deployment, labelled by concurrency: PNG, SVG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, df in curves.items():
        d = df.dropna(subset=["tps_per_user", "tps_per_gpu"]).sort_values("tps_per_user")
        ax.plot(d["tps_per_user"], d["tps_per_gpu"], marker="o", label=name)
        for _, r in d.iterrows():
            ax.annotate(f"c{int(r['concurrency'])}", (r["tps_per_user"], r["tps_per_gpu"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("output tokens/s per user")
    ax.set_ylabel("output tokens/s per GPU")
    ax.set_title("Pareto: throughput per GPU vs per user")
    ax.grid(alpha=0.3)
    ax.legend()
    png, svg = io.BytesIO(), io.BytesIO()
    fig.savefig(png, format="png", dpi=120, bbox_inches="tight")
    fig.savefig(svg, format="svg", bbox_inches="tight")
    plt.close(fig)
    return png.getvalue(), svg.getvalue()
