"""Small rendering helpers shared by the report, audit and compare: tables and an HTML page."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

NO_DATA = "no data"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1200px;padding:0 1rem;color:#222;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.25rem;margin-top:2rem;
border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.86rem}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right;vertical-align:top}
th{background:#f3f5f7}td:first-child,th:first-child{text-align:left}
td.text{text-align:left;overflow-wrap:break-word;max-width:28rem}
.scroll{overflow-x:auto}
.note{color:#555;font-size:.9rem}.estimate{color:#9a5b00;font-weight:600}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.4rem .8rem;margin:.4rem 0}
img{max-width:100%;border:1px solid #eee;margin:.5rem 0}
ol.verdict li{margin-bottom:.6rem}code{background:#f3f5f7;padding:0 .2rem}
"""


class Sig(float):
    """A number shown with significant digits (rates, ratios): 0.0213 GB/s, not 0.0."""


def fmt_sig(value: Any, sig: int = 3) -> str:
    """``value`` with ``sig`` significant digits and no exponent; missing -> "no data"."""
    if value is None or isinstance(value, bool):
        return NO_DATA
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        return NO_DATA
    if v == 0:
        return "0"
    if abs(v) >= 10 ** sig:
        return f"{v:,.0f}"
    decimals = max(0, sig - 1 - math.floor(math.log10(abs(v))))
    return f"{v:.{decimals}f}"


def sig(value: Any) -> Sig | None:
    """Mark a table cell for significant-digit formatting (None and NaN stay "no data")."""
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else Sig(v)


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: numbers rounded, missing values as "no data" (never 0 or -1)."""
    if value is None:
        return NO_DATA
    if isinstance(value, Sig):
        return fmt_sig(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return NO_DATA
        # A remainder of -0.00002 ms is zero, not "-0.0" (rounding keeps its sign, `or` drops it).
        value = round(value, digits) or 0.0
        if abs(value) >= 1000:
            return f"{value:,.{digits}f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
             empty: str | None = None) -> str:
    """A GitHub-flavoured Markdown table; with no rows, the ``empty`` sentence instead."""
    rows = list(rows)
    if not rows:
        return empty or "No rows."
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def html_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
               empty: str | None = None) -> str:
    """An HTML table (text cells left, numbers right); with no rows, the ``empty`` sentence."""
    rows = list(rows)
    if not rows:
        return f'<p class="note">{html.escape(empty or "No rows.")}</p>'
    heads = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    out = ['<div class="scroll"><table><thead><tr>' + heads
           + "</tr></thead><tbody>"]
    for row in rows:
        cells = []
        for c in row:
            cls = "" if isinstance(c, (int, float)) and not isinstance(c, bool) else ' class="text"'
            cells.append(f"<td{cls}>{html.escape(fmt(c))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def html_img(png: bytes, alt: str) -> str:
    """A PNG embedded as base64, so the page needs no other file."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def html_page(title: str, subtitle: str, sections: Sequence[tuple[str, str]]) -> str:
    """A self-contained HTML page (inline CSS, no scripts, no external resources)."""
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{content}\n" for h, content in sections)
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p class=\"note\">{html.escape(subtitle)}</p>"
            f"{body}</body></html>")


def esc(text: str) -> str:
    """HTML-escape text."""
    return html.escape(str(text))
