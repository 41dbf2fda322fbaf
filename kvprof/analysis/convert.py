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
from kvprof.outputs import atomic_write, check_output

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


def run_convert_command(src: Path, to: str, out: Path | None,
                        into_source: bool = False) -> tuple[str | None, str]:
    """Convert; returns (document text when it goes to stdout, one-line summary)."""
    if to.lower() not in TARGETS:
        convert_records([], to)  # raises the usage error
    if out is not None:
        check_output(out, "--out")
        _refuse_inside(src, out, into_source)
    records, skipped = load_records(src)
    doc = convert_records(records, to)
    text = json.dumps(doc, separators=(",", ":"))
    summary = f"Converted {len(records)} spans from {src} to {to.lower()}"
    if skipped:
        summary += "; skipped " + "; ".join(f"{Path(f).name}: {w}" for f, w in skipped)
    if out is None:
        return text, summary
    atomic_write(out, text + "\n", "--out")
    return None, summary + f" -> {out}"


def _refuse_inside(src: Path, out: Path, into_source: bool) -> None:
    """A converted file saved among the traces it came from is read twice by `report`."""
    try:
        inside = src.is_dir() and out.resolve().is_relative_to(src.resolve())
    except OSError:
        return
    if inside and not into_source:
        raise UsageError(f"--out {out} is inside {src}, the folder being converted: "
                         "`kvprof report` would read these spans twice",
                         hint="Write the converted file elsewhere, or pass --into-source "
                         "(report then keeps each span once and warns).")
