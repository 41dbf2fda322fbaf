"""`kvprof traces convert`: OTLP JSON <-> Jaeger JSON <-> Perfetto trace-event JSON."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from kvprof.analysis.loaders.jaeger import records_to_jaeger
from kvprof.analysis.loaders.otlp import records_to_otlp
from kvprof.analysis.loaders.perfetto import records_to_perfetto
from kvprof.analysis.loaders.traces import load_records
from kvprof.errors import UsageError

log = logging.getLogger(__name__)

TARGETS = {"jaeger": records_to_jaeger, "otlp": records_to_otlp, "perfetto": records_to_perfetto}


def convert_records(records: list[dict], to: str) -> dict:
    """Span records -> one document of the target format."""
    target = to.lower()
    if target not in TARGETS:
        raise UsageError(f"--to {to!r} is not one of {', '.join(TARGETS)}",
                         hint="jaeger: Jaeger UI's JSON upload; otlp: OTLP/JSON; perfetto: "
                         "ui.perfetto.dev / chrome://tracing")
    return TARGETS[target](records)


def run_convert_command(src: Path, to: str, out: Path | None) -> tuple[str | None, str]:
    """Convert; returns (document text when it goes to stdout, one-line summary)."""
    if to.lower() not in TARGETS:
        convert_records([], to)  # raises the usage error
    records, skipped = load_records(src)
    doc = convert_records(records, to)
    text = json.dumps(doc, separators=(",", ":"))
    summary = f"Converted {len(records)} spans from {src} to {to.lower()}"
    if skipped:
        summary += "; skipped " + "; ".join(f"{Path(f).name}: {w}" for f, w in skipped)
    if out is None:
        return text, summary
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(out)
    return None, summary + f" -> {out}"
