"""Count the Python-level work of an analysis step: a timing-free measure of vectorisation.

A vectorised step makes the same Python calls for 1,000 requests as for 100 (NumPy, pandas
and Arrow loop in C); a loop over requests or spans in Python adds calls per row. So the
*slope*, Python calls per extra request between two sizes of one scenario, is ~0 for a
vectorised breakdown and >= 1 for any per-row Python loop, whatever the machine's load:
the regression guard asserts it (tests/analysis/test_analysis_scale_guard.py), the bench
(bench/analysis_scale.py) prints it beside its timings.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from typing import Any


def count_calls(fn: Callable[[], Any], top: int = 0) -> tuple[int, list[tuple[str, int]]]:
    """Python function calls (and generator resumptions) made while ``fn()`` runs, and the
    ``top`` code locations that made the most. C functions are not counted: their work is
    vectorised by definition."""
    counts: Counter = Counter()
    total = 0

    def profile(frame, event, arg):  # noqa: ARG001 - the sys.setprofile signature
        nonlocal total
        if event == "call":
            total += 1
            if top:
                code = frame.f_code
                counts[f"{code.co_filename}:{code.co_firstlineno}({code.co_name})"] += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(previous)
    return total, counts.most_common(top)


def calls_per_request(small: tuple[int, int], large: tuple[int, int]) -> float:
    """(requests, calls) at two sizes -> Python calls per extra request (the slope)."""
    (n1, c1), (n2, c2) = small, large
    return (c2 - c1) / (n2 - n1)
