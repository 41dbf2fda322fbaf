"""Calibrate the what-if model from a run's own traces: step costs, transfer, overheads, load.

Reads the DataFrames the report reads: the breakdown's request table (legs per request), the
aiperf records (concurrency, ISL/OSL, warm-up) and, when the run has them, engine step records
(``kvprof.analysis.loaders.steps``). What each input gives:

* step records: each engine step's duration against its prefill tokens and decode sequences, a
  ``StepCost`` per role (prefill / decode / aggregated) through the median step of each batch
  composition, one per calibration level (a simulated level uses the nearest; a role with
  too few steps at a level uses the law pooled over the levels); each engine's first step at
  a new shape (its kernel build) left out; the measured/modelled ratio of every other step
  kept per role;
* without step records: prefill time against input tokens from the prefill-compute leg, and a
  decode step from the decode first-token leg per level against the level's batch per worker;
* the transfer: its wire part (the transfer split's wire_ms where present, else the bytes at the
  rate a microbench gives, else at the run's own achieved rate) apart from its fixed part;
  the NIXL handshake from first-contact requests;
* everything else (frontend, API servers, responses, the client): per-request overhead samples
  cut at the legs the simulator models (queues, compute, transfer).

``Calibration.thin`` says where the fit stands on few samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvprof.analysis.whatif.simulate import (
    AGGREGATED,
    DECODE,
    PREFILL,
    Deployment,
    Link,
    Load,
    Overheads,
    StepCost,
    WorkerGroup,
)
from kvprof.errors import BadInputError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

LEG = "leg:"
# Legs the simulator produces itself (queues, compute, transfer); every other leg is overhead.
# kv.transfer.end is handled apart: the notice (split) or the whole transfer (no split).
SIMULATED = {"prefill.scheduled", "prefill.first_token", "engine.scheduled",
             "engine.first_token", "kv.handshake.end", "kv.ready", "decode.scheduled",
             "decode.first_token"}
# These legs end at a step boundary (the core finishes its current step first): IPC plus a
# wait for a busy engine, which the simulator makes itself. At the lowest calibration level
# (engines mostly idle) the leg is all overhead; above it, at most that level's mean.
STEP_BOUNDARY = {"prefill.core.arrive", "engine.core.arrive", "decode.core.arrive",
                 "kv.load.start"}
PREFILL_END = {"prefill.first_token"}
TRANSFER = {"kv.handshake.end", "kv.posted", "kv.wire.end", "kv.transfer.end"}
WIRE_LEG = "kv.wire.end"  # helper 19a's transfer split: NIXL accepted -> NIXL saw it done
FIRST_TOKEN = {"decode.first_token", "engine.first_token"}
MIN_SAMPLES = 5  # fewer per batch size / token bucket: the calibration says it is thin there


@dataclass
class Calibration:
    """Everything the simulator needs from one run, and how well it was measured."""

    kind: str  # "disaggregated" | "aggregated"
    costs: dict[str, StepCost]
    workers: dict[str, int]
    overheads: Overheads
    kv_bytes_per_token: float
    link_gbytes_per_s: float | None
    link_source: str
    handshake_ms: float
    step_source: str
    calibrated_on: list[int]
    max_batch: int = 256
    token_budget: int = 8192
    kv_blocks: dict[str, int] = field(default_factory=dict)  # per role; absent = unbounded
    costs_by_level: dict[int, dict[str, StepCost]] = field(default_factory=dict)
    step_ratios: tuple[float, ...] = ()
    step_ratios_by_role: tuple = ()
    block_tokens: int = 16
    thin: list[str] = field(default_factory=list)
    samples: dict[str, int] = field(default_factory=dict)

    def deployment(self, workers: dict[str, int] | None = None, tp: dict[str, int] | None = None,
                   link: Link | None = None, router: str = "round_robin") -> Deployment:
        """The measured deployment, or the same engines in other counts / on another link."""
        counts = {**self.workers, **(workers or {})}
        groups = tuple(WorkerGroup(role, counts.get(role, 0), cost, (tp or {}).get(role, 1),
                                   self.max_batch, self.token_budget,
                                   self.kv_blocks.get(role), self.block_tokens)
                       for role, cost in self.costs.items() if role in counts)
        # Each level runs with the cost law of the calibration level nearest to it: engines
        # that share cores with the frontend and the client run the same batch slower or
        # faster as the load (and whatever else runs on the machine) changes.
        by_level = tuple((lv, {r: c for r, c in costs.items() if r in counts})
                         for lv, costs in sorted(self.costs_by_level.items()))
        return Deployment(groups, link or Link(self.link_gbytes_per_s, self.handshake_ms),
                          self.overheads, self.kv_bytes_per_token, router,
                          costs_by_level=by_level, step_ratios=self.step_ratios,
                          step_ratios_by_role=self.step_ratios_by_role)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "calibrated_on": self.calibrated_on,
            "step_source": self.step_source, "workers": self.workers,
            "step_cost_ms": {r: _cost_dict(c) for r, c in self.costs.items()},
            "step_cost_ms_by_level": {str(lv): {r: _cost_dict(c) for r, c in costs.items()}
                                      for lv, costs in self.costs_by_level.items()},
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "link_gbytes_per_s": self.link_gbytes_per_s, "link_source": self.link_source,
            "handshake_ms": self.handshake_ms,
            "max_batch": self.max_batch, "token_budget": self.token_budget,
            "kv_blocks": self.kv_blocks, "block_tokens": self.block_tokens,
            "overhead_mean_ms": dict(zip(("in", "mid", "kv_fixed", "out"),
                                         _mean_tuple(self.overheads.samples), strict=True)),
            "samples": self.samples, "thin": self.thin,
        }


def _cost_dict(c: StepCost) -> dict[str, float]:
    return {"base": c.base_ms, "per_prefill_token": c.per_prefill_token_ms,
            "per_decode_seq": c.per_decode_seq_ms}


def _mean_tuple(samples) -> list[float]:
    if not samples:
        return [0.0] * 4
    return [float(sum(s[i] for s in samples) / len(samples)) for i in range(4)]


def _fit(x_cols: list[list[float]], y: list[float],
         weights: list[float] | None = None) -> list[float]:
    """Weighted least squares, coefficients kept non-negative (negative ones dropped)."""
    import numpy as np

    yv = np.asarray(y, float)
    sw = np.sqrt(np.asarray(weights, float)) if weights is not None else np.ones(len(yv))
    cols = list(range(len(x_cols)))
    while True:
        a = np.column_stack([np.ones(len(yv))] + [x_cols[i] for i in cols])
        coef, *_ = np.linalg.lstsq(a * sw[:, None], yv * sw, rcond=None)
        neg = [i for i, c in zip(cols, coef[1:], strict=True) if c < 0]
        if not neg:
            break
        cols = [i for i in cols if i not in neg]
    out = [0.0] * (len(x_cols) + 1)
    out[0] = max(float(coef[0]), 0.0)
    for i, c in zip(cols, coef[1:], strict=True):
        out[i + 1] = float(c)
    return out


def _typical(values) -> float:
    """A composition's typical step time: the median. A step that lost its core or built a
    kernel does not set the law; the slow tail comes back through the step ratios."""
    import numpy as np

    return float(np.median(np.asarray(values, float)))


def first_of_shape(steps: pd.DataFrame) -> pd.Series:
    """True for each engine's first step at a number of scheduled tokens (the whole run,
    warm-up included): the CPU backend builds its kernels for a new shape on that step."""
    key = ["engine", "tokens"] if "tokens" in steps else ["engine", "prefill_tokens",
                                                          "decode_seqs"]
    return ~steps.sort_values("start_ns").duplicated(key).reindex(steps.index)


def load_levels(aiperf: pd.DataFrame) -> dict[int, Load]:
    """One Load per aiperf concurrency level: its measured requests, warm-up and lengths."""
    if aiperf is None or not len(aiperf) or aiperf["concurrency"].isna().all():
        raise BadInputError("no aiperf records with a concurrency level",
                            hint="Pass --aiperf with aiperf's profile_export.jsonl per level "
                            "(folders named c1, c4, ... or concurrency_1, ...).")
    out = {}
    for c, grp in aiperf.dropna(subset=["concurrency"]).groupby("concurrency"):
        prof = grp[grp["benchmark_phase"] != "warmup"]
        isl = tuple(int(v) for v in prof["isl"].fillna(prof["isl"].median()).fillna(1))
        osl = tuple(max(int(v), 1) for v in prof["osl"].fillna(prof["osl"].median()).fillna(1))
        if len(prof):
            out[int(c)] = Load(int(c), len(prof), isl, osl, warmup=int(len(grp) - len(prof)))
    return out


def _stage_at(leg: str, stage: int) -> int:
    """Where a chain's walk stands once it reaches ``leg``: 0 before the engine, 1 after
    prefill, 2 in the transfer, 3 after the first token (``stage``: where it stood)."""
    if leg in PREFILL_END:
        return 1
    if leg in TRANSFER:
        return 2
    if leg in FIRST_TOKEN:
        return 3
    return stage


def _chain_legs(req: pd.DataFrame, chain: str) -> list[str]:
    """The leg columns of one chain, in that chain's path order."""
    from kvprof.analysis import legs as lg

    ms = lg.CHAINS.get(chain, next(iter(lg.CHAINS.values())))
    return [LEG + m.id for m in ms[1:] if LEG + m.id in req]


def _overhead_samples(req: pd.DataFrame, wire: pd.Series | None) -> list[tuple[float, ...]]:
    """Per request (in, mid, kv_fixed, out): its legs cut where the simulated ones sit.

    With the transfer split (legs kv.posted, kv.wire.end, then kv.transfer.end = the notice)
    post + notice + the wire's excess over its modelled time are the fixed part; without it
    the fixed part is the measured transfer minus the modelled wire time of its bytes."""
    rows = []
    has_split = LEG + WIRE_LEG in req
    lowest = req["concurrency"].min()
    low = req[req["concurrency"] == lowest]
    cap = {n: float(low[LEG + n].mean()) for n in STEP_BOUNDARY
           if LEG + n in low and low[LEG + n].notna().any()}
    for idx, row in req.iterrows():
        at_lowest = row["concurrency"] == lowest
        legs = _chain_legs(req, str(row["chain"]))
        part = [0.0, 0.0, 0.0, 0.0]
        stage = 0  # 0 before the engine, 1 after prefill, 2 in the transfer, 3 after token
        split = has_split and row[LEG + WIRE_LEG] == row[LEG + WIRE_LEG]
        for col in legs:
            name = col.removeprefix(LEG)
            v = row[col]
            stage = _stage_at(name, stage)
            if v != v or name in SIMULATED:
                continue
            if name == WIRE_LEG:
                # Beyond what the bytes take at the link's rate (a stalled NIXL progress
                # thread, a retry): kept as measured, whatever the link of the what-if.
                w = float(wire.get(idx, 0.0) or 0.0) if wire is not None else 0.0
                part[2] += max(float(v) - w, 0.0)
                continue
            if name in STEP_BOUNDARY and not at_lowest:
                v = min(float(v), cap.get(name, 0.0))
            if name == "kv.transfer.end":
                w = 0.0 if split or wire is None else float(wire.get(idx, 0.0) or 0.0)
                part[2] += max(float(v) - w, 0.0)
                continue
            part[stage] += float(v)
        un = req.at[idx, "unaccounted_ms"] if "unaccounted_ms" in req else 0.0
        part[3] += float(un) if un == un else 0.0
        rows.append(tuple(part))
    return rows


# The model's legs as the measured breakdown has them (compare.LEGS, the KV link's three
# simulated parts shown as one "kv.transfer"): queue, compute and transfer legs by name,
# every other leg by where it sits in its chain (before prefill: "in", ... after: "out").
QUEUE_LEGS = {"prefill.scheduled": "prefill.queue", "engine.scheduled": "aggregated.queue",
              "kv.ready": "decode.queue", "decode.scheduled": "decode.queue",
              "prefill.first_token": "prefill.compute", "engine.first_token":
              "aggregated.compute", "decode.first_token": "decode.compute",
              "kv.handshake.end": "kv.handshake"}
STAGE_LEG = ("in", "mid", "kv.transfer", "out")


def measured_legs(req: pd.DataFrame, concurrency: int) -> dict[str, float]:
    """Mean ms per model leg of the measured requests at one level (the breakdown's legs,
    grouped as the simulator's), for the per-leg comparison with a prediction."""
    done = req[~req["warmup"].astype(bool) & req["ttft_ms"].notna()
               & (req["concurrency"] == concurrency)]
    sums: dict[str, float] = {}
    for _, row in done.iterrows():
        stage = 0
        for col in _chain_legs(req, str(row["chain"])):
            name = col.removeprefix(LEG)
            stage = _stage_at(name, stage)
            v = row[col]
            if v == v:
                key = QUEUE_LEGS.get(name, STAGE_LEG[stage])
                sums[key] = sums.get(key, 0.0) + float(v)
        un = row.get("unaccounted_ms", 0.0)
        sums["out"] = sums.get("out", 0.0) + (float(un) if un == un else 0.0)
    return {k: v / len(done) for k, v in sums.items()} if len(done) else {}


def _step_ratios(steps, aiperf, levels, kind, costs, by_level) -> tuple:
    """Each calibration step's measured time over the cost the model gives it, clipped to
    [0.1, 5]: a step over 5x its cost is a stall (a compile on a new batch shape, a core lost
    for seconds) that the model keeps, but not at full length, each time it draws it."""
    import numpy as np

    roles: dict[str, list[float]] = {}
    for lv in levels:
        own = _steps_in_levels(steps, aiperf, [lv], fallback=False)
        own = own[(own["prefill_tokens"] > 0) | (own["decode_seqs"] > 0)]
        role_col = own["role"].astype(str).str.lower()
        for role, cost in by_level.get(lv, costs).items():
            grp = own[role_col.str.contains(role[:4])] if kind == "disaggregated" else own
            pred = (cost.base_ms + cost.per_prefill_token_ms * grp["prefill_tokens"]
                    + cost.per_decode_seq_ms * grp["decode_seqs"]).to_numpy(float)
            ms = grp["duration_ms"].to_numpy(float)
            ok = pred > 0
            r = [float(x) for x in np.clip(ms[ok] / pred[ok], 0.1, 5.0)]
            roles.setdefault(role, []).extend(r)
    return tuple((role, tuple(v)) for role, v in roles.items())


def _enough(steps: pd.DataFrame, role: str, kind: str) -> bool:
    """A level's steps can stand alone: MIN_SAMPLES steps of the role, one with prefill
    where the role prefills."""
    grp = steps[steps["role"].astype(str).str.lower().str.contains(role[:4])] \
        if kind == "disaggregated" else steps
    busy = grp[(grp["prefill_tokens"] > 0) | (grp["decode_seqs"] > 0)]
    return len(busy) >= MIN_SAMPLES and (role == DECODE or (busy["prefill_tokens"] > 0).any())


def _steps_in_levels(steps: pd.DataFrame, aiperf: pd.DataFrame, levels: list[int],
                     fallback: bool = True):
    """The steps that started while one of ``levels`` ran (aiperf's first profiling send to
    its last answer; one clock assumed, as on one machine or with synchronised hosts)."""
    import numpy as np

    ap = aiperf.dropna(subset=["concurrency"])
    # Profiling records only: aiperf's warm-up meets cold engines (compiles, first contact).
    ap = ap[ap["benchmark_phase"] != "warmup"]
    keep = np.zeros(len(steps), bool)
    start = steps["start_ns"].to_numpy()
    for lv in levels:
        grp = ap[ap["concurrency"].astype(int) == lv]
        end = grp["request_end_ns"].dropna() if "request_end_ns" in grp else grp["request_start_ns"]
        if len(grp) and len(end):
            keep |= (start >= int(grp["request_start_ns"].min())) & (start <= int(end.max()))
    return steps[keep] if keep.any() or not fallback else steps


def _engine_limits(steps: pd.DataFrame) -> dict[str, int]:
    """The engines' configured limits as the run shows them: the most sequences running and
    the most tokens scheduled in any step of the whole run (a configuration, read from the
    saturated levels too; not an outcome the model predicts)."""
    out = {}
    for col, key in (("running", "max_batch"), ("num_reqs", "max_batch"),
                     ("tokens", "token_budget")):
        if col in steps and key not in out:
            v = int(steps[col].max()) if len(steps) else 0
            if v > 0:
                out[key] = v
    return out


def _kv_blocks(steps: pd.DataFrame, kind: str) -> dict[str, int]:
    """Each role's KV cache size in blocks, as its steps report it."""
    if "kv_blocks_total" not in steps:
        return {}
    role_col = steps["role"].astype(str).str.lower()
    roles = (PREFILL, DECODE) if kind == "disaggregated" else (AGGREGATED,)
    out = {}
    for role in roles:
        grp = steps[role_col.str.contains(role[:4])] if kind == "disaggregated" else steps
        total = int(grp["kv_blocks_total"].max()) if len(grp) else -1
        if total > 0:
            out[role] = total
    return out


def block_tokens_from_spans(spans: pd.DataFrame, aiperf: pd.DataFrame | None) -> int | None:
    """Tokens per KV block: the prompt length over the blocks a KV transfer moved."""
    import numpy as np

    if spans is None or "kv_blocks" not in spans or aiperf is None or not len(aiperf):
        return None
    blocks = spans["kv_blocks"].dropna()
    blocks = blocks[blocks > 0]
    isl = aiperf["isl"].dropna()
    if not len(blocks) or not len(isl):
        return None
    raw = float(isl.median()) / float(blocks.median())
    return int(2 ** round(np.log2(raw))) if raw >= 1 else None


def _step_costs(steps: pd.DataFrame, kind: str, thin: list[str]) -> tuple[dict, dict]:
    """StepCost per role from engine step records, fitted in two parts: decode-only steps
    give base + per-sequence (a line through each batch size's median, weighted by its
    count); steps with prefill give the per-token cost of what they took beyond that."""
    steps = steps.copy()
    steps["ms"] = steps["duration_ms"] if "duration_ms" in steps else \
        (steps["end_ns"] - steps["start_ns"]) / 1e6
    steps = steps[(steps["ms"] > 0) & ((steps["prefill_tokens"] > 0) | (steps["decode_seqs"] > 0))]
    role_col = steps["role"].astype(str).str.lower()
    costs, counts = {}, {}
    roles = (PREFILL, DECODE) if kind == "disaggregated" else (AGGREGATED,)
    for role in roles:
        grp = steps[role_col.str.contains(role[:4])] if kind == "disaggregated" else steps
        counts[role] = int(len(grp))
        if not len(grp):
            raise BadInputError(f"no {role} engine steps in the step records",
                                hint="Record the run with kvprof's engine probe on every worker.")
        dec = grp[grp["prefill_tokens"] == 0]
        by_batch = dec.groupby("decode_seqs")["ms"]
        sizes = [float(b) for b in by_batch.groups]
        means = [_typical(v) for _, v in by_batch]
        n = [len(v) for _, v in by_batch]
        if len(sizes) >= 2:
            base, per_seq = _fit([sizes], means, n)
        elif sizes:
            # One batch size: no slope to see; the whole step is base (thin, said so).
            base, per_seq = means[0], 0.0
        else:
            base, per_seq = 0.0, 0.0
        pre = grp[grp["prefill_tokens"] > 0]
        per_tok = 0.0
        only = pre[pre["decode_seqs"] == 0].groupby("prefill_tokens")["ms"]
        if not sizes and only.ngroups >= 2:
            # Prefill-only engine: base and per-token from the prompt sizes it saw.
            base, per_tok = _fit([[float(t) for t in only.groups]],
                                 [_typical(v) for _, v in only], [len(v) for _, v in only])
        elif len(pre):
            extra = pre["ms"] - base - per_seq * pre["decode_seqs"]
            per_tok = max(_typical(extra / pre["prefill_tokens"]), 0.0)
        costs[role] = StepCost(base, per_tok, per_seq)
        few = sorted(int(b) for b, k in zip(sizes, n, strict=True) if k < MIN_SAMPLES)
        if few:
            thin.append(f"{role} steps: fewer than {MIN_SAMPLES} samples at decode batch "
                        f"size(s) {few[:8]}{' ...' if len(few) > 8 else ''}")
        if role != PREFILL and len(sizes) < 2:
            thin.append(f"{role} steps: one decode batch size seen; no batch-size slope")
        if sizes:
            thin.append(f"{role} steps: decode batches seen up to {int(max(sizes))}; "
                        "larger batches are extrapolated linearly")
        if role != DECODE and len(pre) < MIN_SAMPLES:
            thin.append(f"{role} steps: only {len(pre)} step(s) with prefill")
    return costs, counts


def _span_costs(req: pd.DataFrame, loads: dict[int, Load], kind: str, workers: dict,
                thin: list[str]) -> tuple[dict, dict]:
    """StepCost per role from the compute legs (no step records)."""
    first = LEG + ("prefill.first_token" if kind == "disaggregated" else "engine.first_token")
    isl = req["isl"].astype(float)
    ok = req[first].notna() & isl.notna()
    if not ok.any():
        raise BadInputError("no prefill-compute leg with a known input length",
                            hint="The traces need vllm.prefill.compute spans and aiperf records.")
    x, y = isl[ok].tolist(), req.loc[ok, first].tolist()
    if max(x) - min(x) < 0.1 * max(x):
        # One prompt length: time in proportion to tokens (no fixed part can be told apart).
        per_tok, base = sum(y) / sum(x), 0.0
        thin.append(f"prefill: one input length ({int(sum(x) / len(x))} tokens) in the "
                    "calibration; other lengths scale the time in proportion")
    else:
        base, per_tok = _fit([x], y)
    counts = {"prefill_requests": int(ok.sum())}
    if kind == "aggregated":
        # The first-token step carried the prompt and the running decodes: no decode term.
        counts["decode_levels"] = 0
        thin.append("aggregated without step records: decode steps cost nothing beyond the "
                    "base; record step records for decode batching")
        return {AGGREGATED: StepCost(0.0, per_tok, 0.0)}, counts
    dcol = LEG + "decode.first_token"
    n_dec = max(workers.get(DECODE, 1), 1)
    per_level = req[req[dcol].notna()].groupby("concurrency")[dcol].median()
    xs = [min(float(c), max(loads[int(c)].osl)) / n_dec for c in per_level.index
          if int(c) in loads]
    ys = [float(v) for c, v in per_level.items() if int(c) in loads]
    counts["decode_levels"] = len(ys)
    # A slope from two noisy levels is mostly noise: fit one only on three or more.
    if len(ys) >= 3 and max(xs) > min(xs):
        dbase, per_seq = _fit([xs], ys)
        thin.append("no step records: decode step time fitted on the first-token leg per "
                    "level (batch estimated as concurrency / decode workers)")
    else:
        med = req[dcol].dropna().median() if req[dcol].notna().any() else 0.0
        dbase, per_seq = float(med), 0.0
        thin.append(f"decode: no step records and {len(ys)} level(s): step time taken as "
                    "constant (the median first-token step), no batch-size term")
    return {PREFILL: StepCost(0.0, per_tok, 0.0), DECODE: StepCost(dbase, 0.0, per_seq)}, counts


def calibrate(req: pd.DataFrame, aiperf: pd.DataFrame, steps: pd.DataFrame | None = None,
              levels: list[int] | None = None, link_gbytes_per_s: float | None = None,
              link_source: str | None = None, block_tokens: int | None = None) -> Calibration:
    """Fit the model on the measured requests of ``levels`` (default: all levels)."""
    import pandas as pd

    loads = load_levels(aiperf)
    # The handshake is paid once per pair, mostly in aiperf's warm-up: look at every request.
    hs_all = req.get(LEG + "kv.handshake.end")
    req = req[~req["warmup"].astype(bool) & req["ttft_ms"].notna()].copy()
    req = req[req["concurrency"].notna()]
    levels = sorted(levels or loads)
    missing = [lv for lv in levels if lv not in loads]
    if missing:
        raise BadInputError(f"no aiperf level {missing} to calibrate on",
                            hint=f"The run has levels {sorted(loads)}.")
    req = req[req["concurrency"].astype(int).isin(levels)]
    if not len(req):
        raise BadInputError(f"no traced requests with a TTFT at levels {levels}",
                            hint="Pass the traces and aiperf records of the same run.")
    chains = req["chain"].astype(str)
    kind = "disaggregated" if chains.str.contains("disaggregated").mean() >= 0.5 \
        else "aggregated"
    ap = aiperf.dropna(subset=["x_request_id"]).drop_duplicates("x_request_id")
    lens = ap.set_index("x_request_id")[["isl", "osl"]]
    req = req.join(lens, on="x_request_id") if "x_request_id" in req else req
    req["isl"] = pd.to_numeric(req.get("isl"), errors="coerce")
    thin: list[str] = []
    if kind == "disaggregated":
        workers = {PREFILL: int(req["prefill_engine"].nunique()) or 1,
                   DECODE: int(req["decode_engine"].nunique()) or 1}
    else:
        engine = req["prefill_engine"] if req["prefill_engine"].notna().any() \
            else req.get("decode_engine")
        workers = {AGGREGATED: int(engine.nunique()) if engine is not None else 1}
    if steps is not None and len(steps):
        # A step at a token count its engine had not run before builds that shape's kernels
        # (seconds on the warm-up, 0.2-0.35 s later on, against 15-60 ms for the same shape
        # after): a one-off, kept out of the cost laws and of the step ratios.
        steps = steps[~first_of_shape(steps)]
        costs, counts = _step_costs(_steps_in_levels(steps, aiperf, levels), kind, thin)
        by_level = {}
        for lv in levels:
            # A level's own fit where its steps suffice (decode at two batch sizes is not
            # needed: the pooled slope stands in); the pooled fit elsewhere.
            own = _steps_in_levels(steps, aiperf, [lv], fallback=False)
            try:
                lv_costs, _ = _step_costs(own, kind, [])
            except BadInputError:
                continue
            # Per role: a role with too few steps at this level keeps the pooled law.
            enough = {r: c for r, c in lv_costs.items() if _enough(own, r, kind)}
            if enough:
                by_level[lv] = {**costs, **enough}
        step_source = "step records"
        limits = _engine_limits(steps)
        limits["kv_blocks"] = _kv_blocks(steps, kind)
        limits["costs_by_level"] = by_level
        # Ratios to each level's own law, per role (a decode step's tail is not a prefill's).
        limits["step_ratios_by_role"] = _step_ratios(steps, aiperf, levels, kind, costs,
                                                     by_level)
        if block_tokens:
            limits["block_tokens"] = block_tokens
        else:
            limits["kv_blocks"] = {}
            thin.append("KV cache size not modelled: tokens per block unknown (no KV "
                        "transfer span with kv.blocks)")
    else:
        costs, counts = _span_costs(req, loads, kind, workers, thin)
        step_source = "spans (no step records)"
        limits = {}
        thin.append("engine limits unknown without step records: max batch 256 and 8192 "
                    "tokens per step assumed (give --max-batch / --token-budget)")
    # The transfer: bytes per token, wire part, fixed part, handshake.
    kv_per_tok = 0.0
    wire = None
    rate = link_gbytes_per_s
    src = link_source or ("given" if rate else "")
    handshake = 0.0
    if kind == "disaggregated":
        kvb = pd.to_numeric(req.get("kv_bytes"), errors="coerce")
        per_tok = (kvb / req["isl"]).dropna()
        kv_per_tok = float(per_tok.median()) if len(per_tok) else 0.0
        tcol = LEG + "kv.transfer.end"
        wire_col = LEG + WIRE_LEG if LEG + WIRE_LEG in req and \
            req[LEG + WIRE_LEG].notna().any() else None
        if wire_col:
            measured_wire = req[wire_col]
            ok = measured_wire.notna() & (measured_wire > 0) & kvb.notna()
            if rate is None and ok.any():
                rate = float((kvb[ok] / (measured_wire[ok] / 1e3)).median() / 1e9)
                src = "transfer split (NIXL wire time)"
            wire = kvb / (rate * 1e9) * 1e3 if rate else measured_wire
        elif tcol in req and req[tcol].notna().any() and kvb.notna().any():
            if rate is None:
                ok = req[tcol].notna() & (req[tcol] > 0) & kvb.notna()
                rate = float((kvb[ok] / (req.loc[ok, tcol] / 1e3)).median() / 1e9)
                src = "achieved (no transfer split: the whole transfer counted as wire)"
                thin.append("transfer: no transfer split, so a link what-if scales the whole "
                            "measured transfer")
            wire = kvb / (rate * 1e9) * 1e3
        if hs_all is not None and hs_all.notna().any():
            handshake = float(hs_all.dropna().median())
            counts["handshakes"] = int(hs_all.notna().sum())
        else:
            thin.append("transfer: no NIXL handshake in the traces; the model adds none")
    samples = _overhead_samples(req, wire)
    conc = req["concurrency"].astype(int).tolist()
    by_level = tuple((lv, tuple(smp for smp, c in zip(samples, conc, strict=True) if c == lv))
                     for lv in levels if lv in conc)
    counts["requests"] = int(len(req))
    for lv in levels:
        n = int((req["concurrency"].astype(int) == lv).sum())
        if n < MIN_SAMPLES:
            thin.append(f"level {lv}: only {n} traced requests")
    return Calibration(kind=kind, costs=costs, workers=workers,
                       overheads=Overheads(tuple(samples), by_level),
                       kv_bytes_per_token=kv_per_tok,
                       link_gbytes_per_s=rate, link_source=src, handshake_ms=handshake,
                       step_source=step_source, calibrated_on=levels, thin=thin,
                       samples=counts, **limits)
