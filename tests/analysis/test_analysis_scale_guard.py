"""Regression guard for analysis at scale (issue 24): work counted, not timed.

A vectorised breakdown makes the same Python calls for 400 requests as for 100; a per-row
Python loop adds at least one call per request (the gap sentences once cost 3 per request,
and the breakdown 4.4x its time at 100,000 requests, unflagged). The count is exact on any
machine under any load, so the bound can be tight where timings could not be.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from kvprof.analysis.workcount import calls_per_request, count_calls

SIZES = (100, 400)
# Python calls per extra request: vectorised code stays at ~0 (pandas may take another
# branch now and then); any loop over requests in Python makes it >= 1.
BREAKDOWN_BOUND = 0.5
# The aiperf reader parses a JSON line per record in Python: a few calls per record are its
# floor (8 today); looking each absent metric up again per record (what it did) cost 38.
AIPERF_BOUND = 12.0


def _scenario(root: Path, n: int, full_path: bool):
    from kvprof.analysis.loaders.traces import load_spans
    from kvprof.analysis.scenario import ScenarioSpec, write_scenario

    write_scenario(root, ScenarioSpec(requests=n, spacing_ms=10.0, jitter_ms=50.0,
                                      broken_traceparent=2, full_path=full_path),
                   samples=False)
    return load_spans(root / "traces").spans, root / "aiperf"


@pytest.mark.parametrize("full_path", [False, True], ids=["engines", "full-path"])
def test_breakdown_python_calls_do_not_grow_with_requests(tmp_path, full_path):
    from kvprof.analysis.breakdown import build_breakdown
    from kvprof.analysis.loaders.aiperf import load_aiperf_records

    sizes, aiperf_sizes, where = [], [], []
    for n in SIZES:
        spans, aiperf_dir = _scenario(tmp_path / str(n), n, full_path)
        records = load_aiperf_records(aiperf_dir)
        build_breakdown(spans, records)  # first-call imports and caches: not counted
        calls, top = count_calls(lambda s=spans, r=records: build_breakdown(s, r), top=10**6)
        where.append(Counter(dict(top)))
        assert len(build_breakdown(spans, records).requests) >= n
        sizes.append((n, calls))
        aiperf_sizes.append((n, count_calls(lambda d=aiperf_dir: load_aiperf_records(d))[0]))
    slope = calls_per_request(*sizes)
    assert slope < BREAKDOWN_BOUND, (
        f"build_breakdown makes {slope:.2f} more Python calls per request (calls at "
        f"{sizes}); the code called more often at {SIZES[-1]} requests: "
        f"{(where[1] - where[0]).most_common(5)}. A loop over requests in Python? Vectorise "
        "it (see bench/analysis_scale.py).")
    per_record = calls_per_request(*aiperf_sizes)
    assert per_record < AIPERF_BOUND, (
        f"load_aiperf_records makes {per_record:.1f} Python calls per record")
