"""A few console lines from `kvprof microbench --json` output: what the bytes alone cost."""

from __future__ import annotations

import json
from pathlib import Path


def _ms(step: dict | None) -> str:
    value = (step or {}).get("median_ms")
    if not isinstance(value, int | float):
        return "no data"
    # Tiny KV moves in fractions of a millisecond; the seed's in hundreds.
    return f"{value:.2f} ms" if value < 10 else f"{value:,.0f} ms"


def microbench_lines(path: Path) -> list[str]:
    """Geometry, one-time setup, per-request steps and the link table's extremes."""
    doc = json.loads(path.read_text())
    geo = doc.get("geometry") or {}
    model = (geo.get("model") or {}).get("name", "?")
    plan = geo.get("descriptor_plan") or {}
    steps = doc.get("steps") or {}
    lines = [
        f"{model} {geo.get('kv_dtype', '?')}, {geo.get('tokens', 0):,} tokens = "
        f"{geo.get('total_bytes', 0) / 1e6:,.1f} MB of KV in {geo.get('blocks', '?')} blocks; "
        f"TP{plan.get('prefill_tp', '?')} -> TP{plan.get('decode_tp', '?')}: "
        f"{doc.get('descriptors', 0):,} descriptors of {doc.get('descriptor_bytes', 0) // 1024} "
        f"KiB, via {doc.get('transport', '?')} on {doc.get('device', '?')}",
    ]
    setup = steps.get("setup") or {}
    parts = setup.get("parts_ms") or {}
    if setup:
        detail = ", ".join(f"{k.replace('_', ' ')} {v:,.0f}" for k, v in parts.items())
        lines.append(f"one-time setup {_ms(setup)}" + (f" ({detail} ms)" if detail else ""))
    total = steps.get("total") or {}
    per_request = " + ".join(f"{name} {_ms(steps.get(name))}" for name in
                             ("gather", "wire", "scatter") if name in steps)
    if total:
        rate = total.get("gbps")
        pct = total.get("pct_of_limit")
        lines.append(
            f"per request: {per_request} = {_ms(total)}"
            + (f" ({rate:.2f} GB/s" if isinstance(rate, int | float) else "")
            + (f", {pct:.0f}% of this machine's plain-copy limit)" if isinstance(
                pct, int | float) else (")" if isinstance(rate, int | float) else "")))
    links = doc.get("links") or {}
    rows = links.get("rows") if isinstance(links, dict) else None
    if rows:
        fast, slow = rows[0], rows[-1]
        lines.append(
            f"the same bytes at line rate: {fast['ms']:.1f} ms on {fast['link']} ... "
            f"{slow['ms']:.0f} ms on {slow['link']} (the seed's overhead: "
            f"{links.get('seed_overhead_ms', 0):,.0f} ms)")
    return lines
