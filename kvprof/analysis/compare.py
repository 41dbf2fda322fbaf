"""`kvprof compare`: two deployments' aiperf trees -> the seed report's tables + Pareto plot.

A tree holds one folder per concurrency, each an aiperf run of any release: its summary JSON
(schema 1.x or 0.1.x's "records"), else its summary CSV, else its profile_export.jsonl alone,
whose aggregates are then recomputed as aiperf computes them (kvprof.analysis.loaders.aiperf); the
tables say which runs were recomputed.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvprof.analysis.loaders.aiperf import (
    MAX_CONCURRENCY,
    RECORDS_FILE,
    SUMMARY_CSV,
    SUMMARY_JSON,
    concurrency_of,
    load_aiperf_summary,
)
from kvprof.analysis.views.render import fmt, md_table
from kvprof.errors import BadInputError, UsageError

log = logging.getLogger(__name__)
# A run folder's name as aiperf scripts write it (c1, c10, concurrency_100, run-c5).
RUN_NAME = re.compile(r"(?:^|[_-])c(?:oncurrency)?[_-]?\d+$")

if TYPE_CHECKING:
    import pandas as pd

# (row label, metric, stat, lower is better) in the seed report's order.
ROWS = (
    ("TTFT avg (ms)", "time_to_first_token", "avg", True),
    ("TTFT p99 (ms)", "time_to_first_token", "p99", True),
    ("ITL avg (ms)", "inter_token_latency", "avg", True),
    ("Request latency avg (ms)", "request_latency", "avg", True),
    ("Request latency p99 (ms)", "request_latency", "p99", True),
    ("Output tok/s total", "output_token_throughput", "avg", False),
    ("Output tok/s per GPU", "tps_per_gpu", "", False),
    ("Output tok/s per user", "tps_per_user", "", False),
)


def load_tree(root: Path, gpus: int | None) -> pd.DataFrame:
    """One row per concurrency folder: the metrics the tables need (NaN where absent).

    ``summary_source`` names what each row was read from, ``recomputed`` is True where only
    per-request records were there, ``notes`` carries what the reader said about the run.
    """
    import pandas as pd

    from kvprof.inputs import path_problem

    why = path_problem(root, "dir")
    if why:
        raise BadInputError(f"aiperf tree {root}: {why}" if why == "not found" or
                            why.startswith(("cannot", "standard")) else f"aiperf tree {root} {why}",
                            hint="Pass the --output-artifact-dir parent holding c1/, c10/, ...")
    rows = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir():
            if RUN_NAME.search(entry.name):  # a run folder that is a file: say so, not skip it
                log.warning("%s: skipped %s: a file where a run folder (one per concurrency) "
                            "was expected", root, entry.name)
            continue
        run = entry
        if not any((run / f).exists() for f in (SUMMARY_JSON, SUMMARY_CSV, RECORDS_FILE)):
            log.warning("%s: skipped %s: no %s, %s or %s in it", root, run.name, SUMMARY_JSON,
                        SUMMARY_CSV, RECORDS_FILE)
            continue
        m = load_aiperf_summary(run)
        summary_json = run / SUMMARY_JSON
        conc = concurrency_of(run, summary_json if summary_json.exists() else None)
        if conc is None:
            raise BadInputError(f"cannot tell the concurrency of {run} (a whole number from 1 "
                                f"to {MAX_CONCURRENCY:,} in its name or input_config)",
                                hint="Name run folders c1, c10, ... as the seed's script does.")
        row: dict[str, Any] = {"concurrency": conc, "run": str(run),
                               "summary_source": m.kind, "recomputed": m.recomputed,
                               "notes": list(m.notes)}
        for _, metric, stat, _ in ROWS:
            if stat:
                row[f"{metric}.{stat}"] = m.get(metric, {}).get(stat, math.nan)
        total = row["output_token_throughput.avg"]
        row["tps_per_gpu"] = total / gpus if gpus else math.nan
        row["tps_per_user"] = total / conc
        rows.append(row)
    if not rows:
        raise BadInputError(f"no aiperf runs under {root}",
                            hint=f"Expected sub-folders (one per concurrency) with {SUMMARY_JSON}, "
                                 f"{SUMMARY_CSV} or {RECORDS_FILE}.")
    tree = pd.DataFrame(rows).sort_values("concurrency").reset_index(drop=True)
    dup = tree["concurrency"][tree["concurrency"].duplicated()]
    if len(dup):
        raise BadInputError(f"{root} holds two runs of concurrency {int(dup.iloc[0])}",
                            hint="Keep one run folder per concurrency in a tree.")
    return tree


def run_sources(tree: pd.DataFrame) -> list[dict]:
    """Per run of a tree: its concurrency, folder, what was read and the reader's notes."""
    return [{"concurrency": int(r["concurrency"]), "run": r["run"],
             "source": r["summary_source"], "recomputed": bool(r["recomputed"]),
             "notes": list(r["notes"])} for _, r in tree.iterrows()]


def _sources_markdown(sources: dict[str, list[dict]]) -> list[str]:
    out = []
    for name, runs in sources.items():
        redone = [f"c{r['concurrency']}" for r in runs if r["recomputed"]]
        if redone:
            out.append(f"{name}: {', '.join(redone)} had no aiperf summary: aggregates "
                       f"recomputed from {RECORDS_FILE} as aiperf computes them.")
        csv_runs = [f"c{r['concurrency']}" for r in runs if r["source"] == SUMMARY_CSV]
        if csv_runs:
            out.append(f"{name}: {', '.join(csv_runs)} read from {SUMMARY_CSV} (aiperf rounds "
                       "it to 2 decimals).")
    notes = sorted({n for runs in sources.values() for r in runs if r["recomputed"]
                    for n in r["notes"] if not n.startswith("Aggregates recomputed")})
    return out + notes


def _column(metric: str, stat: str) -> str:
    return f"{metric}.{stat}" if stat else metric


def comparison_tables(base: pd.DataFrame, cand: pd.DataFrame, names: tuple[str, str]
                      ) -> list[dict]:
    """Per table row (metric): each concurrency both runs have, with winner and ratio."""
    merged = base.merge(cand, on="concurrency", suffixes=("_b", "_c"))
    tables = []
    for label, metric, stat, lower in ROWS:
        col = _column(metric, stat)
        rows = []
        for _, r in merged.iterrows():
            b, c = r[f"{col}_b"], r[f"{col}_c"]
            if math.isnan(b) or math.isnan(c):
                continue
            if math.isclose(b, c, rel_tol=1e-9):  # equal but for float rounding
                winner, ratio = "tie", 1.0
            else:
                base_wins = (b < c) if lower else (b > c)
                winner = names[0] if base_wins else names[1]
                hi, lo = max(b, c), min(b, c)
                ratio = hi / lo if lo > 0 else None
            row = {"concurrency": int(r["concurrency"]), names[0]: float(b),
                   names[1]: float(c), "winner": winner, "ratio": ratio}
            if ratio is None:  # "infx" says nothing: say why there is no ratio
                zero = [n for n, v in zip(names, (b, c), strict=True) if v <= 0]
                verb = "is" if len(zero) == 1 else "are"
                row["ratio_na"] = f"n/a ({' and '.join(zero)} {verb} 0)"
            rows.append(row)
        tables.append({"label": label, "metric": col, "lower_is_better": lower, "rows": rows})
    return tables


def _side(v: float):
    """A compared value: small ones keep significant digits (0.0035, not 0.0 beside a 282x)."""
    from kvprof.analysis.views.render import sig

    return sig(v) if 0 < abs(v) < 1 else v


def render_markdown(tables: list[dict], names: tuple[str, str], gpus: tuple,
                    sources: dict[str, list[dict]] | None = None) -> str:
    out = [f"# {names[0]} vs {names[1]}", "",
           f"GPUs: {names[0]} {gpus[0] or 'not given'}, {names[1]} {gpus[1] or 'not given'}. "
           "Ratio = worse / better (how many times the winner is better)."]
    said = _sources_markdown(sources or {})
    if said:
        out += [""] + [f"- {line}" for line in said]
    for t in tables:
        out += ["", f"## {t['label']}", ""]
        if not t["rows"]:
            out.append("no data (neither run holds this metric at a common concurrency)")
            continue
        out.append(md_table(["concurrency", names[0], names[1], "winner", "ratio"],
                            [[r["concurrency"], _side(r[names[0]]), _side(r[names[1]]),
                              r["winner"], r.get("ratio_na") or f"{r['ratio']:.2f}x"]
                             for r in t["rows"]]))
    return "\n".join(out) + "\n"


def run_compare_command(baseline: Path, candidate: Path, gpus: list[int], baseline_name: str,
                        candidate_name: str, out: Path, fmt: str) -> tuple[str, str]:
    """The body of `kvprof compare`: writes compare.md/.json and pareto.png/.svg."""
    from kvprof.analysis.views.plots import pareto

    fmt_name = fmt.lower()
    if fmt_name not in ("md", "json"):
        raise UsageError(f"--format {fmt!r} is not md or json")
    from kvprof.outputs import atomic_write, check_output

    check_output(out, "--out", want="dir")  # before the work (issue 21)
    if len(gpus) not in (0, 2):
        raise UsageError("give --gpus twice (baseline then candidate), e.g. --gpus 10 --gpus 10")
    if any(g <= 0 for g in gpus):
        raise UsageError("--gpus must be >= 1")
    g = (gpus[0], gpus[1]) if gpus else (None, None)
    names = (baseline_name, candidate_name)
    if names[0] == names[1]:
        raise UsageError("--baseline-name and --candidate-name must differ")
    base, cand = load_tree(baseline, g[0]), load_tree(candidate, g[1])
    tables = comparison_tables(base, cand, names)
    sources = {names[0]: run_sources(base), names[1]: run_sources(cand)}
    doc = {"baseline": {"name": names[0], "tree": str(baseline), "gpus": g[0],
                        "runs": sources[names[0]]},
           "candidate": {"name": names[1], "tree": str(candidate), "gpus": g[1],
                         "runs": sources[names[1]]},
           "tables": tables}
    md = render_markdown(tables, names, g, sources)
    atomic_write(out / "compare.md", md)
    atomic_write(out / "compare.json", json.dumps(doc, indent=1))
    written = ["compare.md", "compare.json"]
    if gpus:
        png, svg = pareto({names[0]: base, names[1]: cand})
        atomic_write(out / "pareto.png", png)
        atomic_write(out / "pareto.svg", svg)
        written += ["pareto.png", "pareto.svg"]
        note = ""
    else:
        note = " (no Pareto plot: tok/s per GPU needs --gpus)"
    text = json.dumps(doc, indent=1) if fmt_name == "json" else md
    return text, f"Wrote {', '.join(written)} to {out}{note}"


__all__ = ["comparison_tables", "fmt", "load_tree", "run_compare_command", "run_sources"]
