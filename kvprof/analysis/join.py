"""Match aiperf records to traced requests: by X-Request-Id, else by time window."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

# vLLM turns X-Request-Id into "cmpl-<id>-<n>" (completions) or "chatcmpl-<id>" (chat).
_CONTAIN_LIMIT = 5000  # beyond this many leftovers the O(n*m) containment scan is skipped


def join_aiperf(req: pd.DataFrame, aiperf: pd.DataFrame) -> tuple[pd.Series, pd.Series, list[str]]:
    """TTFT (ms) and its source per request row of ``req`` (index: request key)."""
    import numpy as np
    import pandas as pd

    from kvprof.analysis.breakdown import SOURCE_ID, SOURCE_WINDOW

    notes: list[str] = []
    keys = pd.Series(req.index.astype(str), index=req.index, dtype="str")
    by_xid = aiperf.dropna(subset=["ttft_ms"]).drop_duplicates("x_request_id").set_index(
        "x_request_id")["ttft_ms"]
    by_xid = by_xid[by_xid.index != ""]
    # Vectorised (Arrow regex kernels): strip vLLM's "cmpl-" / "chatcmpl-" and "-<n>".
    core = keys.str.replace(r"^(?:chat)?cmpl-", "", regex=True)
    core = core.where(core == keys, core.str.replace(r"-\d+$", "", regex=True))
    from kvprof.analysis.breakdown import fast_isin, fast_map

    ttft = fast_map(core, by_xid)
    ttft = ttft.where(ttft.notna(), fast_map(keys, by_xid))

    hit = ttft.notna().to_numpy()
    used = pd.concat([core[hit], keys[hit]], ignore_index=True)
    left = ttft.isna()
    spare = []
    if left.any():
        xids = pd.Series(by_xid.index, dtype="str")
        spare = list(xids[~fast_isin(xids, used)])
    if left.any() and spare and left.sum() * len(spare) <= _CONTAIN_LIMIT * 100:
        # The id contained anywhere in vLLM's id (other servers decorate it differently).
        for k in keys[left].index:
            for x in spare:
                if x and x in keys[k]:
                    ttft[k] = by_xid[x]
                    spare.remove(x)
                    break
    source = pd.Series(np.where(ttft.notna(), SOURCE_ID, None), index=req.index, dtype=object)
    n_id = int(ttft.notna().sum())
    if n_id:
        notes.append(f"{n_id} of {len(req)} requests joined to aiperf by X-Request-Id.")
    left = ttft.isna() & req["start_ns"].notna()
    unmatched = aiperf[~fast_isin(aiperf["x_request_id"], used)].dropna(subset=["ttft_ms"])
    unmatched = unmatched[unmatched["request_start_ns"] > 0]
    if left.any() and len(unmatched):
        # Each aiperf request is paired with the next unclaimed traced request that started
        # after it was sent (both clocks assumed close: an estimate, and said so).
        cand = req.loc[left, ["start_ns"]].sort_values("start_ns")
        sent = unmatched.sort_values("request_start_ns")
        merged = pd.merge_asof(sent[["request_start_ns", "ttft_ms"]].rename(
            columns={"request_start_ns": "t"}).astype({"t": "float64"}),
            cand.reset_index().rename(columns={"start_ns": "t"}).astype({"t": "float64"}),
            on="t", direction="forward")
        merged = merged.dropna(subset=["key"]).drop_duplicates("key")
        for k, v in zip(merged["key"], merged["ttft_ms"], strict=True):
            ttft[k] = v
            source[k] = SOURCE_WINDOW
        notes.append(f"{len(merged)} requests matched to aiperf records by time window "
                     "(no X-Request-Id in common): their TTFT and unaccounted time are "
                     "estimates.")
    return ttft, source, notes
