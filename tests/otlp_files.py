"""Spans read back from the OTLP/JSON lines files kvprof's file exporter writes."""

from __future__ import annotations

import json
from pathlib import Path


def file_spans(directory: Path) -> list[dict]:
    """Every span object (OTLP/JSON, as written) of every *.jsonl file, files in name order."""
    return [s for f in sorted(directory.glob("*.jsonl")) for line in f.read_text().splitlines()
            for rs in json.loads(line)["resourceSpans"] for ss in rs["scopeSpans"]
            for s in ss["spans"]]
