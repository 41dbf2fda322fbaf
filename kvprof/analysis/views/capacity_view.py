"""The report's compact capacity table (report.json ``capacity``), for Markdown and HTML."""

from __future__ import annotations

from typing import Any

TITLE = "Capacity per concurrency level and engine"


def _pct(x: float | None) -> str | None:
    return None if x is None else f"{100 * x:.0f}%"


def _load(e: dict[str, Any]) -> str | None:
    """Offered load against what the engine served while busy, in its own unit."""
    parts = []
    if e.get("capacity_prefill_tokens_per_s") is not None:
        parts.append(f"prefill {e.get('offered_prefill_tokens_per_s'):.0f} of "
                     f"{e['capacity_prefill_tokens_per_s']:.0f} tok/s")
    if e.get("capacity_decode_steps_per_s") is not None:
        parts.append(f"decode {e['capacity_decode_steps_per_s']:.0f} steps/s at batch "
                     f"{e.get('mean_decode_batch') or 0:.1f}")
    util = max((u for u in (e.get("prefill_utilisation"), e.get("decode_utilisation"))
                if u is not None), default=None)
    if util is not None:
        parts.append(f"load {_pct(util)} of capacity")
    return "; ".join(parts) or None


def capacity_table(data: dict[str, Any]) -> tuple[list[str], list[list]] | None:
    """(header, rows) for the report, or None when the report has no capacity figures."""
    cap = data.get("capacity") or {}
    if not cap.get("levels"):
        return None
    header = ["concurrency", "engine", "busy", "queue mean (max)", "running mean (max)",
              "KV occupancy mean (peak)", "held until the decode side pulled", "preemptions",
              "offered vs capacity"]
    rows = []
    for lv in cap["levels"]:
        for e in lv["engines"]:
            if e.get("kv_occupancy") is not None:
                kv = f"{_pct(e['kv_occupancy'])} ({_pct(e['kv_occupancy_peak'])})"
            else:
                kv = f"{e['kv_blocks_mean']} blocks ({e['kv_blocks_peak']})"
            hold = (f"{e['kv_hold_blocks_mean']} blocks, {e['kv_hold_ms_mean']} ms"
                    if e.get("kv_hold_blocks_mean") is not None else None)
            rows.append([lv["concurrency"], f"{e['engine']} ({e['role']})",
                         _pct(e["busy_fraction"]),
                         f"{e['mean_queue_length']:.2f} ({e['max_queue_length']})",
                         f"{e['mean_running']:.2f} ({e['max_running']})", kv, hold,
                         "not recorded" if e["preemptions"] is None else e["preemptions"],
                         _load(e)])
    return header, rows


def capacity_text(data: dict[str, Any]) -> list[str]:
    """The verdict on queues and resources, then where the figures come from."""
    cap = data.get("capacity") or {}
    lines = [cap["verdict"]] if cap.get("verdict") else []
    if cap.get("source"):
        lines.append(f"Source: {cap['source']}. Busy = the engine ran at least one request "
                     "(or, from step records, a step that scheduled tokens); queue = requests "
                     "waiting in its scheduler; KV held for decode pull = finished prefills "
                     "whose blocks stay allocated until the decode side reads them.")
    return lines + list(cap.get("notes", []))
