"""Capacity per concurrency level and engine: busy time, scheduler queue, KV blocks, load.

For each concurrency level (the time window its requests ran in) and each engine (prefill,
decode, aggregated) this answers the queueing questions a TTFT breakdown cannot: was the
engine busy, did its scheduler queue grow, how full was its KV cache, did the prefill side
keep blocks while the decode side had not pulled them yet (``kv.hold``) and stall for
blocks, and how the offered load compares with what the engine served while busy.

Two sources, best first:

- Engine step records (one per scheduler step: queue length, running requests, KV blocks,
  preemptions; ``kvprof.analysis.loaders.steps``) when the run recorded them.
- Otherwise the per-request spans: a request waits in the queue over ``vllm.*.queue``, runs
  from its scheduling to its end on that engine (the engine steps without pause while any
  request runs, so the union of running intervals is its busy time), and holds KV blocks
  from scheduling until it ends or, on the prefill side, until ``kv.hold`` ends. Queue
  length and KV use over time are the sweeps of those intervals. Preemptions are not in
  spans: ``preemptions`` is None without step records.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvprof import semconv as sc

log = logging.getLogger(__name__)

ROLES = (sc.ROLE_PREFILL, sc.ROLE_DECODE, sc.ROLE_AGGREGATED)
TOP_SPANS = {sc.SPAN_PREFILL: sc.ROLE_PREFILL, sc.SPAN_DECODE: sc.ROLE_DECODE,
             sc.SPAN_REQUEST: sc.ROLE_AGGREGATED}
# A time series in the JSON keeps at most this many points per engine and level.
MAX_SERIES_POINTS = 60
# Shares of a level's window above which a resource counts as having run out.
STALL_SHARE = 0.10
BUSY_SHARE = 0.90


@dataclass
class EngineRequests:
    """One row per (engine, request): the intervals capacity is computed from (ns)."""

    frame: pd.DataFrame  # engine, role, trace_id, queue_start/end, run_start/end, kv_start/end,
    #                      hold_start/end, blocks, prompt_tokens


def _adjusted(spans: pd.DataFrame, offsets_ns: dict[str, float] | None) -> pd.DataFrame:
    """start_ns / end_ns on the reference clock (the breakdown's skew offsets per clock)."""
    s = spans[["trace_id", "name", "start_ns", "end_ns", "role", "service", "clock",
               "kv_blocks", "prompt_tokens"]].copy()
    s["start_ns"] = pd.to_numeric(s["start_ns"], errors="coerce").astype(float)
    s["end_ns"] = pd.to_numeric(s["end_ns"], errors="coerce").astype(float)
    if offsets_ns:
        off = s["clock"].astype(str).map(offsets_ns).fillna(0.0).astype(float)
        s["start_ns"] += off
        s["end_ns"] += off
    s["trace_id"] = s["trace_id"].astype(str)
    return s


def engine_requests(spans: pd.DataFrame, offsets_ns: dict[str, float] | None = None,
                    block_size: int | None = None) -> EngineRequests:
    """Per engine and request: when it queued, ran, held KV blocks, and how many blocks."""
    s = _adjusted(spans, offsets_ns)
    tops = s[s["name"].isin(list(TOP_SPANS))]
    if tops.empty:
        return EngineRequests(pd.DataFrame())
    engines = tops.assign(role=tops["name"].map(TOP_SPANS))[["service", "trace_id", "role"]]
    engines = engines.drop_duplicates(["service", "trace_id"])
    mine = s.merge(engines[["service", "trace_id"]], on=["service", "trace_id"])
    first = mine.groupby(["service", "trace_id", "name"]).agg(
        start=("start_ns", "min"), end=("end_ns", "max"))
    wide = first.unstack("name")

    def col(edge: str, name: str) -> pd.Series:
        key = (edge, name)
        return wide[key] if key in wide.columns else pd.Series(np.nan, index=wide.index)

    # The request's end on this engine: the last span of the engine's process(es) in its trace
    # (Dynamo's handle_payload, vLLM's llm_request / API spans end with the response).
    last_end = mine.groupby(["service", "trace_id"])["end_ns"].max()
    out = engines.set_index(["service", "trace_id"]).reindex(wide.index)
    prefill_like = out["role"] != sc.ROLE_DECODE
    q_name = np.where(prefill_like, sc.SPAN_PREFILL_QUEUE, sc.SPAN_DECODE_QUEUE)
    out["queue_start"] = np.where(prefill_like, col("start", sc.SPAN_PREFILL_QUEUE),
                                  col("start", sc.SPAN_DECODE_QUEUE))
    out["queue_end"] = np.where(prefill_like, col("end", sc.SPAN_PREFILL_QUEUE),
                                col("end", sc.SPAN_DECODE_QUEUE))
    del q_name
    compute_start = col("start", sc.SPAN_PREFILL_COMPUTE)
    decode_sched = col("end", sc.SPAN_DECODE_QUEUE).fillna(col("start", sc.SPAN_DECODE_FIRST_TOKEN))
    out["run_start"] = np.where(prefill_like, compute_start, decode_sched)
    is_prefill = out["role"] == sc.ROLE_PREFILL
    # A prefill-only request runs one step (max_tokens 1); the others until their response.
    out["run_end"] = np.where(is_prefill, col("end", sc.SPAN_PREFILL_COMPUTE), last_end)
    # Blocks are allocated when the scheduler takes the request (prefill) or when it starts
    # the KV pull (decode), and freed when it ends or, after a prefill whose KV is pulled,
    # when the pull is done (kv.hold).
    kv_pull = col("start", sc.SPAN_KV_TRANSFER).fillna(col("start", sc.SPAN_DECODE_KV_WAIT))
    out["kv_start"] = np.where(prefill_like, compute_start, kv_pull.fillna(decode_sched))
    hold_end = col("end", sc.SPAN_KV_HOLD)
    out["kv_end"] = np.where(is_prefill, np.fmax(hold_end, out["run_end"]), last_end)
    out["hold_start"] = col("start", sc.SPAN_KV_HOLD)
    out["hold_end"] = hold_end
    # Blocks per request: the transfer's count (same on both sides) or prompt / block size.
    per_trace = s.groupby("trace_id").agg(blocks=("kv_blocks", "max"),
                                          prompt_tokens=("prompt_tokens", "max"))
    out = out.reset_index().merge(per_trace, on="trace_id", how="left")
    if block_size:
        guess = np.ceil(out["prompt_tokens"].astype(float) / block_size)
        out["blocks"] = out["blocks"].astype(float).fillna(guess)
    out = out.rename(columns={"service": "engine"})
    return EngineRequests(out)


# -- interval arithmetic ------------------------------------------------------------------------
def _clip(starts: np.ndarray, ends: np.ndarray, t0: float, t1: float):
    ok = ~(np.isnan(starts) | np.isnan(ends))
    a, b = np.clip(starts[ok], t0, t1), np.clip(ends[ok], t0, t1)
    keep = b > a
    return a[keep], b[keep], ok


def union_ns(starts: np.ndarray, ends: np.ndarray, t0: float, t1: float) -> float:
    """Length of the union of [start, end) intervals inside [t0, t1)."""
    a, b, _ = _clip(starts, ends, t0, t1)
    if not len(a):
        return 0.0
    order = np.argsort(a)
    a, b = a[order], b[order]
    total, cur_a, cur_b = 0.0, a[0], b[0]
    for x, y in zip(a[1:], b[1:], strict=True):
        if x > cur_b:
            total += cur_b - cur_a
            cur_a, cur_b = x, y
        else:
            cur_b = max(cur_b, y)
    return float(total + cur_b - cur_a)


def step_function(starts: np.ndarray, ends: np.ndarray, t0: float, t1: float,
                  weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(change times, value from each time on) of sum(weight) over intervals alive at t."""
    w = np.ones(len(starts)) if weights is None else np.asarray(weights, dtype=float)
    a, b, ok = _clip(starts, ends, t0, t1)
    w = w[ok][(np.clip(ends[ok], t0, t1) > np.clip(starts[ok], t0, t1))]
    w = np.nan_to_num(w)
    times = np.concatenate([[t0], a, b])
    deltas = np.concatenate([[0.0], w, -w])
    order = np.argsort(times, kind="stable")
    times, values = times[order], np.cumsum(deltas[order])
    # One value per distinct time: the last one (every change at that instant applied).
    last = np.r_[times[1:] != times[:-1], True]
    return times[last], values[last]


def time_mean(times: np.ndarray, values: np.ndarray, t1: float) -> float:
    if not len(times) or t1 <= times[0]:
        return 0.0
    widths = np.diff(np.r_[times, t1])
    return float((values * widths).sum() / (t1 - times[0]))


def share_where(times: np.ndarray, mask: np.ndarray, t1: float) -> float:
    if not len(times) or t1 <= times[0]:
        return 0.0
    widths = np.diff(np.r_[times, t1])
    return float(widths[mask].sum() / (t1 - times[0]))


def sample_on(times: np.ndarray, values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The step function's value at each grid time."""
    if not len(times):
        return np.zeros(len(grid))
    idx = np.searchsorted(times, grid, side="right") - 1
    return np.where(idx >= 0, values[np.clip(idx, 0, None)], 0.0)


# -- windows and step records -------------------------------------------------------------------
def level_windows(requests: pd.DataFrame, er: EngineRequests) -> list[tuple[str, float, float]]:
    """Per concurrency level: from its first request's first engine event to its last's end."""
    f = er.frame
    if f.empty:
        return []
    times = f.groupby("trace_id").agg(t0=("queue_start", "min"), t0b=("run_start", "min"),
                                      t1=("kv_end", "max"), t1b=("run_end", "max"))
    times["start"] = times[["t0", "t0b"]].min(axis=1)
    times["end"] = times[["t1", "t1b"]].max(axis=1)
    levels = pd.Series("all", index=times.index, dtype=object)
    if requests is not None and "concurrency" in requests and requests["concurrency"].notna().any():
        conc = requests.dropna(subset=["concurrency"]).drop_duplicates("trace_id")
        conc = conc.set_index(conc["trace_id"].astype(str))["concurrency"]
        levels = times.index.to_series().map(conc).map(
            lambda c: str(int(c)) if c == c and c is not None else None)
    times["level"] = levels
    out = []
    for level, grp in times.dropna(subset=["level"]).groupby("level", sort=False):
        t0, t1 = float(grp["start"].min()), float(grp["end"].max())
        if t1 > t0:
            out.append((str(level), t0, t1))

    def key(w):
        return (0, int(w[0])) if w[0].isdigit() else (1, 0)
    return sorted(out, key=key)


def engine_steps(steps: pd.DataFrame | None, engine: str, t0: float,
                 t1: float) -> pd.DataFrame | None:
    """The step records of one engine (its service name) starting inside a window, -1
    (unknown) as NaN; None when there are none."""
    if steps is None or not len(steps):
        return None
    mine = steps[(steps["service"].astype(str) == engine) & (steps["start_ns"] >= t0)
                 & (steps["start_ns"] < t1)]
    if not len(mine):
        return None
    mine = mine.copy()
    for c in ("waiting", "running", "preempted", "kv_blocks_free", "kv_blocks_total",
              "prefill_tokens", "decode_seqs", "num_reqs", "tokens"):
        if c in mine:
            v = pd.to_numeric(mine[c], errors="coerce").astype(float)
            mine[c] = v.where(v >= 0)
    return mine.sort_values("start_ns")


KV_TOKENS = re.compile(r"KV cache size:\s*([\d,]+)\s*tokens")
KV_OVERRIDE = re.compile(r"num_gpu_blocks_override=(\d+)")


def kv_blocks_from_logs(logs: list[Path], block_size: int | None) -> dict[str, int]:
    """Total KV blocks per role from engine logs ('prefill' / 'decode' / other in the file
    name): vLLM's "KV cache size: N tokens" line, or its block override."""
    out: dict[str, int] = {}
    for path in logs:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        blocks = None
        if m := KV_OVERRIDE.search(text):
            blocks = int(m.group(1))
        elif (m := KV_TOKENS.search(text)) and block_size:
            blocks = int(m.group(1).replace(",", "")) // block_size
        if blocks:
            name = Path(path).name
            role = (sc.ROLE_PREFILL if "prefill" in name else sc.ROLE_DECODE if "decode" in name
                    else sc.ROLE_AGGREGATED)
            out[role] = blocks
    return out


# An engine with requests steps back to back; a longer pause means it had none left.
STEP_GAP_NS = 50e6


def _held(steps: pd.DataFrame, values: np.ndarray, t0: float):
    """(times, values) of a per-step count that holds until the next step, or drops to 0
    at a step's end when the engine then paused (it had no requests: nothing ran or waited)."""
    st = steps["start_ns"].to_numpy(float)
    en = steps["end_ns"].to_numpy(float)
    nxt = np.r_[st[1:], np.inf]
    paused = nxt - en > STEP_GAP_NS
    times = np.r_[t0, np.ravel(np.column_stack([st, en]))]
    vals = np.r_[0.0, np.ravel(np.column_stack([values, np.where(paused, 0.0, values)]))]
    order = np.argsort(times, kind="stable")
    return times[order], vals[order]


# -- the table ----------------------------------------------------------------------------------
def _r(x: float | None, nd: int = 3) -> float | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return round(float(x), nd)


def _engine_level(rows: pd.DataFrame, t0: float, t1: float, kv_total: int | None,
                  slot_limit: int, output_tokens: float | None,
                  steps: pd.DataFrame | None) -> dict[str, Any]:
    """One engine in one level's window."""
    span = t1 - t0
    role = str(rows["role"].iloc[0])
    arr = {c: rows[c].to_numpy(dtype=float) for c in
           ("queue_start", "queue_end", "run_start", "run_end", "kv_start", "kv_end",
            "hold_start", "hold_end", "blocks", "prompt_tokens")}
    qt, qv = step_function(arr["queue_start"], arr["queue_end"], t0, t1)
    rt, rv = step_function(arr["run_start"], arr["run_end"], t0, t1)
    kt, kv = step_function(arr["kv_start"], arr["kv_end"], t0, t1, arr["blocks"])
    busy_ns = union_ns(arr["run_start"], arr["run_end"], t0, t1)
    source = "spans"
    preemptions = None
    mean_queue = time_mean(qt, qv, t1)
    max_queue = float(qv.max()) if len(qv) else 0.0
    mine = engine_steps(steps, str(rows["engine"].iloc[0]), t0, t1)
    step_stats: dict[str, Any] = {}
    if mine is not None:
        source = "step records"
        st = mine["start_ns"].to_numpy(float)
        # Busy: steps that scheduled something (an idle engine polling its KV loads is not).
        worked = mine[(mine["tokens"].fillna(1) > 0)]
        busy_ns = union_ns(worked["start_ns"].to_numpy(float),
                           worked["end_ns"].to_numpy(float), t0, t1)
        preemptions = int(mine["preempted"].fillna(0).sum())
        if mine["waiting"].notna().any():
            w = mine["waiting"].fillna(0).to_numpy(float)
            qt, qv = _held(mine, w, t0)
            mean_queue, max_queue = time_mean(qt, qv, t1), float(w.max())
        if mine["kv_blocks_total"].notna().any():
            kv_total = int(mine["kv_blocks_total"].max())
            used = (mine["kv_blocks_total"] - mine["kv_blocks_free"]).to_numpy(float)
            if np.isfinite(used).any():
                kt, kv = np.r_[t0, st], np.r_[0.0, np.nan_to_num(used)]
        if mine["running"].notna().any():
            rt, rv = _held(mine, mine["running"].fillna(0).to_numpy(float), t0)
        step_stats = {"steps": int(len(worked))}
        pre = worked[worked["prefill_tokens"].fillna(0) > 0]
        if len(pre):
            pre_s = float(pre["duration_ms"].sum()) / 1e3
            step_stats["prefill_tokens_per_s_in_steps"] = _r(
                float(pre["prefill_tokens"].sum()) / pre_s, 1) if pre_s else None
        dec = worked[worked["decode_seqs"].fillna(0) > 0]
        if len(dec):
            by_batch = {}
            for batch, grp in dec.groupby(dec["decode_seqs"].astype(int)):
                secs = float(grp["duration_ms"].sum()) / 1e3
                by_batch[str(batch)] = {"steps": int(len(grp)),
                                        "steps_per_s": _r(len(grp) / secs, 1) if secs else None}
            step_stats["decode_steps_by_batch"] = by_batch
    kv_mean = time_mean(kt, kv, t1)
    kv_peak = float(kv.max()) if len(kv) else 0.0
    # Queue length over time, on a fixed grid (seconds from the window's start).
    grid = np.linspace(t0, t1, MAX_SERIES_POINTS, endpoint=False)
    series = [[_r((g - t0) / 1e9, 3), int(v)] for g, v in zip(grid, sample_on(qt, qv, grid),
                                                              strict=True)]
    # Stalls: requests queued while every sequence slot was taken, or while the free KV blocks
    # could not take the next request.
    grid_all = np.union1d(np.union1d(qt, rt), kt)
    q_on = sample_on(qt, qv, grid_all) > 0
    r_on = sample_on(rt, rv, grid_all)
    k_on = sample_on(kt, kv, grid_all)
    need = float(np.nanmedian(arr["blocks"])) if np.isfinite(arr["blocks"]).any() else None
    slots_full = share_where(grid_all, q_on & (r_on >= slot_limit), t1) if slot_limit else 0.0
    kv_full = (share_where(grid_all, q_on & (kv_total - k_on < need), t1)
               if kv_total and need else None)
    arrived = rows[(np.fmin(arr["queue_start"], arr["run_start"]) >= t0)
                   & (np.fmin(arr["queue_start"], arr["run_start"]) < t1)]
    ran = rows[(arr["run_end"] > t0) & (arr["run_end"] <= t1)]
    busy_s = busy_ns / 1e9
    out: dict[str, Any] = {
        "engine": str(rows["engine"].iloc[0]), "role": role, "source": source,
        "requests": int(len(ran)),
        "busy_fraction": _r(busy_ns / span),
        "mean_queue_length": _r(mean_queue),
        "max_queue_length": int(max_queue),
        "mean_running": _r(time_mean(rt, rv, t1)),
        "max_running": int(rv.max()) if len(rv) else 0,
        "kv_blocks_total": kv_total,
        "kv_blocks_mean": _r(kv_mean, 1),
        "kv_blocks_peak": int(kv_peak),
        "kv_occupancy": _r(kv_mean / kv_total) if kv_total else None,
        "kv_occupancy_peak": _r(kv_peak / kv_total) if kv_total else None,
        "preemptions": preemptions,
        "queued_at_slot_limit_fraction": _r(slots_full),
        "queued_kv_full_fraction": _r(kv_full),
    }
    if role == sc.ROLE_PREFILL:
        ht, hv = step_function(arr["hold_start"], arr["hold_end"], t0, t1, arr["blocks"])
        hold_ms = (arr["hold_end"] - arr["hold_start"]) / 1e6
        out["kv_hold_blocks_mean"] = _r(time_mean(ht, hv, t1), 1)
        out["kv_hold_blocks_peak"] = int(hv.max()) if len(hv) else 0
        out["kv_hold_ms_mean"] = _r(float(np.nanmean(hold_ms)) if np.isfinite(hold_ms).any()
                                    else None, 1)
    # Offered load (arrivals in the window) against what the engine served while busy.
    window_s = span / 1e9
    prompt_in = float(np.nansum(arrived["prompt_tokens"].to_numpy(float)))
    prompt_done = float(np.nansum(ran["prompt_tokens"].to_numpy(float)))
    out["offered_requests_per_s"] = _r(len(arrived) / window_s)
    if role in (sc.ROLE_PREFILL, sc.ROLE_AGGREGATED):
        cap = prompt_done / busy_s if busy_s > 0 else None
        out["offered_prefill_tokens_per_s"] = _r(prompt_in / window_s, 1)
        out["capacity_prefill_tokens_per_s"] = _r(cap, 1)
        out["prefill_utilisation"] = _r(prompt_in / window_s / cap) if cap else None
    if role in (sc.ROLE_DECODE, sc.ROLE_AGGREGATED) and output_tokens:
        # Each request decodes output_tokens - 1 steps after its first token; a step serves
        # every running request at once, so steps/s = tokens/s / mean batch while busy.
        mean_batch = time_mean(rt, rv, t1) * span / busy_ns if busy_ns else None
        tokens_done = len(ran) * max(output_tokens - 1, 0)
        steps_per_s = (tokens_done / busy_s / mean_batch) if busy_s and mean_batch else None
        if mine is not None and mine["decode_seqs"].notna().any():
            dec = mine[mine["decode_seqs"] > 0]
            secs = float(dec["duration_ms"].sum()) / 1e3
            if len(dec) and secs:
                # The engine's own steps: how many it ran per second of stepping, at the batch
                # sizes it ran.
                steps_per_s = len(dec) / secs
                mean_batch = float(dec["decode_seqs"].mean())
        out["mean_decode_batch"] = _r(mean_batch, 2)
        out["capacity_decode_steps_per_s"] = _r(steps_per_s, 1)
        offered_tokens = len(arrived) * max(output_tokens - 1, 0) / window_s
        out["offered_decode_tokens_per_s"] = _r(offered_tokens, 1)
        served = (steps_per_s * mean_batch) if steps_per_s and mean_batch else None
        out["decode_utilisation"] = _r(offered_tokens / served) if served else None
    out.update(step_stats)
    out["queue_series"] = series
    return out


def capacity_table(spans: pd.DataFrame, requests: pd.DataFrame | None,
                   offsets_ns: dict[str, float] | None = None,
                   kv_blocks_total: dict[str, int] | None = None,
                   output_tokens: float | None = None,
                   block_size: int | None = None,
                   steps: pd.DataFrame | None = None) -> dict[str, Any]:
    """The report's ``capacity`` section: per level, per engine, and the verdict.

    ``steps``: engine step records (kvprof.analysis.loaders.steps.load_steps), or None."""
    er = engine_requests(spans, offsets_ns, block_size)
    if er.frame.empty:
        return {"source": None, "levels": [], "verdict": None,
                "notes": ["no engine spans (prefill, decode or aggregated requests as the "
                          "engines saw them): no capacity figures"]}
    kv_blocks_total = kv_blocks_total or {}
    # The sequence-slot limit as seen: the most requests an engine ever ran at once.
    slot_limit = {}
    for engine, rows in er.frame.groupby("engine"):
        t, v = step_function(rows["run_start"].to_numpy(float), rows["run_end"].to_numpy(float),
                             -np.inf, np.inf)
        slot_limit[engine] = int(v.max()) if len(v) else 0
        if steps is not None and len(steps):
            running = pd.to_numeric(steps.loc[steps["service"].astype(str) == engine,
                                              "running"], errors="coerce")
            if running.notna().any() and running.max() > 0:
                slot_limit[engine] = int(running.max())
    levels = []
    for level, t0, t1 in level_windows(requests, er):
        in_window = er.frame[(np.fmin(er.frame["queue_start"], er.frame["run_start"]) < t1)
                             & (er.frame["kv_end"].fillna(er.frame["run_end"]) > t0)]
        engines = []
        for engine, rows in in_window.groupby("engine", sort=True):
            role = str(rows["role"].iloc[0])
            engines.append(_engine_level(rows, t0, t1, kv_blocks_total.get(role),
                                         slot_limit.get(engine, 0), output_tokens, steps))
        levels.append({"concurrency": level, "window_s": _r((t1 - t0) / 1e9),
                       "engines": engines})
    sources = sorted({e["source"] for lv in levels for e in lv["engines"]})
    notes = []
    if "step records" not in sources:
        notes.append("capacity from request spans (no engine step records): busy = some "
                     "request running; preemptions not known")
    if not kv_blocks_total and not any(e["kv_blocks_total"] for lv in levels
                                       for e in lv["engines"]):
        notes.append("the engines' KV cache size is not known (no engine log with vLLM's "
                     "\"KV cache size\" line): KV use in blocks only, no occupancy")
    return {"source": ", ".join(sources), "slot_limit_seen": slot_limit, "levels": levels,
            "verdict": capacity_verdict(levels), "notes": notes}


def _resource(e: dict[str, Any]) -> str:
    """Which resource an engine with a queue ran out of, in words."""
    kv_full = e.get("queued_kv_full_fraction") or 0.0
    slots = e.get("queued_at_slot_limit_fraction") or 0.0
    if kv_full >= STALL_SHARE and kv_full >= slots:
        text = (f"KV blocks ran out: for {100 * kv_full:.0f}% of the window requests waited "
                f"while the free blocks could not take one more (peak occupancy "
                f"{100 * (e.get('kv_occupancy_peak') or 0):.0f}%)")
        if e["role"] == sc.ROLE_PREFILL and e.get("kv_hold_blocks_mean"):
            text += (f"; {e['kv_hold_blocks_mean']:.0f} blocks on average were finished "
                     "prefills held until the decode side pulled them: the prefill engine "
                     "stalled for blocks")
        return text + "."
    if slots >= STALL_SHARE:
        return (f"Sequence slots ran out: for {100 * slots:.0f}% of the window requests "
                f"waited while {e['max_running']} ran (the engine's running limit).")
    if (e.get("busy_fraction") or 0) >= BUSY_SHARE:
        return "Compute ran out: the engine was busy nearly all the time."
    return "No single resource was exhausted for long; the queue came in bursts."


def capacity_verdict(levels: list[dict[str, Any]]) -> str | None:
    """Which queues grew from the lowest to the highest level, and which resource ran out."""
    numeric = [lv for lv in levels if str(lv["concurrency"]).isdigit()] or levels
    if not numeric:
        return None
    low, top = numeric[0], numeric[-1]
    base = {e["engine"]: e for e in low["engines"]}
    grown = sorted(top["engines"], key=lambda e: -(e["mean_queue_length"] or 0))
    if not grown:
        return None
    if (grown[0]["mean_queue_length"] or 0) < 0.05:
        return (f"At concurrency {top['concurrency']} no scheduler queue formed (largest mean "
                f"queue {grown[0]['mean_queue_length']:.2f} on {grown[0]['engine']}): the "
                "engines kept up.")
    what = []
    for n, e in enumerate(grown):
        if n and (e["mean_queue_length"] or 0) < 0.5:
            break  # the others' queues stayed short
        before = base.get(e["engine"], {}).get("mean_queue_length") or 0.0
        what.append(f"At concurrency {top['concurrency']} the {e['role']} engine's scheduler "
                    f"queue ({e['engine']}) grew to {e['mean_queue_length']:.1f} requests on "
                    f"average (max {e['max_queue_length']}; {before:.2f} at concurrency "
                    f"{low['concurrency']}); busy {100 * (e['busy_fraction'] or 0):.0f}% of "
                    f"the time. {_resource(e)}")
    return " ".join(what)
