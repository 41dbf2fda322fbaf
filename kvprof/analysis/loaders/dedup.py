"""The same span (trace id + span id) read twice, e.g. a converted copy saved beside the
original: kept once, with a note naming the files."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


def drop_duplicate_spans(spans: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """(spans with each (trace_id, span_id) once, the first read; a note, or None)."""
    if spans.empty:
        return spans, None
    keys = ["trace_id", "span_id"]
    dup = spans.duplicated(keys, keep="first")
    if not dup.any():
        return spans, None
    involved = spans.duplicated(keys, keep=False)
    files = sorted({str(s) for s in spans.loc[involved, "source"].dropna().unique()})
    shown = ", ".join(files[:6]) + (f" (+{len(files) - 6} more)" if len(files) > 6 else "")
    note = (f"Read {int(dup.sum())} span(s) twice (same trace id and span id) in {shown}; "
            "each was kept once. A converted copy saved beside the original traces?")
    log.warning("%s", note)
    return spans.loc[~dup].reset_index(drop=True), note
