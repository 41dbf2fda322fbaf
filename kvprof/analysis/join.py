"""The client leg: match aiperf's per-request records to traced requests.

By X-Request-Id (the id the client sent; engines and routers carry it, or vLLM's id made of
it), else by time: each record to the next unclaimed traced request that started within
``WINDOW_NS`` after the record was sent (both clocks assumed close: an estimate, and said so).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvprof.analysis.arrowops import fast_isin, fast_positions

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

SOURCE_ID = "aiperf request id"
SOURCE_WINDOW = "aiperf time window (estimate)"
SOURCE_SPANS = "spans (estimate)"
# A record sent more than this before the first traced milestone of a request is not its
# record (a different run, another client).
WINDOW_NS = 5_000_000_000


@dataclass
class ClientLeg:
    """Per request (aligned to the keys given): what the client saw."""

    ttft_ms: np.ndarray
    send_ns: np.ndarray  # client clock; NaN when not joined
    first_ns: np.ndarray
    source: np.ndarray  # SOURCE_ID / SOURCE_WINDOW / None
    concurrency: np.ndarray  # float, NaN when unknown
    error: np.ndarray  # bool: aiperf recorded an error for this request
    phase: np.ndarray  # aiperf's benchmark phase ("profiling", "warmup"; None: not joined)
    notes: list[str] = field(default_factory=list)


def join_aiperf(ids: list[pd.Series], start_ns: pd.Series, aiperf: pd.DataFrame) -> ClientLeg:
    """Client leg per request; ``ids``: candidate request ids per request, in priority order.

    ``start_ns``: each request's first traced milestone (for the time-window fallback).
    """
    import numpy as np
    import pandas as pd

    n = len(start_ns)
    recs = aiperf.copy()
    recs["x_request_id"] = recs["x_request_id"].astype(object).where(
        recs["x_request_id"].notna(), None)
    recs = recs[recs["x_request_id"].astype(str) != ""]
    by_xid = recs.drop_duplicates("x_request_id").reset_index(drop=True)
    pick = np.full(n, -1, dtype=np.int64)
    for col in ids:
        pos = fast_positions(col, by_xid["x_request_id"].astype(str))
        pick = np.where(pick < 0, pos, pick)
    # One record per request: a record claimed twice keeps its first request only.
    taken = pick >= 0
    if taken.any():
        first = pd.Series(np.arange(n)[taken]).groupby(pick[taken]).min()
        keep = np.zeros(n, dtype=bool)
        keep[first.to_numpy()] = True
        pick = np.where(keep, pick, -1)
    source = np.where(pick >= 0, SOURCE_ID, None).astype(object)
    notes: list[str] = []
    n_id = int((pick >= 0).sum())
    if n_id:
        notes.append(f"{n_id} of {n} requests joined to aiperf by X-Request-Id.")
    rows = np.full(n, -1, dtype=np.int64)
    rows[pick >= 0] = pick[pick >= 0]
    table = by_xid
    left = (pick < 0) & start_ns.notna().to_numpy()
    used = by_xid["x_request_id"].iloc[pick[pick >= 0]] if n_id else pd.Series([], dtype=object)
    spare = recs[~fast_isin(recs["x_request_id"].astype(str), used.astype(str))]
    spare = spare[spare["request_start_ns"].notna() & (spare["request_start_ns"] > 0)]
    if left.any() and len(spare):
        cand = pd.DataFrame({"t": start_ns[left].astype("float64").to_numpy(),
                             "row": np.flatnonzero(left)}).sort_values("t")
        sent = spare.reset_index(drop=True).reset_index().rename(
            columns={"index": "rec"})[["rec", "request_start_ns"]]
        sent = sent.assign(t=sent["request_start_ns"].astype("float64")).sort_values("t")
        merged = pd.merge_asof(sent, cand, on="t", direction="forward",
                               tolerance=float(WINDOW_NS))
        merged = merged.dropna(subset=["row"]).drop_duplicates("row")
        if len(merged):
            table = pd.concat([by_xid, spare.reset_index(drop=True)], ignore_index=True)
            for r, rec in zip(merged["row"].astype(int), merged["rec"].astype(int),
                              strict=True):
                rows[r] = len(by_xid) + rec
                source[r] = SOURCE_WINDOW
            notes.append(f"{len(merged)} requests matched to aiperf records by time window "
                         "(no X-Request-Id in common): their client leg is an estimate.")
    ok = rows >= 0
    take = table.iloc[rows[ok]] if ok.any() else table.iloc[[]]

    def col(name: str, default=np.nan):
        out = np.full(n, default, dtype=float if default is not False else bool)
        if name in take:
            values = pd.to_numeric(take[name], errors="coerce") if default is not False else (
                take[name].fillna(False).astype(bool))
            out[ok] = np.asarray(values, dtype=out.dtype)
        return out

    phase = np.full(n, None, dtype=object)
    if "benchmark_phase" in take:
        phase[ok] = take["benchmark_phase"].astype(object).to_numpy()
    return ClientLeg(ttft_ms=col("ttft_ms"), send_ns=col("request_start_ns"),
                     first_ns=col("first_response_ns"), source=source,
                     concurrency=col("concurrency"), error=col("error", False), phase=phase,
                     notes=notes)
