"""Terminal output of the microbench: progress, the step breakdown, link costs, the sweep."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

STEP_NOTES = {
    "setup": "first contact, paid once",
    "gather": "paged -> contiguous staging",
    "wire": "the transport",
    "scatter": "staging -> paged, new ids",
    "per_descriptor": "paged -> paged, 1 copy each",
    "total": "gather + wire + scatter",
}


class ProgressBar:
    """A rich bar on a terminal; one plain line per token count in a pipe; nothing if quiet."""

    def __init__(self, console: Console, quiet: bool) -> None:
        self.console = console
        self.quiet = quiet
        self.live = not quiet and console.is_terminal
        self._progress: Progress | None = None
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> ProgressBar:
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def update(self, label: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if self._progress is None:
            if done == 0:
                self.console.print(f"measuring {label}: setup + {total - 1} runs ...")
            return
        if label not in self._tasks:
            self._tasks[label] = self._progress.add_task(label, total=total)
        self._progress.update(self._tasks[label], completed=done)


def _num(v: float | None, fmt: str = "{:,.2f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def breakdown_table(result: dict) -> Table:
    """One row per step: ms (median, p10, p90), GB/s, the measured limit and % of it."""
    # Fits 80 columns: two-line headers, no free-text column (step_notes() prints those).
    table = Table(title="KV hand-off, step by step", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    for col in ("step", "median\nms", "p10\nms", "p90\nms", "GB/s", "limit\nGB/s", "% of\nlimit"):
        table.add_column(col, justify="left" if col == "step" else "right", no_wrap=True)
    for name, s in result["steps"].items():
        table.add_row(
            name,
            _num(s["median_ms"]),
            _num(s["p10_ms"]),
            _num(s["p90_ms"]),
            _num(s["gbps"]),
            _num(s["limit_gbps"]),
            _num(s["pct_of_limit"], "{:.0f}%"),
        )
    return table


def step_notes(result: dict) -> list[str]:
    """What each step of the breakdown is, one line per step (wrapped by the console)."""
    lines = []
    for name, s in result["steps"].items():
        note = STEP_NOTES.get(name, "")
        if s.get("scaled"):
            sc = s["scaled"]
            note += (
                f" (timed {sc['descriptors_timed']:,} of {sc['descriptors_total']:,} "
                f"descriptors, scaled x{sc['scale_factor']:.1f})"
            )
        if name != "setup" and s["samples"] < result["iters"]:
            note += f" ({s['samples']} timed runs)"
        if note:
            lines.append(f"  {name}: {note}")
    return lines


def links_table(result: dict) -> Table:
    """What the seed's 4,000 tokens of this geometry would cost on each link, bytes only."""
    links = result["links"]
    mb = links["bytes"] / 1e6
    table = Table(
        title=(
            f"What {links['tokens']:,} tokens ({mb:,.1f} MB, this geometry) would cost on each "
            f"link, bytes only, next to the seed's {links['seed_overhead_ms']:,.0f} ms overhead"
        ),
        title_justify="left",
    )
    for col in ("link", "GB/s", "ms", "% of seed's\noverhead"):
        table.add_column(col, justify="left" if col == "link" else "right")
    measured = links.get("measured")
    if measured:
        table.add_row(
            f"measured here: {measured['transport']} total",
            _num(measured["gbps"]),
            _num(measured["ms"], "{:,.1f}"),
            _num(measured["ms"] / links["seed_overhead_ms"] * 100, "{:.1f}%"),
        )
    for row in links["rows"]:
        table.add_row(
            row["link"],
            _num(row["gbps"]),
            _num(row["ms"], "{:,.1f}"),
            _num(row["pct_of_seed"], "{:.1f}%"),
        )
    return table


def sweep_table(result: dict) -> Table:
    """How the cost grows with the token count."""
    table = Table(title="How the cost grows with the prompt", title_justify="left")
    for col in ("tokens", "MB", "total ms", "wire ms", "per descriptor ms", "GB/s"):
        table.add_column(col, justify="right")
    for p in result["sweep"]["points"]:
        table.add_row(
            f"{p['tokens']:,}",
            _num(p["bytes"] / 1e6, "{:,.1f}"),
            _num(p["total_ms"]),
            _num(p["wire_ms"]),
            _num(p["per_descriptor_ms"]),
            _num(p["gbps"]),
        )
    return table


def render(console: Console, result: dict) -> None:
    """Print everything a person reads after a run."""
    g = result["geometry"]
    plan = g["descriptor_plan"]
    env = result["environment"]
    console.print(
        f"{g['model']['name']} {g['kv_dtype']}: {g['tokens']:,} tokens -> {g['blocks']:,} blocks "
        f"of {g['block_size']} ({g['padded_tokens']:,} tokens), {g['bytes_per_token']:,} B/token, "
        f"{g['total_bytes']:,} B; TP{plan['prefill_tp']} -> TP{plan['decode_tp']}: "
        f"{plan['descriptors_per_decode_rank']:,} descriptors of {plan['descriptor_bytes']:,} B "
        f"per decode rank"
    )
    console.print(
        f"transport {result['transport']} ({result['transport_reason']}); device "
        f"{result['device']} ({env['device_name']}), {env['torch_threads']} threads; "
        f"{result['iters']} timed runs after {result['warmup']} warm-up, each verified byte-exact"
    )
    console.print(breakdown_table(result))
    for line in step_notes(result):
        console.print(line)
    steps = result["steps"]
    parts = steps["setup"].get("parts_ms") or {}
    if parts:
        console.print(
            "setup = " + ", ".join(f"{k.replace('_', ' ')} {v:,.1f} ms" for k, v in parts.items())
        )
    for name in ("wire", "per_descriptor"):
        if steps[name].get("method"):
            console.print(f"{name}: {steps[name]['method']}")
    lim = result["limit"]
    console.print(
        f"limit: {lim['path']}: {_num(lim['gbps'])} GB/s (median {lim['median_ms']:,.2f} ms)\n"
    )
    console.print(links_table(result))
    if result.get("sweep"):
        console.print()
        console.print(sweep_table(result))
        fit = result["sweep"].get("fit")
        if fit:
            console.print(
                f"least-squares fit: {fit['fixed_ms']:,.2f} ms fixed per request + "
                f"{fit['ms_per_mb']:,.3f} ms per MB (r^2 = {fit['r2']:.3f})"
            )
