"""Clock-skew between hosts, estimated from causal order, and the violations left after it.

Each cross-host causal rule gives a bound on delta = offset(b) - offset(a), where a host's
offset is added to its raw timestamps to put them on the reference clock:

* ``hold-outlasts-transfer``: the prefill side releases its blocks (kv.hold end) only after
  the decode side told it the transfer ended: delta <= hold_end(a) - transfer_end(b).
* ``child-after-parent``: a span starts no earlier than its parent on another host.
* ``path-order``: consecutive milestones of a request's path (client -> router -> engines ->
  router -> client) happen in that order; a request that goes to another host and comes
  back bounds the pair from both sides.

Per pair of hosts, from the feasible interval [max lower, min upper]:

* 0 when 0 lies inside it: the raw clocks break no causal rule of the pair, so nothing proves
  them apart, and clusters keep their clocks in sync (NTP, PTP). The slack of a pair is rarely
  symmetric (a frontend's way back includes its own processing), so a midpoint here would
  invent a skew of half that difference (2.4 ms on one machine in the demo's Dynamo run);
* the middle of the interval when 0 lies outside it (NTP's symmetric-slack assumption: the
  clocks are proven apart, by how much is unknown); with bounds on one side only, the
  smallest shift that satisfies them;
* when the bounds contradict each other (lower > upper: a timestamp that is not what its
  rule assumes, say a frontend's TTFT taken from a later start on its first request), the
  shift that breaks the bounds by the least in total, nearest 0: one odd constraint then
  moves nothing, where the middle of a contradictory interval would move everything.

Offsets spread from the reference host (the first prefill host, by name) along a maximum
spanning tree: two-sided pairs first, then the pairs with the most constraints.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

CONSTRAINT_COLUMNS = ("rule", "key", "a", "b", "lo_ns", "hi_ns")


@dataclass
class SkewResult:
    """Offsets (ns, add to raw times) per clock and the constraints still violated."""

    reference: str | None
    offsets_ns: dict[str, float] = field(default_factory=dict)
    intervals: list[dict] = field(default_factory=list)
    constraints: int = 0
    violations: pd.DataFrame | None = None
    violations_before: int = 0

    def to_dict(self) -> dict:
        v = self.violations
        return {
            "reference_clock": self.reference,
            "offsets_ms": {k: v_ns / 1e6 for k, v_ns in self.offsets_ns.items()},
            "pair_intervals": self.intervals,
            "constraints": self.constraints,
            "violations_before_correction": self.violations_before,
            "residual_violations": 0 if v is None else int(len(v)),
            "worst_residual_ms": (0.0 if v is None or v.empty
                                  else float(v["by_ms"].max())),
            "residual_by_rule": ({} if v is None or v.empty
                                 else v.groupby("rule").size().astype(int).to_dict()),
        }


def lookup(values: pd.Series, mapping: dict[str, float], default: float = 0.0):
    """mapping[value] per row as a float array (default when absent or null).

    Hashes each distinct value once: Series.map on a few hundred thousand rows of a handful
    of clock names is mostly per-row overhead.
    """
    import numpy as np
    import pandas as pd

    codes, uniques = pd.factorize(values)
    table = np.array([mapping.get(str(u), default) for u in uniques] + [default], dtype=float)
    return table[codes]  # code -1 (null) picks the trailing default


def _violated_by(cons: pd.DataFrame, offsets: dict[str, float]):
    """Per constraint: by how much (ns) the offsets break it (<= 0: satisfied)."""
    import numpy as np

    delta = lookup(cons["b"], offsets) - lookup(cons["a"], offsets)
    below = cons["lo_ns"].to_numpy(dtype=float) - delta
    above = delta - cons["hi_ns"].to_numpy(dtype=float)
    return np.maximum(below, above)


# 1 µs of tolerance: Jaeger input carries microseconds only.
TOLERANCE_NS = 1000.0


def _count_violations(cons: pd.DataFrame, offsets: dict[str, float]) -> int:
    """How many constraints the offsets break (the count alone: no table to sort)."""
    return 0 if cons.empty else int((_violated_by(cons, offsets) > TOLERANCE_NS).sum())


def _violations(cons: pd.DataFrame, offsets: dict[str, float]) -> pd.DataFrame:
    if cons.empty:
        return cons.assign(by_ms=[])
    by = _violated_by(cons, offsets)
    mask = by > TOLERANCE_NS
    return cons[mask].assign(by_ms=by[mask] / 1e6).sort_values("by_ms", ascending=False)


NO_SKEW = "0 is feasible: no correction"
MIDPOINT = "middle of the interval"
ONE_SIDED = "smallest shift that satisfies the bounds"
LEAST_BROKEN = "bounds contradict: least total violation"


def pair_estimate(low: float, high: float, lows: np.ndarray, highs: np.ndarray
                  ) -> tuple[float, str]:
    """offset(y) - offset(x) for one pair of clocks, and how it was chosen (module
    docstring). ``low``/``high``: the interval; ``lows``/``highs``: every bound (+-inf where a
    constraint has none)."""
    if math.isfinite(low) and math.isfinite(high) and low > high:
        return _least_violation(lows, highs), LEAST_BROKEN
    if low <= 0.0 <= high:
        return 0.0, NO_SKEW
    if math.isfinite(low) and math.isfinite(high):
        return (low + high) / 2, MIDPOINT
    return (low if math.isfinite(low) else high), ONE_SIDED


def _least_violation(lows: np.ndarray, highs: np.ndarray) -> float:
    """The shift d minimising sum(max(0, lo - d)) + sum(max(0, d - hi)), nearest 0 among
    the minimisers. The sum is convex and piecewise linear with its corners at the bounds,
    so its minimisers form an interval whose ends are bounds: evaluating it at every bound
    and at 0 finds the one nearest 0."""
    import numpy as np

    lo = np.sort(lows[np.isfinite(lows)])
    hi = np.sort(highs[np.isfinite(highs)])
    cand = np.unique(np.concatenate([lo, hi, [0.0]]))
    # sum over lo > d of (lo - d), and over hi < d of (d - hi), for every candidate at once.
    lo_suffix = np.concatenate([np.cumsum(lo[::-1])[::-1], [0.0]])
    hi_prefix = np.concatenate([[0.0], np.cumsum(hi)])
    above = np.searchsorted(lo, cand, side="right")  # first lo > d
    below = np.searchsorted(hi, cand, side="left")  # hi < d: hi[:below]
    cost = ((lo_suffix[above] - cand * (len(lo) - above))
            + (cand * below - hi_prefix[below]))
    best = cost <= cost.min() + 1e-6 * max(1.0, abs(cost.min()))  # ns-scale rounding
    return float(cand[best][np.argmin(np.abs(cand[best]))])


def estimate_skew(cons: pd.DataFrame, reference: str | None) -> SkewResult:
    """Estimate per-clock offsets from a constraint table (columns CONSTRAINT_COLUMNS)."""
    result = SkewResult(reference=reference, constraints=int(len(cons)))
    cross = cons[cons["a"] != cons["b"]]
    clocks = {str(c) for c in cross["a"].unique()} | {str(c) for c in cross["b"].unique()}
    if reference is None and clocks:
        reference = sorted(clocks)[0]
        result.reference = reference
    if reference is not None:
        result.offsets_ns[reference] = 0.0
    result.violations_before = _count_violations(cross, {})
    if cross.empty:
        result.violations = _violations(cross, result.offsets_ns)
        return result
    # Orient every pair as (min, max) name so both directions pool into one interval; work
    # on category codes (sorted names), not strings: there are two constraints per request.
    import numpy as np
    import pandas as pd

    names = sorted(clocks)
    a = cross["a"].astype("category").cat.set_categories(names).cat.codes.to_numpy()
    b = cross["b"].astype("category").cat.set_categories(names).cat.codes.to_numpy()
    flip = a > b
    lo_raw, hi_raw = cross["lo_ns"].to_numpy(dtype=float), cross["hi_ns"].to_numpy(dtype=float)
    table = pd.DataFrame({"x": np.where(flip, b, a), "y": np.where(flip, a, b),
                          "lo": np.where(flip, -hi_raw, lo_raw),
                          "hi": np.where(flip, -lo_raw, hi_raw)})
    groups = table.groupby(["x", "y"])
    pairs = groups.agg(lo=("lo", "max"), hi=("hi", "min"), n=("lo", "size"))
    bounds = {(names[x], names[y]): (g["lo"].to_numpy(), g["hi"].to_numpy())
              for (x, y), g in groups}
    pairs.index = pd.MultiIndex.from_tuples([(names[x], names[y]) for x, y in pairs.index],
                                            names=["x", "y"])
    delta: dict[tuple[str, str], float] = {}
    for (x, y), row in pairs.iterrows():
        low, high = float(row["lo"]), float(row["hi"])
        d, method = pair_estimate(low, high, *bounds[(x, y)])
        delta[(x, y)] = d
        result.intervals.append({
            "clocks": [x, y], "lower_ms": low / 1e6 if math.isfinite(low) else None,
            "upper_ms": high / 1e6 if math.isfinite(high) else None,
            "estimate_ms": d / 1e6, "constraints": int(row["n"]),
            "consistent": not (math.isfinite(high) and low > high), "method": method,
        })
    # Offsets spread from the reference along a maximum spanning tree: a pair bounded on both
    # sides (a request went there and came back) beats any one-sided pair, then the pair
    # with more constraints wins.
    graph: dict[str, list[tuple[tuple[bool, int], str, float]]] = defaultdict(list)
    for (x, y), d in delta.items():
        row = pairs.loc[(x, y)]
        weight = (math.isfinite(float(row["lo"])) and math.isfinite(float(row["hi"])),
                  int(row["n"]))
        graph[x].append((weight, y, d))  # off(y) = off(x) + d
        graph[y].append((weight, x, -d))
    frontier: list = []
    counter = 0

    def push(node: str) -> None:
        nonlocal counter
        for weight, there, d in graph[node]:
            counter += 1
            # heapq pops the smallest: negate the weight, the counter breaks ties stably.
            heapq.heappush(frontier, ((-int(weight[0]), -weight[1]), counter, node, there, d))

    push(reference)
    while frontier:
        _, _, here, there, d = heapq.heappop(frontier)
        if there not in result.offsets_ns:
            result.offsets_ns[there] = result.offsets_ns[here] + d
            push(there)
    # Report each interval as "offset of the second clock minus the first", the first being the
    # one nearer the reference, so the estimate reads as the offset applied to the second.
    for item in result.intervals:
        x, y = item["clocks"]
        if y == reference or (x != reference and result.offsets_ns.get(y, 0.0) == 0.0
                              and result.offsets_ns.get(x, 0.0) != 0.0):
            lo, hi = item["lower_ms"], item["upper_ms"]
            item.update(clocks=[y, x], lower_ms=None if hi is None else -hi,
                        upper_ms=None if lo is None else -lo, estimate_ms=-item["estimate_ms"])
    for clock in sorted(clocks - set(result.offsets_ns)):
        # A group of hosts with no causal link to the reference: left uncorrected.
        result.offsets_ns[clock] = 0.0
    result.violations = _violations(cross, result.offsets_ns)
    return result
