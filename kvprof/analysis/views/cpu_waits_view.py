"""The CPU-waits section of the report: which process waited for a core inside which leg."""

from __future__ import annotations

TITLE = "CPU contention: run-queue waits inside the legs"
MAX_ROWS = 8


def rows(data: dict) -> list[list[str]]:
    """Per leg (largest mean wait first): leg, process, thread, mean wait, share of the leg."""
    out = []
    for x in (data.get("cpu_waits") or {}).get("legs", [])[:MAX_ROWS]:
        if x["mean_wait_ms"] < 0.05:
            continue
        share = x.get("share_of_leg")
        out.append([x["leg"], f"{x['process']} (pid {x['pid']}, {x['role']})",
                    x.get("thread") or "-", f"{x['mean_wait_ms']:.1f}",
                    f"{x['mean_leg_ms']:.1f}", f"{100 * share:.0f}%" if share is not None
                    else "-"])
    return out


HEADER = ["leg", "process that waited most", "thread", "wait for a core, ms per request",
          "leg, ms per request", "share of the leg"]


def sentence(data: dict) -> str:
    """The leading sentence: the largest CPU wait as a cause, with its figure."""
    legs = (data.get("cpu_waits") or {}).get("legs", [])
    top = next((x for x in legs if x.get("cause")), None)
    if top is None:
        return ("The watched processes did not wait for a core inside any leg (run-queue "
                "wait below 1 ms per request).")
    return (f"Largest: {top['cause']} per request, in the leg '{top['leg']}' "
            f"({top['mean_leg_ms']:.1f} ms per request).")


def markdown(data: dict) -> list[str]:
    """Markdown lines ('' without CPU samples)."""
    if "cpu_waits" not in data:
        return []
    out = ["", f"## {TITLE}", "", sentence(data), ""]
    body = rows(data)
    if body:
        out.append("| " + " | ".join(HEADER) + " |")
        out.append("|" + "---|" * len(HEADER))
        out += ["| " + " | ".join(r) + " |" for r in body]
    return out


def html(data: dict, esc) -> str:  # noqa: ANN001 - esc: str -> str
    """The section's HTML body ('' without CPU samples)."""
    if "cpu_waits" not in data:
        return ""
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>"
                   for r in rows(data))
    head = "".join(f"<th>{esc(h)}</th>" for h in HEADER)
    table = f"<table><tr>{head}</tr>{body}</table>" if body else ""
    return f"<p>{esc(sentence(data))}</p>{table}"
