"""The demo's closing lines, computed from out/report.json (never typed in)."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from kvprof import semconv as sc
from kvprof.errors import BadInputError

NO_DATA = "no data"


@dataclass(frozen=True)
class Share:
    """part_ms of whole_ms, as medians over the requests it was computed from."""

    part_ms: float | None
    whole_ms: float | None
    share: float | None
    requests: int
    note: str = ""  # which requests these were, when that changes how to read the number

    def text(self, part_name: str) -> str:
        if self.share is None or self.part_ms is None or self.whole_ms is None:
            return NO_DATA
        plural = "" if self.requests == 1 else "s"
        note = f"; {self.note}" if self.note else ""
        return (f"{100 * self.share:.1f}% of TTFT ({part_name} {self.part_ms:.1f} ms of "
                f"{self.whole_ms:.1f} ms, median of {self.requests} request{plural}{note})")


@dataclass(frozen=True)
class Headline:
    """What a serving engineer reads first: first contact, steady state, unexplained time."""

    first_handshake: Share
    steady_transfer: Share
    unaccounted_mean_ms: float | None
    requests: int
    pairs: int
    unaccounted_share: float | None = None
    top_causes: tuple[str, ...] = ()  # the verdict's largest stages, in words

    def lines(self) -> list[tuple[str, str]]:
        unacc = NO_DATA
        if self.unaccounted_mean_ms is not None:
            unacc = f"{_plain(self.unaccounted_mean_ms)} ms per request (mean"
            if self.unaccounted_share is not None:
                unacc += f"; {_plain(100 * self.unaccounted_share)}% of TTFT"
            unacc += "; no leg covers it)"
        out = [(f"Largest stage #{i}", text) for i, text in enumerate(self.top_causes, 1)]
        return out + [
            ("First-request handshake share", self.first_handshake.text("kv.handshake")),
            ("Steady-state transfer share", self.steady_transfer.text("kv.transfer")),
            ("Unaccounted time", unacc),
        ]


def _plain(value: float) -> str:
    """One decimal, and a remainder of -0.00002 reads 0.0, not -0.0."""
    return f"{round(value, 1) or 0.0:.1f}"


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if value != value else float(value)  # NaN check without math import


def _share(rows: list[dict], phase: str, note: str = "") -> Share:
    parts, wholes, shares = [], [], []
    for row in rows:
        part, whole = _num(row.get(phase)), _num(row.get("ttft_ms"))
        if part is None or whole is None or whole <= 0:
            continue
        parts.append(part)
        wholes.append(whole)
        shares.append(part / whole)
    if not shares:
        return Share(None, None, None, 0)
    return Share(statistics.median(parts), statistics.median(wholes),
                 statistics.median(shares), len(shares), note)


def headline_from_report(report: dict) -> Headline:
    """First-contact requests' handshake share, later requests' transfer share, unaccounted."""
    rows = [r for r in report.get("requests") or [] if isinstance(r, dict)]
    first = [r for r in rows if r.get("first_contact") is True]
    # Warm-ups stay out of the steady state, as out of every statistic of the report; the first
    # contact usually is the warm-up (it exists to pay the one-time costs), which the line says.
    steady = [r for r in rows if r.get("first_contact") is False and not r.get("warmup")]
    first_note = "aiperf's warm-up" if first and all(r.get("warmup") for r in first) else ""
    summary = report.get("summary") or {}
    causes = [c for c in report.get("verdict") or [] if isinstance(c, dict)
              and c.get("cause") != "unaccounted" and c.get("headline")]
    return Headline(
        first_handshake=_share(first, sc.SPAN_KV_HANDSHAKE, first_note),
        steady_transfer=_share(steady, sc.SPAN_KV_TRANSFER),
        unaccounted_mean_ms=_num(summary.get("unaccounted_mean_ms")),
        requests=int(summary.get("requests") or len(rows)),
        pairs=int(summary.get("pairs") or 0),
        unaccounted_share=_num(summary.get("unaccounted_share")),
        top_causes=tuple(f"{c['headline']} ({100 * (_num(c.get('share')) or 0):.0f}% of TTFT)"
                         for c in causes[:3]),
    )


def load_headline(report_json: Path) -> Headline:
    """Read `kvprof report --format json` output; a clear error when it is missing or broken."""
    hint = "Run the demo's report step again: kvprof report ... --format json --out " + str(
        report_json)
    try:
        doc = json.loads(report_json.read_text())
    except FileNotFoundError:
        raise BadInputError(f"report JSON not found: {report_json}", hint=hint) from None
    except json.JSONDecodeError as err:
        raise BadInputError(f"{report_json} is not JSON ({err.msg})", hint=hint) from None
    if not isinstance(doc, dict):
        raise BadInputError(f"{report_json} is not a kvprof report object", hint=hint)
    return headline_from_report(doc)
