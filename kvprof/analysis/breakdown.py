"""Per-request TTFT breakdown from the span table: phases, skew, TTFT join and unaccounted time.

Request table schema (one row per request, ``RequestBreakdown.requests``):
key (vLLM request id, or trace id), trace_id, prefill_engine, decode_engine, prefill_pod,
decode_pod, prefill_node, decode_node, prefill_clock, decode_clock, kv_bytes, kv_path,
connector; one ``<span name>`` column per phase of semconv.PHASE_ORDER in ms (NaN = no span);
stacked_ms (sum of the phases that happen one after another: all but kv.hold, which overlaps
the handshake and transfer); start_ns (prefill start on the reference clock); span_ttft_ms
(prefill start -> first decode step end, skew-corrected); ttft_ms and ttft_source
("aiperf request id" | "aiperf time window (estimate)" | "spans (estimate)"); unaccounted_ms =
ttft_ms - stacked_ms; transfer_gbps (kv.bytes / transfer time); pair, pair_index,
first_contact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvprof import semconv as sc
from kvprof.analysis.skew import CONSTRAINT_COLUMNS, SkewResult, estimate_skew, lookup

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

PHASES = sc.PHASE_ORDER
# kv.hold overlaps the decode side's handshake and transfer: shown, never stacked.
STACKED_PHASES = tuple(p for p in PHASES if p != sc.SPAN_KV_HOLD)
PREFILL_NAMES = {sc.SPAN_PREFILL, *sc.PREFILL_CHILDREN}
DECODE_NAMES = {sc.SPAN_DECODE, *sc.DECODE_CHILDREN}
# What disaggregation adds on top of an aggregated engine's prefill + first step.
OVERHEAD_PHASES = (sc.SPAN_KV_SERIALIZE, sc.SPAN_KV_HANDSHAKE, sc.SPAN_KV_TRANSFER,
                   sc.SPAN_KV_DESERIALIZE, sc.SPAN_DECODE_QUEUE)
UNACCOUNTED = "unaccounted"
SOURCE_ID = "aiperf request id"
SOURCE_WINDOW = "aiperf time window (estimate)"
SOURCE_SPANS = "spans (estimate)"


@dataclass
class RequestBreakdown:
    """The per-request table plus what was needed to build it."""

    requests: pd.DataFrame
    skew: SkewResult
    notes: list[str] = field(default_factory=list)


SIDE_PREFILL, SIDE_DECODE, SIDE_AGGREGATED = 0, 1, 2
SIDE_NAMES = (sc.ROLE_PREFILL, sc.ROLE_DECODE, sc.ROLE_AGGREGATED)


def _name_codes(spans: pd.DataFrame):
    """Span-name categories, each span's code, side (0/1/2) and whether kvprof wrote it.

    The span's name decides its side: a decode engine's resource may say role=decode for
    every span it records, so the role attribute is not trusted for this.
    """
    import numpy as np

    names = spans["name"]
    if names.dtype.name != "category":
        names = names.astype("category")
    cats = [str(c) for c in names.cat.categories]
    codes = names.cat.codes.to_numpy()
    side_of = np.array([SIDE_PREFILL if c in PREFILL_NAMES else SIDE_DECODE if c in DECODE_NAMES
                        else SIDE_AGGREGATED for c in cats] or [0], dtype=np.int8)
    ours = np.array([c in sc.ALL_SPANS for c in cats] or [False])
    side = side_of[codes]
    if "role" in spans:
        # An aggregated engine records prefill.* and decode.first_token children under its
        # vllm.request span: they are one engine's phases, not two sides.
        side = np.where((spans["role"] == sc.ROLE_AGGREGATED).to_numpy(dtype=bool),
                        SIDE_AGGREGATED, side).astype(np.int8)
    return cats, codes, side, ours[codes]


def _key_codes(spans: pd.DataFrame, side):
    """One key per request: the prefill side's request id, reached through the trace.

    The decode side joins the prefill trace through the traceparent; where that failed its
    spans sit in another trace, and its remote_request_id (or request_id) joins it instead.
    Returns (key code per span, key labels); a trace without any request id is its own key.
    """
    import numpy as np
    import pandas as pd

    t_codes, t_uni = pd.factorize(spans["trace_id"])
    rem = spans["remote_request_id"]
    use_rem = (side == SIDE_DECODE) & rem.notna().to_numpy()
    rid = spans["request_id"].where(~use_rem, rem) if use_rem.any() else spans["request_id"]
    r_codes, r_uni = pd.factorize(rid)
    n_t = len(t_uni)
    has = r_codes >= 0
    any_r = np.full(n_t, -1, dtype=np.int64)
    any_r[t_codes[has][::-1]] = r_codes[has][::-1]  # reversed: the first occurrence wins
    pref = has & (side == SIDE_PREFILL)
    pref_r = np.full(n_t, -1, dtype=np.int64)
    pref_r[t_codes[pref][::-1]] = r_codes[pref][::-1]
    per_trace = np.where(pref_r >= 0, pref_r, any_r)
    key = np.where(per_trace[t_codes] >= 0, per_trace[t_codes], len(r_uni) + t_codes)
    labels = np.concatenate([np.asarray(r_uni, dtype=object), np.asarray(t_uni, dtype=object)])
    used, compact = np.unique(key, return_inverse=True)
    return compact, labels[used]


def span_request_keys(spans: pd.DataFrame) -> pd.Series:
    """The request key of every span (aligned to ``spans``), as build_breakdown assigns it."""
    import pandas as pd

    _, _, side, _ = _name_codes(spans)
    codes, labels = _key_codes(spans, side)
    return pd.Series(labels[codes], index=spans.index)


def _first_rows(keys, rows):
    """Row positions of the first span of each key among ``rows`` (a boolean mask)."""
    import numpy as np

    pos = np.flatnonzero(rows)
    uniq, first = np.unique(keys[pos], return_index=True)
    return uniq, pos[first]


def _values_at(column: pd.Series, rows):
    """column's values at positions ``rows`` as an object array (NaN where missing).

    A categorical goes through its integer codes, so only the distinct values are boxed.
    """
    import numpy as np

    if column.dtype.name == "category":
        cats = np.append(np.asarray(column.cat.categories, dtype=object), np.nan)
        return cats[column.cat.codes.to_numpy()[rows]]  # code -1 (missing) -> trailing NaN
    return column.take(rows).to_numpy().astype(object)


def _per_key(n_keys: int, uniq, values, fill=None):
    import numpy as np

    out = np.full(n_keys, fill, dtype=object if fill is None else float)
    out[uniq] = values
    return out


def build_breakdown(spans: pd.DataFrame, aiperf: pd.DataFrame | None = None) -> RequestBreakdown:
    """Per-request phases, skew-corrected TTFT and unaccounted time."""
    import numpy as np
    import pandas as pd

    notes: list[str] = []
    cats, name_code, side, ours = _name_codes(spans)
    if not ours.all():
        spans = spans[ours]
        name_code, side = name_code[ours], side[ours]
    key, labels = _key_codes(spans, side)
    n_keys = len(labels)
    # Times relative to the earliest span keep float64 exact to the nanosecond.
    base = int(spans["start_ns"].min()) if len(spans) else 0
    start = spans["start_ns"].to_numpy() - base
    end = spans["end_ns"].to_numpy() - base
    # Each phase of each request: first start, last end (several ranks' spans overlap).
    n_names = max(len(cats), 1)
    combo = key.astype(np.int64) * n_names + name_code
    order = np.argsort(combo, kind="stable")
    sorted_combo = combo[order]
    bounds = np.flatnonzero(np.r_[True, sorted_combo[1:] != sorted_combo[:-1]]) if len(
        combo) else np.array([], dtype=np.int64)
    g_start = np.minimum.reduceat(start[order], bounds) if len(bounds) else start[:0]
    g_end = np.maximum.reduceat(end[order], bounds) if len(bounds) else end[:0]
    g_key, g_name = sorted_combo[bounds] // n_names, sorted_combo[bounds] % n_names
    start_m = np.full((n_keys, n_names), np.nan)
    end_m = np.full((n_keys, n_names), np.nan)
    start_m[g_key, g_name] = g_start
    end_m[g_key, g_name] = g_end
    index = pd.Index(labels, name="key")
    starts = pd.DataFrame(start_m, index=index, columns=cats)
    ends = pd.DataFrame(end_m, index=index, columns=cats)
    dur = (ends - starts) / 1e6
    req = pd.DataFrame(index=index)
    for p in (*PHASES, sc.SPAN_PREFILL, sc.SPAN_DECODE, sc.SPAN_REQUEST):
        req[p] = dur[p] if p in dur else np.nan

    def attr(column: str, uniq, rows, fill=None):
        if column not in spans:
            return np.full(n_keys, fill, dtype=object)
        return _per_key(n_keys, uniq, _values_at(spans[column], rows), None)

    def engine(uniq, rows):
        out = pd.Series(attr("engine_id", uniq, rows)).fillna(
            pd.Series(attr("pod", uniq, rows)))
        miss = out.isna().to_numpy()
        if miss.any():
            # Last resort, only where needed: "service@host" (missing when either is).
            host = (pd.Series(attr("service", uniq, rows)[miss]).astype(str) + "@"
                    + pd.Series(attr("host", uniq, rows)[miss]).astype(str))
            out[miss] = host.to_numpy()
        return out.to_numpy()

    def side_time(role: int, frame: pd.DataFrame, how: str):
        names = [c for c in cats if (c in PREFILL_NAMES if role == SIDE_PREFILL else
                                     c in DECODE_NAMES if role == SIDE_DECODE else
                                     c not in PREFILL_NAMES and c not in DECODE_NAMES)]
        if not names:
            return np.full(n_keys, np.nan)
        return getattr(frame[names], how)(axis=1).to_numpy()

    pu, prow = _first_rows(key, side == SIDE_PREFILL)
    du, drow = _first_rows(key, side == SIDE_DECODE)
    au, arow = _first_rows(key, side == SIDE_AGGREGATED)
    xu, xrow = _first_rows(key, name_code == (cats.index(sc.SPAN_KV_TRANSFER)
                                              if sc.SPAN_KV_TRANSFER in cats else -1))
    su, srow = _first_rows(key, name_code == (cats.index(sc.SPAN_KV_SERIALIZE)
                                              if sc.SPAN_KV_SERIALIZE in cats else -1))
    req["prefill_engine"] = engine(pu, prow)
    req["prefill_clock"] = attr("clock", pu, prow)
    req["prefill_pod"] = attr("pod", pu, prow)
    req["prefill_node"] = attr("node", pu, prow)
    trace = pd.Series(attr("trace_id", pu, prow), index=index)
    req["decode_engine"] = engine(du, drow)
    req["decode_clock"] = attr("clock", du, drow)
    req["decode_pod"] = attr("pod", du, drow)
    req["decode_node"] = attr("node", du, drow)
    remote = pd.Series(attr("remote_engine_id", xu, xrow), index=index).fillna(
        pd.Series(attr("remote_engine_id", du, drow), index=index))
    kv_bytes = pd.Series(attr("kv_bytes", xu, xrow), index=index).fillna(
        pd.Series(attr("kv_bytes", su, srow), index=index))
    req["kv_bytes"] = pd.to_numeric(kv_bytes, errors="coerce")
    req["kv_path"] = attr("kv_path", xu, xrow)
    req["connector"] = attr("connector", xu, xrow)
    a_clock = pd.Series(attr("clock", au, arow), index=index)
    req["prefill_engine"] = req["prefill_engine"].fillna(remote).fillna(
        pd.Series(engine(au, arow), index=index))
    req["trace_id"] = trace.fillna(pd.Series(attr("trace_id", du, drow), index=index)).fillna(
        pd.Series(attr("trace_id", au, arow), index=index))
    req["prefill_clock"] = req["prefill_clock"].fillna(a_clock)
    p_start = pd.Series(side_time(SIDE_PREFILL, starts, "min"), index=index)
    d_end = pd.Series(side_time(SIDE_DECODE, ends, "max"), index=index)
    a_start = pd.Series(side_time(SIDE_AGGREGATED, starts, "min"), index=index)

    def col(frame: pd.DataFrame, name: str) -> pd.Series:
        return frame[name] if name in frame else pd.Series(np.nan, index=req.index)

    # --- clock skew ---------------------------------------------------------------------
    prefill_done = pd.concat([col(ends, sc.SPAN_PREFILL_COMPUTE), col(ends, sc.SPAN_KV_SERIALIZE)],
                             axis=1).max(axis=1)
    x_start, x_end = col(starts, sc.SPAN_KV_TRANSFER), col(ends, sc.SPAN_KV_TRANSFER)
    hold_end = col(ends, sc.SPAN_KV_HOLD)
    both = req["prefill_clock"].notna() & req["decode_clock"].notna()
    cons = []
    m = both & prefill_done.notna() & x_start.notna()
    cons.append(pd.DataFrame({"rule": "transfer-after-prefill", "key": req.index[m],
                              "a": req["prefill_clock"][m], "b": req["decode_clock"][m],
                              "lo_ns": (prefill_done - x_start)[m], "hi_ns": math.inf}))
    m = both & hold_end.notna() & x_end.notna()
    cons.append(pd.DataFrame({"rule": "hold-outlasts-transfer", "key": req.index[m],
                              "a": req["prefill_clock"][m], "b": req["decode_clock"][m],
                              "lo_ns": -math.inf, "hi_ns": (hold_end - x_end)[m]}))
    cons.append(_parent_constraints(spans, base, name_code, cats))
    constraints = pd.concat([c[list(CONSTRAINT_COLUMNS)] for c in cons if len(c)],
                            ignore_index=True) if any(len(c) for c in cons) else pd.DataFrame(
        columns=list(CONSTRAINT_COLUMNS))
    prefill_clocks = sorted(str(c) for c in req["prefill_clock"].dropna().unique())
    skew = estimate_skew(constraints, prefill_clocks[0] if prefill_clocks else None)
    off = skew.offsets_ns

    def shifted(values: pd.Series, clocks: pd.Series) -> pd.Series:
        return values + pd.Series(lookup(clocks, off), index=clocks.index)

    req["start_ns"] = shifted(p_start.fillna(a_start), req["prefill_clock"])
    first_token_end = col(ends, sc.SPAN_DECODE_FIRST_TOKEN)
    first_end = shifted(first_token_end.fillna(d_end), req["decode_clock"])
    agg_end = shifted(first_token_end, a_clock)
    req["span_ttft_ms"] = ((first_end.fillna(agg_end) - req["start_ns"]) / 1e6)
    req["start_ns"] = req["start_ns"] + base
    req["stacked_ms"] = req[list(STACKED_PHASES)].sum(axis=1, min_count=1)
    x_ms = req[sc.SPAN_KV_TRANSFER]
    req["transfer_gbps"] = req["kv_bytes"] / (x_ms / 1e3) / 1e9

    # --- TTFT: aiperf when given, else the spans' own envelope ---------------------------
    req["ttft_ms"] = req["span_ttft_ms"]
    req["ttft_source"] = SOURCE_SPANS
    if aiperf is not None and len(aiperf):
        from kvprof.analysis.join import join_aiperf

        ttft, source, join_notes = join_aiperf(req, aiperf)
        has = ttft.notna()
        req.loc[has, "ttft_ms"] = ttft[has]
        req.loc[has, "ttft_source"] = source[has]
        notes.extend(join_notes)
    else:
        notes.append("No aiperf records given: TTFT is the span envelope (prefill start to "
                     "first decode step end), which misses the client and frontend time.")
    req["unaccounted_ms"] = req["ttft_ms"] - req["stacked_ms"].fillna(0.0)

    # --- first contact per (prefill engine, decode engine) pair --------------------------
    req = req.sort_values("start_ns", kind="stable")
    req["pair"] = req["prefill_engine"].astype(str) + " -> " + req["decode_engine"].fillna(
        "(aggregated)").astype(str)
    req["pair_index"] = req.groupby("pair", sort=False).cumcount()
    req["first_contact"] = req["pair_index"] == 0
    skipped = int(req["ttft_ms"].isna().sum())
    if skipped:
        notes.append(f"{skipped} requests have neither aiperf TTFT nor both span ends; "
                     "they are left out of the percentiles.")
    return RequestBreakdown(requests=req.reset_index(), skew=skew, notes=notes)


def _parent_constraints(spans: pd.DataFrame, base: int, name_code, cats) -> pd.DataFrame:
    """child start >= parent start, for a side's root span whose parent is on another clock.

    Only side roots (vllm.prefill / vllm.decode / vllm.request) are checked: below them parent
    and child share a process, so the rule says nothing about skew and would cost a join of
    every span.
    """
    import numpy as np
    import pandas as pd

    roots = [i for i, c in enumerate(cats) if c in (sc.SPAN_PREFILL, sc.SPAN_DECODE,
                                                     sc.SPAN_REQUEST)]
    pick = np.isin(name_code, roots) & (spans["parent_span_id"] != "").to_numpy(dtype=bool)
    empty = pd.DataFrame(columns=list(CONSTRAINT_COLUMNS))
    if not pick.any():
        return empty
    kids = spans.loc[pick, ["parent_span_id", "start_ns", "clock", "request_id"]]
    parents = spans.loc[fast_isin(spans["span_id"], kids["parent_span_id"]),
                        ["span_id", "start_ns", "clock"]]
    parents = parents.rename(columns={"span_id": "parent_span_id", "start_ns": "p_start",
                                      "clock": "p_clock"})
    joined = kids.assign(clock=kids["clock"].astype(str)).merge(
        parents.assign(p_clock=parents["p_clock"].astype(str)), on="parent_span_id")
    joined = joined[joined["clock"] != joined["p_clock"]]
    if joined.empty:
        return empty
    return pd.DataFrame({"rule": "child-after-parent", "key": joined["request_id"].to_numpy(),
                         "a": joined["p_clock"].to_numpy(), "b": joined["clock"].to_numpy(),
                         "lo_ns": ((joined["p_start"] - base) - (joined["start_ns"] - base)
                                   ).to_numpy(dtype=float),
                         "hi_ns": math.inf})


def _arrow_strings(values):
    """A Series (or iterable) of strings as one Arrow string array, without Python loops."""
    import pandas as pd
    import pyarrow as pa

    if not isinstance(values, pd.Series):
        values = pd.Series(list(values), dtype=object)
    arr = pa.array(values, from_pandas=True) if values.dtype == object else pa.array(values)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr if arr.type == pa.string() else arr.cast(pa.string())


def fast_isin(values: pd.Series, wanted) -> np.ndarray:
    """Series.isin through Arrow's hash kernel (pandas' Arrow-string isin loops in Python)."""
    import numpy as np
    import pyarrow.compute as pc

    found = pc.is_in(_arrow_strings(values), value_set=_arrow_strings(wanted).drop_null())
    return np.asarray(found.fill_null(False), dtype=bool)


def fast_map(values: pd.Series, table: pd.Series) -> pd.Series:
    """values.map(table) for a float Series with unique string labels, via Arrow's hash kernel."""
    import numpy as np
    import pandas as pd
    import pyarrow.compute as pc

    pos = pc.index_in(_arrow_strings(values), value_set=_arrow_strings(table.index.to_series()))
    lookup_table = np.append(table.to_numpy(dtype=float), np.nan)
    return pd.Series(lookup_table[np.asarray(pos.fill_null(-1))], index=values.index)


def nearest_rank(values: pd.Series, pct: float) -> int:
    """Position (in ascending order) of the nearest-rank percentile."""
    n = len(values)
    return max(0, min(n - 1, math.ceil(pct / 100.0 * n) - 1))


def percentile_view(req: pd.DataFrame, pcts: tuple[int, ...] = (50, 90, 99)) -> list[dict]:
    """The request at each TTFT percentile (nearest rank) with its stacked phases."""
    done = req[req["ttft_ms"].notna()].sort_values("ttft_ms", kind="stable")
    out = []
    if done.empty:
        return out
    for p in pcts:
        row = done.iloc[nearest_rank(done["ttft_ms"], p)]
        phases = {ph: _num(row[ph]) for ph in STACKED_PHASES}
        phases[UNACCOUNTED] = _num(row["unaccounted_ms"])
        out.append({"percentile": p, "key": row["key"], "pair": row["pair"],
                    "ttft_ms": float(row["ttft_ms"]), "ttft_source": row["ttft_source"],
                    "first_contact": bool(row["first_contact"]), "phases_ms": phases,
                    "kv_hold_ms": _num(row[sc.SPAN_KV_HOLD])})
    return out


def phase_stats(req: pd.DataFrame) -> list[dict]:
    """Each phase's own count, mean, p50 and p99 (linear interpolation) over requests."""
    out = []
    for ph in (*PHASES, UNACCOUNTED, "ttft"):
        column = {UNACCOUNTED: "unaccounted_ms", "ttft": "ttft_ms"}.get(ph, ph)
        s = req[column].dropna()
        if s.empty:
            continue
        out.append({"phase": ph, "count": int(len(s)), "mean_ms": float(s.mean()),
                    "p50_ms": float(s.quantile(0.5)), "p99_ms": float(s.quantile(0.99)),
                    "max_ms": float(s.max())})
    return out


def pair_view(req: pd.DataFrame) -> list[dict]:
    """Per (prefill, decode) pair: the first request against the steady state after it."""
    out = []
    for pair, grp in req.groupby("pair", sort=True):
        first = grp[grp["first_contact"]]
        steady = grp[~grp["first_contact"]]
        paths = grp["kv_path"].dropna().astype(str)

        def med(frame, colname):
            s = frame[colname].dropna()
            return float(s.median()) if len(s) else None

        out.append({
            "pair": pair, "requests": int(len(grp)),
            "path": paths.mode().iloc[0] if len(paths) else None,
            "first_key": first["key"].iloc[0] if len(first) else None,
            "first_ttft_ms": med(first, "ttft_ms"),
            "first_handshake_ms": med(first, sc.SPAN_KV_HANDSHAKE),
            "steady_ttft_ms": med(steady, "ttft_ms"),
            "steady_handshake_ms": med(steady, sc.SPAN_KV_HANDSHAKE),
            "steady_transfer_ms": med(steady, sc.SPAN_KV_TRANSFER),
            "median_transfer_gbps": med(grp, "transfer_gbps"),
        })
    return out


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f
