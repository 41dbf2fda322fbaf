"""The causes section of the report: why the legs were long, each cause with its evidence."""

from __future__ import annotations

TITLE = "Why: the causes behind the legs, measured"


def cause_lines(data: dict) -> list[tuple[str, list[str]]]:
    """(headline, evidence lines) per cause, largest first; the transfer split first."""
    causes = data.get("causes") or {}
    out: list[tuple[str, list[str]]] = []
    if causes.get("transfer"):
        split = (data.get("summary") or {}).get("transfer_split") or {}
        ev = []
        for name in ("post_ms", "wire_ms", "notice_ms"):
            s = split.get(name)
            if s:
                ev.append(f"{name[:-3]}: mean {s['mean']:.2f} ms, p50 {s['p50']:.2f} ms, "
                          f"p99 {s['p99']:.2f} ms")
        if split:
            ev.append(f"{split.get('measured', 0)} of {split.get('transfers', 0)} transfers "
                      "carried NIXL's per-transfer telemetry")
        out.append((causes["transfer"], ev))
    for c in causes.get("ranked", []):
        out.append((c["headline"], list(c.get("evidence", []))))
    for lv in causes.get("by_level", []):
        if lv["causes"]:
            top = "; ".join(f"{c['label']} {c['mean_ms']:.1f} ms ({100 * c['share']:.0f}%)"
                            for c in lv["causes"][:3])
            out.append((f"concurrency {lv['concurrency']} ({lv['requests']} requests): {top}",
                        []))
    if not causes.get("ranked"):
        out.append(("No cause is measured for these requests (no engine step records, NIXL "
                    "telemetry or CPU samples): the legs above stand as measured.", []))
    return out


def markdown(data: dict) -> list[str]:
    """The section as Markdown lines (empty when the report has no causes step)."""
    if "causes" not in data:
        return []
    out = ["", f"## {TITLE}", ""]
    for headline, evidence in cause_lines(data):
        out.append(f"- **{headline}**")
        out.extend(f"  - {e}" for e in evidence)
    return out


def html(data: dict, esc) -> str:
    """The section's HTML body ('' when the report has no causes step)."""
    if "causes" not in data:
        return ""
    items = "".join(f"<li><b>{esc(h)}</b><ul>" + "".join(f"<li>{esc(e)}</li>" for e in ev)
                    + "</ul></li>" for h, ev in cause_lines(data))
    return f"<ul>{items}</ul>"
