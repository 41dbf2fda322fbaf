"""Per-request TTFT breakdown: the legs of each request, its phases, clock skew and TTFT.

Request table schema (one row per request, ``RequestBreakdown.requests``):

* key (the prefill-side vLLM request id, else the client's id, else the trace id),
  x_request_id (the client's X-Request-Id when known), trace_id, chain ("disaggregated" |
  "aggregated": which path the legs follow), concurrency (from aiperf, NaN if unknown);
* prefill_engine, decode_engine, prefill_pod, decode_pod, prefill_node, decode_node,
  prefill_clock, decode_clock, kv_bytes, kv_path, connector, transfer_gbps, pair,
  pair_index, first_contact;
* one ``<span name>`` column in ms per phase span (semconv.PHASE_ORDER, the top spans,
  vllm.decode.kv_wait): each span on its own (NaN = no span);
* one ``leg:<milestone id>`` column per leg in ms (kvprof.analysis.legs; NaN = no leg),
  stacked_ms (their sum), unaccounted_ms (TTFT - stacked_ms: the gaps no leg covers) and
  unaccounted_detail (each gap in words: between which milestones, which were missing);
* start_ns (first milestone, reference clock), span_ttft_ms (first -> last milestone,
  skew-corrected), ttft_ms and ttft_source ("aiperf request id" | "aiperf time window
  (estimate)" | "spans (estimate)"), client_error (aiperf recorded an error), dynamo_ttft_ms
  (NVIDIA Dynamo's frontend's own ttft_ms), dynamo_kv_bound_ms (its request_end record's
  kv_transfer_estimated_latency_ms: prefill done -> first token, an upper bound on the
  hand-off; NaN without a record), transfer_status ("ok" | "failed: ..." |
  "lease expired: ...", None without a transfer), warmup (aiperf's warm-up phase: kept for
  first contact, left out of the statistics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvprof import semconv as sc
from kvprof.analysis import coarse as co
from kvprof.analysis import legs as lg
from kvprof.analysis.arrowops import fast_isin
from kvprof.analysis.join import SOURCE_ID, SOURCE_SPANS, SOURCE_WINDOW, join_aiperf
from kvprof.analysis.keys import assign_request_keys, first_rows
from kvprof.analysis.propagation import client_hop, hop_table
from kvprof.analysis.skew import CONSTRAINT_COLUMNS, SkewResult, estimate_skew

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

__all__ = ["SOURCE_ID", "SOURCE_SPANS", "SOURCE_WINDOW", "RequestBreakdown", "build_breakdown"]

PHASES = sc.PHASE_ORDER
SPAN_MS_COLUMNS = (*PHASES, sc.SPAN_DECODE_KV_WAIT, sc.SPAN_PREFILL, sc.SPAN_DECODE,
                   sc.SPAN_REQUEST)
LEG = "leg:"
UNACCOUNTED = lg.UNACCOUNTED
PREFILL_NAMES = {sc.SPAN_PREFILL, *sc.PREFILL_CHILDREN, sc.SPAN_KV_LEASE_EXPIRED}
DECODE_NAMES = {sc.SPAN_DECODE, *sc.DECODE_CHILDREN, sc.SPAN_DECODE_KV_WAIT}
ROUTER_NAMES = {*sc.ROUTER_SPANS, sc.DYNAMO_HTTP_REQUEST, sc.DYNAMO_ROUTE}
KNOWN_NAMES = {*sc.ALL_SPANS, *sc.FOREIGN_SPANS}
# Spans of one name that a request meets once per engine (Dynamo's); numbered by start.
ORDERED_NAMES = (sc.DYNAMO_HANDLE, sc.DYNAMO_ROUTE, sc.VLLM_LLM_REQUEST)
SIDE_PREFILL, SIDE_DECODE, SIDE_AGGREGATED, SIDE_ROUTER, SIDE_OTHER = range(5)
CLIENT_CLOCK = "client"
ONE_CLOCK = "one clock"


@dataclass
class RequestBreakdown:
    """The per-request table plus what was needed to build it."""

    requests: pd.DataFrame
    skew: SkewResult
    notes: list[str] = field(default_factory=list)
    # Per hop (client -> router -> engines): how the request's trace and ids crossed it
    # (kvprof.analysis.propagation).
    propagation: list[dict] = field(default_factory=list)
    # Per chain: (request keys, milestone times in ns on the reference clock, NaN = not
    # kept), columns in chain order; a named leg ending at milestone j spans
    # [times[j] - leg_ms * 1e6, times[j]] (kvprof.analysis.cpu_wait reads the windows).
    milestones: dict[str, tuple] = field(default_factory=dict)

    def leg_columns(self) -> list[str]:
        """The leg columns present, in path order (disaggregated chain first)."""
        return [c for c in leg_order() if c in self.requests]


def leg_order() -> list[str]:
    """Every leg column of every chain, in path order, without repeats."""
    out: dict[str, None] = {}
    for chain in lg.CHAINS.values():
        for m in chain[1:]:
            out[LEG + m.id] = None
    order = list(out)
    # Coarse legs (kvprof.analysis.coarse) sit after the fine leg they stand beside.
    for points in co.COARSE_CHAINS.values():
        at = 0
        for p in points[1:]:
            col = LEG + p.id
            fine = LEG + p.id.removeprefix(co.PREFIX)
            if fine in order:
                at = order.index(fine) + 1
            if col not in order:
                order.insert(at, col)
            at = order.index(col) + 1
    return order


def leg_info() -> dict[str, dict[str, str]]:
    """Per leg column: its label and stage per chain (a milestone id may end legs in two
    chains under different words)."""
    info: dict[str, dict[str, str]] = {}
    for chain_name, chain in lg.CHAINS.items():
        for m in chain[1:]:
            info.setdefault(LEG + m.id, {})[chain_name] = m.leg
            info[LEG + m.id].setdefault("stage:" + chain_name, m.stage)
    for chain_name, points in co.COARSE_CHAINS.items():
        for p in points[1:]:
            info.setdefault(LEG + p.id, {})[chain_name] = f"{p.leg} [coarse: {p.source}]"
            info[LEG + p.id].setdefault("stage:" + chain_name, p.stage)
    return info


def _as_text(col: pd.Series) -> pd.Series:
    """The column as strings, as ``astype(str)`` gives them; a categorical of strings stays
    categorical (same values, same comparisons): converting a million span names to str
    objects was the breakdown's single biggest step."""
    import pandas as pd

    if (isinstance(col.dtype, pd.CategoricalDtype) and not col.hasnans
            and all(isinstance(c, str) for c in col.cat.categories)):
        return col
    return col.astype(str)


def _sides(spans: pd.DataFrame, names: pd.Series):
    """Which engine recorded each span: prefill / decode / aggregated / router / other."""
    import numpy as np

    role = spans["role"].astype(object).to_numpy() if "role" in spans else np.full(
        len(spans), None, dtype=object)
    side = np.full(len(spans), SIDE_OTHER, dtype=np.int8)
    side[names.isin(PREFILL_NAMES).to_numpy()] = SIDE_PREFILL
    side[names.isin(DECODE_NAMES).to_numpy()] = SIDE_DECODE
    side[names.isin(ROUTER_NAMES).to_numpy()] = SIDE_ROUTER
    api = names.isin(sc.API_SPANS).to_numpy()
    for value, code in ((sc.ROLE_PREFILL, SIDE_PREFILL), (sc.ROLE_DECODE, SIDE_DECODE),
                        (sc.ROLE_AGGREGATED, SIDE_AGGREGATED)):
        side[api & (role == value)] = code
    # An aggregated engine records prefill.* and decode.first_token under vllm.request: one
    # engine's phases, not two sides.
    side[(role == sc.ROLE_AGGREGATED) & ~api & (side != SIDE_ROUTER)] = SIDE_AGGREGATED
    side[(names == sc.SPAN_REQUEST).to_numpy()] = SIDE_AGGREGATED
    return side


def _slot_codes(spans: pd.DataFrame, names: pd.Series, key_codes, role
                ) -> tuple[np.ndarray, list[str]]:
    """The column a span fills, factorized (per-span code, names in order of appearance):
    its name, name@role for API spans, name#k for spans one request meets once per engine
    (Dynamo's), k by start time. Built per distinct (name, role, k), not per span."""
    import numpy as np
    import pandas as pd

    name_codes, name_uni = pd.factorize(names)
    name_uni = [str(u) for u in name_uni]
    api = np.array([u in sc.API_SPANS for u in name_uni] + [False])[name_codes]
    ordered = np.array([u in ORDERED_NAMES for u in name_uni] + [False])[name_codes] & ~api
    role_codes, role_uni = pd.factorize(pd.Series(role, dtype=object))
    role_words = [str(u) for u in role_uni] + ["?"]  # code -1 (no role) picks "?"
    extra = np.zeros(len(name_codes), dtype=np.int64)
    extra[api] = 1 + (role_codes[api] % len(role_words))
    rank = np.zeros(len(name_codes), dtype=np.int64)
    if ordered.any():
        # rank(method="first") within (request, name) by start: a stable sort by start.
        rows = np.flatnonzero(ordered)
        k, n = key_codes[rows].astype(np.int64), name_codes[rows]
        order = np.lexsort((spans["start_ns"].to_numpy()[rows], n, k))
        ks, ns = k[order], n[order]
        new_group = np.r_[True, (ks[1:] != ks[:-1]) | (ns[1:] != ns[:-1])]
        group_start = np.maximum.accumulate(np.where(new_group, np.arange(len(order)), 0))
        rank[rows[order]] = np.arange(len(order)) - group_start + 1
        extra[ordered] = 1 + len(role_words) + rank[ordered]
    width = 2 + len(role_words) + int(rank.max(initial=0))
    combo_codes, combo_uni = pd.factorize(name_codes.astype(np.int64) * width + extra)
    words = []
    for c in combo_uni.tolist():
        name, x = name_uni[c // width], c % width
        if x == 0:
            words.append(name)
        elif x <= len(role_words):
            words.append(f"{name}@{role_words[x - 1]}")
        else:
            words.append(f"{name}#{x - 1 - len(role_words)}")
    # Two combinations can read alike (no role and a role named "?"): one column each word.
    word_codes, word_uni = pd.factorize(np.array(words, dtype=object))
    return word_codes[combo_codes], [str(w) for w in word_uni]


def build_breakdown(spans: pd.DataFrame, aiperf: pd.DataFrame | None = None,
                    client_host: str | None = None, one_clock: bool = False,
                    dynamo_records: pd.DataFrame | None = None) -> RequestBreakdown:
    """Per-request legs, phases, skew-corrected TTFT and unaccounted time.

    Arguments as ``breakdown_part``; the two halves are public so that
    kvprof.analysis.stream can run the first on shards of requests, pool their constraints
    into one skew estimate, then finish each shard.
    """
    part = breakdown_part(spans, aiperf, client_host, one_clock, dynamo_records)
    return finish_breakdown(part, estimate_skew(part.constraints, part.reference))


@dataclass
class BreakdownPart:
    """The half of a breakdown that needs no skew estimate: the request table so far, its
    milestones per chain and the causal constraints (what estimate_skew reads)."""

    req: pd.DataFrame
    labels: np.ndarray
    per_chain: dict
    clocks: list
    client: object
    notes: list
    hops: list
    constraints: pd.DataFrame
    reference: str | None
    base: int
    starts: pd.DataFrame
    ends: pd.DataFrame
    clock_mat: np.ndarray
    slot_names: list
    records: dict
    native: object
    transfer_status: np.ndarray
    hop_notes: list = field(default_factory=list)  # the notes of ``hops`` (in ``notes`` too)


def breakdown_part(spans: pd.DataFrame, aiperf: pd.DataFrame | None = None,
                   client_host: str | None = None, one_clock: bool = False,
                   dynamo_records: pd.DataFrame | None = None,
                   base: int | None = None) -> BreakdownPart:
    """Everything of build_breakdown up to the skew estimate.

    ``base``: the earliest start of all spans (default: of these spans); shards of one
    run share it, so that client times (float64 nanoseconds) round alike in every shard.

    ``client_host``: the host the load generator ran on, when known: its timestamps are then
    on that host's clock (no skew to estimate); otherwise the client is a clock of its own.
    ``one_clock``: every span and the client were timed by one clock (one machine): nothing
    to estimate, whatever host or service names the spans carry.
    ``dynamo_records``: NVIDIA Dynamo's request_end records
    (kvprof.analysis.loaders.dynamo_records), for the coarse legs where probes did not run.
    """
    import numpy as np
    import pandas as pd

    notes: list[str] = []
    names_all = _as_text(spans["name"])
    known = names_all.isin(KNOWN_NAMES).to_numpy()
    if not known.all():
        spans = spans[known]
    if one_clock:
        spans = spans.assign(clock=ONE_CLOCK)
        client_host = ONE_CLOCK
    names = _as_text(spans["name"])
    side = _sides(spans, names)
    keys = assign_request_keys(spans, side == SIDE_DECODE)
    notes.extend(keys.notes)
    key = keys.codes
    n_keys = len(keys.labels)
    router_label = ("Dynamo frontend" if (names == sc.DYNAMO_HTTP_REQUEST).any() else "router")
    hops, hop_notes = hop_table(
        pd.factorize(spans["trace_id"])[0], key,
        {"router": side == SIDE_ROUTER, "prefill": side == SIDE_PREFILL,
         "decode": side == SIDE_DECODE, "aggregated": side == SIDE_AGGREGATED}, router_label)
    notes.extend(hop_notes)
    role = spans["role"].astype(object).to_numpy() if "role" in spans else np.full(
        len(spans), None, dtype=object)
    slot_codes, slot_names = _slot_codes(spans, names, key, role)
    # Times relative to the earliest span keep float64 exact to the nanosecond.
    if base is None:
        base = int(spans["start_ns"].min()) if len(spans) else 0
    start = (spans["start_ns"].to_numpy() - base).astype(float)
    end = (spans["end_ns"].to_numpy() - base).astype(float)
    clock_codes, clock_names = pd.factorize(_as_text(spans["clock"]))
    mat = _slot_matrices(key, slot_codes, len(slot_names), n_keys, start, end, clock_codes)
    index = pd.Index(keys.labels, name="key")
    starts = pd.DataFrame(mat["start"], index=index, columns=slot_names)
    ends = pd.DataFrame(mat["end"], index=index, columns=slot_names)
    req = pd.DataFrame(index=index)
    for p in SPAN_MS_COLUMNS:
        req[p] = (ends[p] - starts[p]) / 1e6 if p in starts else np.nan
    req["x_request_id"] = keys.client_ids
    _engine_attributes(req, spans, key, side, names, n_keys)

    # --- milestones, client leg, skew -----------------------------------------------------
    disagg = np.isin(np.arange(n_keys), np.unique(key[side == SIDE_DECODE]))
    dynamo = np.isin(np.arange(n_keys), np.unique(key[(names == sc.DYNAMO_HTTP_REQUEST
                                                        ).to_numpy()]))
    # Dynamo's frontend and workers (two handle_payload spans) or vLLM's own API servers.
    n_handles = np.bincount(key[(names == sc.DYNAMO_HANDLE).to_numpy()], minlength=n_keys)
    disagg |= dynamo & (n_handles >= 2)
    # Dynamo's request_end record, joined by X-Request-Id or Dynamo's request id: its
    # prefill -> decode hand-off bound says disaggregated without the workers' spans too.
    records = co.record_matrix(dynamo_records, keys.client_ids, _first_value(
        spans, key, (names == sc.DYNAMO_HTTP_REQUEST).to_numpy(), "foreign_request_id", n_keys))
    disagg |= dynamo & ~np.isnan(records["kv_transfer_estimated_latency_ms"])
    chain_of = np.where(disagg, "disaggregated", "aggregated").astype(object)
    chain_of[dynamo] = "dynamo " + chain_of[dynamo]
    req["chain"] = chain_of
    req["dynamo_ttft_ms"] = _first_value(spans, key, (names == sc.DYNAMO_HTTP_REQUEST
                                                      ).to_numpy(), "dynamo_ttft_ms", n_keys,
                                         numeric=True)
    raw_first = np.nanmin(np.where(np.isnan(mat["start"]), np.inf, mat["start"]), axis=1)
    client = None
    if aiperf is not None and len(aiperf):
        ids = [pd.Series(keys.client_ids, dtype=object).astype("string"),
               pd.Series(keys.labels, dtype=object).astype("string")]
        client = join_aiperf(ids, pd.Series(np.where(np.isfinite(raw_first), raw_first + base,
                                                     np.nan)), aiperf)
        notes.extend(client.notes)
        hops.insert(0, client_hop(client.source, SOURCE_ID, SOURCE_WINDOW, router_label))
    else:
        notes.append("No aiperf records given: TTFT is the traced path's own envelope (first "
                     "to last milestone), which misses the client's legs.")
    clocks = list(map(str, clock_names))
    client_clock = clocks.index(client_host) if client_host in clocks else len(clocks)
    if client_clock == len(clocks):
        clocks.append(client_host or CLIENT_CLOCK)
    per_chain = {}
    cons = []
    for chain_name, chain in lg.CHAINS.items():
        rows = np.flatnonzero(chain_of == chain_name)
        if not len(rows):
            continue
        t, c = _milestones(chain, rows, starts, ends, mat["clock"], slot_names, client, base,
                           client_clock, req["dynamo_ttft_ms"].to_numpy())
        per_chain[chain_name] = (rows, t, c)
        cons.append(_path_constraints(chain, rows, t, c, clocks, keys.labels))
    cons.append(_hold_constraints(req, starts, ends, mat["clock"], slot_names, clocks))
    cons.append(_parent_constraints(spans, base, names))
    cons = [c for c in cons if len(c)]
    constraints = (pd.concat([c[list(CONSTRAINT_COLUMNS)] for c in cons], ignore_index=True)
                   if cons else pd.DataFrame(columns=list(CONSTRAINT_COLUMNS)))
    prefill_clocks = sorted(str(c) for c in req["prefill_clock"].dropna().unique())
    # Coarse legs' span attributes and the transfer status need the spans: taken now, so a
    # part holds no span (the streamed path keeps a part per shard).
    native = ((co.slot_attributes(spans, key, slot_codes, slot_names, n_keys), records)
              if any(c in co.COARSE_CHAINS for c in per_chain) else None)
    return BreakdownPart(
        req=req, labels=keys.labels, per_chain=per_chain, clocks=clocks, client=client,
        notes=notes, hops=hops, constraints=constraints,
        reference=prefill_clocks[0] if prefill_clocks else None, base=base, starts=starts,
        ends=ends, clock_mat=mat["clock"], slot_names=slot_names, records=records,
        native=native, transfer_status=_transfer_status(req, spans, key, names, n_keys),
        hop_notes=hop_notes)


def finish_breakdown(part: BreakdownPart, skew: SkewResult,
                     first_contact: bool = True) -> RequestBreakdown:
    """The legs on the corrected clocks and the TTFT per request (``first_contact``: also
    order the requests and mark each pair's first; the streamed path does that once over
    all shards)."""
    import numpy as np
    import pandas as pd

    req, per_chain, clocks, client, notes = (part.req, part.per_chain, part.clocks,
                                             part.client, list(part.notes))
    starts, ends, slot_names, records, base = (part.starts, part.ends, part.slot_names,
                                               part.records, part.base)
    mat = {"clock": part.clock_mat}
    n_keys = len(req)
    offset = np.array([skew.offsets_ns.get(c, 0.0) for c in clocks])

    # --- legs ------------------------------------------------------------------------------
    # One block for every leg column (one insert each fragments the frame).
    req = pd.concat([req, pd.DataFrame(np.nan, index=req.index, columns=leg_order())], axis=1)
    req["unaccounted_ms"] = np.nan
    req["unaccounted_detail"] = None
    req["span_ttft_ms"] = np.nan
    req["start_ns"] = np.nan
    ttft_client = client.ttft_ms if client is not None else np.full(n_keys, np.nan)
    milestones: dict[str, tuple] = {}
    for chain_name, (rows, t, c) in per_chain.items():
        chain = lg.CHAINS[chain_name]
        corrected = t + np.where(c >= 0, offset[np.maximum(c, 0)], 0.0)
        table = lg.compute_legs(corrected, chain, ttft_client[rows])
        if chain_name in co.COARSE_CHAINS:  # fill the gaps with coarse legs (coarse.py)
            points = co.COARSE_CHAINS[chain_name]
            ct, cc = co.coarse_times(points, rows, starts, ends, mat["clock"], slot_names,
                                     *part.native, req["dynamo_ttft_ms"].to_numpy())
            fill = co.fill_gaps(table, corrected, points,
                                ct + np.where(cc >= 0, offset[np.maximum(cc, 0)], 0.0))
            for j, p in enumerate(points[1:], start=1):
                req.iloc[rows, req.columns.get_loc(LEG + p.id)] = fill.legs_ms[:, j]
        milestones[chain_name] = (np.asarray(part.labels)[rows],
                                  np.where(table.kept, corrected + base, np.nan))
        for j, m in enumerate(chain[1:], start=1):
            req.iloc[rows, req.columns.get_loc(LEG + m.id)] = table.legs_ms[:, j]
        req.iloc[rows, req.columns.get_loc("span_ttft_ms")] = (table.last_ns
                                                               - table.first_ns) / 1e6
        req.iloc[rows, req.columns.get_loc("unaccounted_ms")] = table.unaccounted_ms
        req.iloc[rows, req.columns.get_loc("unaccounted_detail")] = [
            "; ".join(g) or None for g in table.gaps]
        req.iloc[rows, req.columns.get_loc("start_ns")] = table.first_ns + base
    # Dynamo's own bound on the prefill -> decode hand-off (its request_end record).
    req["dynamo_kv_bound_ms"] = records["kv_transfer_estimated_latency_ms"]
    legs_present = [c for c in leg_order() if req[c].notna().any()]
    req["stacked_ms"] = req[legs_present].sum(axis=1, min_count=1) if legs_present else np.nan
    req["ttft_ms"] = req["span_ttft_ms"]
    req["ttft_source"] = SOURCE_SPANS
    req["concurrency"] = np.nan
    req["client_error"] = False
    req["warmup"] = False
    if client is not None:
        has = ~np.isnan(client.ttft_ms)
        req.loc[has, "ttft_ms"] = client.ttft_ms[has]
        req.loc[has, "ttft_source"] = client.source[has]
        req["concurrency"] = client.concurrency
        req["client_error"] = client.error
        # aiperf's warm-up requests: traced like the rest (a first contact may be one), left
        # out of the statistics as aiperf leaves them out of its own.
        req["warmup"] = client.phase == "warmup"
    no_legs = req["stacked_ms"].isna() & req["ttft_ms"].notna()
    req.loc[no_legs, "unaccounted_ms"] = req.loc[no_legs, "ttft_ms"]
    x_ms = req[sc.SPAN_KV_TRANSFER]
    if LEG + "kv.wire.end" in req:
        # GB/s from the wire time alone where NIXL's telemetry measured it (issue 19).
        x_ms = req[LEG + "kv.wire.end"].where(req[LEG + "kv.wire.end"] > 0, x_ms)
    req["transfer_gbps"] = req["kv_bytes"] / (x_ms / 1e3) / 1e9
    req["transfer_status"] = part.transfer_status
    if first_contact:
        req = mark_first_contact(req)
    skipped = int(req["ttft_ms"].isna().sum())
    if skipped:
        notes.append(f"{skipped} requests have neither an aiperf TTFT nor two milestones; "
                     "they are left out of the percentiles.")
    return RequestBreakdown(requests=req.reset_index() if first_contact else req, skew=skew,
                            notes=notes, milestones=milestones, propagation=part.hops)


def mark_first_contact(req: pd.DataFrame) -> pd.DataFrame:
    """Requests in start order, with each (prefill engine, decode engine) pair's first."""
    req = req.sort_values("start_ns", kind="stable")
    req["pair"] = req["prefill_engine"].astype(str) + " -> " + req["decode_engine"].fillna(
        "(aggregated)").astype(str)
    req["pair_index"] = req.groupby("pair", sort=False).cumcount()
    req["first_contact"] = req["pair_index"] == 0
    return req


def _slot_matrices(key, slot, n_slots, n_keys, start, end, clock) -> dict[str, np.ndarray]:
    """Per (request, slot): first start, last end (several ranks' spans overlap) and the
    clock of the earliest span."""
    import numpy as np

    n_slots = max(n_slots, 1)
    combo = key.astype(np.int64) * n_slots + slot
    order = np.lexsort((start, combo))
    sc_ = combo[order]
    bounds = (np.flatnonzero(np.r_[True, sc_[1:] != sc_[:-1]]) if len(sc_)
              else np.array([], dtype=np.int64))
    out = {"start": np.full((n_keys, n_slots), np.nan), "end": np.full((n_keys, n_slots), np.nan),
           "clock": np.full((n_keys, n_slots), -1, dtype=np.int64)}
    if len(bounds):
        gk, gs = sc_[bounds] // n_slots, sc_[bounds] % n_slots
        out["start"][gk, gs] = start[order][bounds]
        out["end"][gk, gs] = np.maximum.reduceat(end[order], bounds)
        out["clock"][gk, gs] = clock[order][bounds]
    return out


def first_available(points, n: int, resolve) -> tuple[np.ndarray, np.ndarray]:
    """(times, clocks) of ``points`` for n requests: per point, per request, the first of its
    ``sources`` (slot, edge) that ``resolve(slot, edge)`` gives a value for (NaN / -1 absent).
    ``resolve`` returns (values, clocks) arrays of length n, or None for a source not here."""
    import numpy as np

    t = np.full((n, len(points)), np.nan)
    c = np.full((n, len(points)), -1, dtype=np.int64)
    for j, point in enumerate(points):
        for slot, edge in point.sources:
            found = resolve(slot, edge)
            if found is None:
                continue
            values, clk = found
            fill = np.isnan(t[:, j]) & ~np.isnan(values)
            t[fill, j] = values[fill]
            c[fill, j] = clk[fill]
    return t, c


def _milestones(chain, rows, starts, ends, clock_mat, slot_names, client, base, client_clock,
                dynamo_ttft_ms):
    """(times, clocks) of the chain's milestones for the given requests (NaN / -1 absent)."""
    import numpy as np

    n = len(rows)
    slot_index = {s: i for i, s in enumerate(slot_names)}

    def resolve(slot, edge):
        if slot == lg.CLIENT:
            if client is None:
                return None
            values = (client.send_ns if edge == "send" else client.first_ns)[rows] - base
            return values, np.full(n, client_clock)
        if slot == lg.DYNAMO_FIRST:
            # Dynamo's frontend saw the first token ttft_ms after it got the request.
            if sc.DYNAMO_HTTP_REQUEST not in slot_index:
                return None
            i = slot_index[sc.DYNAMO_HTTP_REQUEST]
            values = starts.iloc[rows, i].to_numpy(dtype=float) + dynamo_ttft_ms[rows] * 1e6
            return values, clock_mat[rows, i]
        if slot in slot_index:
            frame = starts if edge == "start" else ends
            values = frame.iloc[rows, slot_index[slot]].to_numpy(dtype=float)
            return values, clock_mat[rows, slot_index[slot]]
        return None

    return first_available(chain, n, resolve)


def _path_constraints(chain, rows, t, c, clocks, labels) -> pd.DataFrame:
    """Consecutive milestones on two clocks bound their offset: the later one cannot
    happen before the earlier (client -> router -> engines -> router -> client)."""
    import numpy as np
    import pandas as pd

    # Optional milestones too: a staging copy that happened elsewhere than its place in the
    # chain still precedes what follows it on another host.
    req_j = range(len(chain))
    parts = []
    prev_t = np.full(len(rows), np.nan)
    prev_c = np.full(len(rows), -1, dtype=np.int64)
    for j in req_j:
        has = ~np.isnan(t[:, j])
        cross = has & (prev_c >= 0) & (c[:, j] != prev_c)
        if cross.any():
            parts.append(pd.DataFrame({
                "rule": "path-order", "key": labels[rows[cross]],
                "a": np.asarray(clocks, dtype=object)[prev_c[cross]],
                "b": np.asarray(clocks, dtype=object)[c[cross, j]],
                "lo_ns": prev_t[cross] - t[cross, j], "hi_ns": math.inf}))
        prev_t = np.where(has, t[:, j], prev_t)
        prev_c = np.where(has, c[:, j], prev_c)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=list(CONSTRAINT_COLUMNS))


def _hold_constraints(req, starts, ends, clock_mat, slot_names, clocks) -> pd.DataFrame:
    """The prefill side releases its blocks only after the decode side read them:
    kv.hold ends after kv.transfer ends (an upper bound the path does not give)."""
    import numpy as np
    import pandas as pd

    if sc.SPAN_KV_HOLD not in ends or sc.SPAN_KV_TRANSFER not in ends:
        return pd.DataFrame(columns=list(CONSTRAINT_COLUMNS))
    ih, ix = slot_names.index(sc.SPAN_KV_HOLD), slot_names.index(sc.SPAN_KV_TRANSFER)
    h, x = ends[sc.SPAN_KV_HOLD].to_numpy(), ends[sc.SPAN_KV_TRANSFER].to_numpy()
    ch, cx = clock_mat[:, ih], clock_mat[:, ix]
    ok = ~np.isnan(h) & ~np.isnan(x) & (ch >= 0) & (cx >= 0) & (ch != cx)
    names = np.asarray(clocks, dtype=object)
    return pd.DataFrame({"rule": "hold-outlasts-transfer", "key": req.index[ok],
                         "a": names[ch[ok]], "b": names[cx[ok]], "lo_ns": -math.inf,
                         "hi_ns": (h - x)[ok]})


def _parent_constraints(spans: pd.DataFrame, base: int, names: pd.Series) -> pd.DataFrame:
    """child start >= parent start, for a side's root span whose parent is on another clock.

    Only roots (vllm.prefill / vllm.decode / vllm.request) are checked: below them parent and
    child share a process, so the rule says nothing about skew and would cost a join of every
    span.
    """
    import pandas as pd

    empty = pd.DataFrame(columns=list(CONSTRAINT_COLUMNS))
    pick = (names.isin((sc.SPAN_PREFILL, sc.SPAN_DECODE, sc.SPAN_REQUEST))
            & (spans["parent_span_id"] != "")).to_numpy(dtype=bool)
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


def _first_rows(key, rows_mask):
    """Per request with a span among ``rows_mask``: (request codes, its first span's row)."""
    import numpy as np

    return first_rows(key, np.flatnonzero(np.asarray(rows_mask)))


def _first_value(spans, key, rows_mask, column: str, n_keys: int, numeric: bool = False,
                 rows=None):
    """Per request: ``column`` of its first span among ``rows_mask`` (NaN/None if none).

    ``rows``: ``_first_rows(key, rows_mask)`` when the caller already has it (it reads
    several columns of one mask; the sort is the cost)."""
    import numpy as np
    import pandas as pd

    out = np.full(n_keys, np.nan if numeric else None, dtype=float if numeric else object)
    if column not in spans:
        return out
    uniq, at = rows if rows is not None else _first_rows(key, rows_mask)
    if not len(at):
        return out
    values = spans[column].iloc[at]
    if numeric:
        out[uniq] = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    else:
        v = values.astype(object).to_numpy()
        out[uniq] = np.where(pd.isna(v), None, v)
    return out


def _engine_attributes(req, spans, key, side, names, n_keys) -> None:
    """Engines, pods, nodes, clocks, KV size/path/connector and trace id per request."""
    import pandas as pd

    # id(mask) -> (mask, its first rows): holding the mask keeps its id from being reused.
    picked: dict[int, tuple] = {}
    values: dict[tuple[int, str], pd.Series] = {}

    def first(mask, column):
        if id(mask) not in picked:
            picked[id(mask)] = (mask, _first_rows(key, mask))
        if (id(mask), column) not in values:
            values[(id(mask), column)] = pd.Series(
                _first_value(spans, key, mask, column, n_keys, rows=picked[id(mask)][1]),
                index=req.index)
        return values[(id(mask), column)].copy()

    def engine(mask):
        out = first(mask, "engine_id").fillna(first(mask, "pod"))
        host = first(mask, "service").astype(str) + "@" + first(mask, "host").astype(str)
        fallback = first(mask, "service").notna() & first(mask, "host").notna()
        return out.fillna(host.where(fallback))

    core = ~names.isin(sc.API_SPANS).to_numpy()
    p = (side == SIDE_PREFILL) & core
    d = (side == SIDE_DECODE) & core
    a = (side == SIDE_AGGREGATED) & core
    xfer = (names == sc.SPAN_KV_TRANSFER).to_numpy()
    ser = (names == sc.SPAN_KV_SERIALIZE).to_numpy()
    req["prefill_engine"] = engine(p)
    req["prefill_clock"] = first(p, "clock")
    req["prefill_pod"] = first(p, "pod")
    req["prefill_node"] = first(p, "node")
    req["decode_engine"] = engine(d)
    req["decode_clock"] = first(d, "clock")
    req["decode_pod"] = first(d, "pod")
    req["decode_node"] = first(d, "node")
    remote = first(xfer, "remote_engine_id").fillna(first(d, "remote_engine_id"))
    req["kv_bytes"] = pd.to_numeric(first(xfer, "kv_bytes").fillna(first(ser, "kv_bytes")),
                                    errors="coerce")
    req["kv_path"] = first(xfer, "kv_path")
    req["connector"] = first(xfer, "connector")
    req["prefill_engine"] = req["prefill_engine"].fillna(remote).fillna(engine(a))
    req["prefill_clock"] = req["prefill_clock"].fillna(first(a, "clock"))
    any_span = pd.Series(True, index=spans.index).to_numpy()
    req["trace_id"] = first(p, "trace_id").fillna(first(d, "trace_id")).fillna(
        first(any_span, "trace_id"))


def _transfer_status(req, spans, key, names, n_keys):
    """ok / failed: <reason> / lease expired: <reason> for requests with a KV transfer."""
    import numpy as np

    status = np.where(req[sc.SPAN_KV_TRANSFER].notna().to_numpy(), "ok", None).astype(object)
    failed = _first_value(spans, key, (names == sc.SPAN_KV_TRANSFER).to_numpy()
                          & spans["failure"].notna().to_numpy() if "failure" in spans
                          else np.zeros(len(spans), dtype=bool), "failure", n_keys)
    has = np.array([f is not None for f in failed])
    status[has] = "failed: " + failed[has].astype(str)
    lease = _first_value(spans, key, (names == sc.SPAN_KV_LEASE_EXPIRED).to_numpy(),
                         "failure", n_keys)
    expired = np.array([x is not None for x in lease])
    status[expired] = ("lease expired: the prefill engine released this KV before the decode "
                       "side read it")
    return status


def span_request_keys(spans: pd.DataFrame) -> pd.Series:
    """The request key of every span (aligned to ``spans``), as build_breakdown assigns it."""
    import pandas as pd

    names = spans["name"].astype(str)
    keys = assign_request_keys(spans, _sides(spans, names) == SIDE_DECODE)
    return pd.Series(keys.labels[keys.codes], index=spans.index)
