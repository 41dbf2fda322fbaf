"""Coarse legs: where kvprof's probes did not run, the legs Dynamo's and vLLM's own telemetry bound.

A user's first recording is often just what NVIDIA Dynamo and vLLM export on their own:
Dynamo's spans (``http-request`` with its ``ttft_ms``, ``router.route_request``, each worker's
``handle_payload``), vLLM's ``llm_request`` (when the worker gets ``--otlp-traces-endpoint``;
``gen_ai.latency.time_to_first_token`` / ``time_in_queue`` / ``time_in_model_prefill``) and
Dynamo's per-request ``request_end`` records (kvprof.analysis.loaders.dynamo_records). The
fine chains (kvprof.analysis.legs) then keep the frontend's and the handlers' edges, and the
worker insides, where kvprof's milestones are missing, fall into unaccounted gaps.

This module fills each such gap with *coarse* legs: the points of a coarse chain (one per
Dynamo chain, built from native sources only) that lie inside the gap split it, each piece
named after the coarse point it ends at, as ``leg:~<id>`` columns. A piece is named only
where the coarse chain itself has no gap before that point; what stays unnamed stays
unaccounted, so fine legs + coarse legs + unaccounted = TTFT still holds exactly. Fine legs
are never replaced: coarse legs appear only inside gaps, so wherever the probes ran their
legs win. Every coarse leg carries its source (``COARSE_SOURCES``) and a ``coarse.*`` stage
(legs.STAGES), which the verdict reads as "seen only coarsely".

Points computed from durations (vLLM's latencies, the request_end record's) sit on the clock
of the span they are anchored to: the llm_request's start (vLLM's arrival time) or the
http-request's start (the frontend received the request; Dynamo's records count from there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvprof import semconv as sc
from kvprof.analysis import legs as lg

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from numpy.typing import ArrayLike

PREFIX = "~"  # coarse milestone ids (leg columns leg:~<id>)
LLM1, LLM2 = sc.VLLM_LLM_REQUEST + "#1", sc.VLLM_LLM_REQUEST + "#2"
_HANDLE1, _HANDLE2 = sc.DYNAMO_HANDLE + "#1", sc.DYNAMO_HANDLE + "#2"
_ROUTE1, _ROUTE2 = sc.DYNAMO_ROUTE + "#1", sc.DYNAMO_ROUTE + "#2"
# Pseudo slots: (kind, what). "llm": llm_request slot + arrive | scheduled | first;
# "record": a request_end point anchored at the http-request's start.
LLM, RECORD, FIRST = "@llm", "@record", "@dynamo.first_token"

SRC_HTTP = "Dynamo http-request span"
SRC_ROUTE = "Dynamo router.route_request span"
SRC_HANDLE = "Dynamo handle_payload span"
SRC_TTFT = "Dynamo http-request ttft_ms"
SRC_LLM = "vLLM llm_request span (its start: vLLM's arrival time)"
SRC_LLM_QUEUE = ("vLLM llm_request: time_to_first_token - time_in_model_prefill (intake, "
                 "time_in_queue and the output hand-back)")
SRC_LLM_PREFILL = "vLLM llm_request gen_ai.latency.time_in_model_prefill"
SRC_REC_WAIT = "Dynamo request_end record prefill_wait_time_ms"
SRC_REC_PREFILL = "Dynamo request_end record prefill_time_ms"


@dataclass(frozen=True)
class CoarsePoint:
    """A point of a coarse chain: the first available of ``sources``, its leg's words and
    stage, the source named beside the leg, and the fine milestone it coincides with."""

    id: str  # "~" + id
    sources: tuple[tuple[str, str], ...]
    event: str
    leg: str
    stage: str
    source: str
    group: str | None = None
    optional: bool = False

    def as_milestone(self) -> lg.Milestone:
        return lg.Milestone(self.id, self.sources, self.event, self.leg, self.stage,
                            self.group, self.optional)


def _p(id_, sources, event, leg, stage, source, group=None, optional=False) -> CoarsePoint:
    return CoarsePoint(PREFIX + id_, tuple(sources), event, leg, stage, source, group, optional)


def _worker(side: str, slot: str, who: str, queue_stage: str, compute_stage: str,
            queue_leg: str, compute_leg: str, arrive_stage: str | None = None
            ) -> list[CoarsePoint]:
    return [
        _p(f"{side}.vllm.arrive", [(LLM, slot + ":arrive")], f"vLLM in the {who} worker got it",
           f"{who} worker: Dynamo handler -> vLLM (AsyncLLM.generate)",
           arrive_stage or queue_stage, SRC_LLM, group=side + ".llm"),
        _p(f"{side}.vllm.scheduled", [(LLM, slot + ":scheduled")],
           f"the {who} scheduler scheduled it (vLLM's latencies)", queue_leg, queue_stage,
           SRC_LLM_QUEUE, group=side + ".llm"),
        _p(f"{side}.vllm.first_token", [(LLM, slot + ":first")],
           f"vLLM in the {who} worker had the first token", compute_leg, compute_stage,
           SRC_LLM_PREFILL, group=side + ".llm"),
    ]


_FRONTEND = _p("frontend.recv", [(sc.DYNAMO_HTTP_REQUEST, "start")],
               "the Dynamo frontend received it", "client -> Dynamo frontend",
               "coarse.frontend", SRC_HTTP)
_FIRST = ("the Dynamo frontend had the first token", SRC_TTFT)

DYNAMO_DISAGG_COARSE: tuple[CoarsePoint, ...] = (
    _FRONTEND,
    _p("frontend.route.prefill", [(_ROUTE1, "start")], "the frontend routed it to prefill",
       "Dynamo frontend: preprocessing, tokenization, routing", "coarse.frontend", SRC_ROUTE,
       optional=True),
    _p("record.prefill.start", [(RECORD, "prefill_start")],
       "the frontend started the prefill (request_end)",
       "Dynamo frontend: received -> prefill started", "coarse.frontend", SRC_REC_WAIT,
       optional=True),
    _p("prefill.worker.recv", [(_HANDLE1, "start")], "the prefill worker's handler got it",
       "frontend -> prefill worker (request plane)", "coarse.frontend", SRC_HANDLE,
       optional=True),
    *_worker("prefill", LLM1, "prefill", "coarse.prefill.queue", "coarse.prefill",
             "prefill worker: vLLM intake and scheduler queue",
             "prefill compute to the first token"),
    _p("prefill.worker.done", [(_HANDLE1, "end")], "the prefill worker's handler returned",
       "prefill worker, up to its handler's return (its queue and compute too unless vLLM's "
       "llm_request splits them out)", "coarse.prefill", SRC_HANDLE, optional=True),
    _p("record.prefill.done", [(RECORD, "prefill_done")],
       "the frontend had the prefill answer (request_end)",
       "prefill, up to the frontend having its answer", "coarse.prefill", SRC_REC_PREFILL,
       optional=True),
    _p("frontend.route.decode", [(_ROUTE2, "start")], "the frontend routed it to decode",
       "Dynamo frontend: prefill answer -> routing to decode", "coarse.frontend", SRC_ROUTE,
       optional=True),
    _p("decode.worker.recv", [(_HANDLE2, "start")], "the decode worker's handler got it",
       "frontend -> decode worker (request plane)", "coarse.frontend", SRC_HANDLE,
       optional=True),
    *_worker("decode", LLM2, "decode", "coarse.handoff", "coarse.decode",
             "decode worker: KV pull from the prefill worker and scheduler queue (vLLM "
             "schedules it once the KV is in)", "decode first step (the first token)",
             arrive_stage="coarse.decode"),
    _p("frontend.first_token", [(FIRST, "at")], _FIRST[0],
       "prefill -> decode hand-off, up to the first token at the frontend (KV pull, decode "
       "queue and first step unless vLLM's llm_request splits them out; Dynamo's "
       "kv_transfer_estimated_latency_ms bounds it)", "coarse.handoff", _FIRST[1]),
)

DYNAMO_AGG_COARSE: tuple[CoarsePoint, ...] = (
    _FRONTEND,
    _p("frontend.route", [(_ROUTE1, "start")], "the frontend routed it to a worker",
       "Dynamo frontend: preprocessing, tokenization, routing", "coarse.frontend", SRC_ROUTE,
       optional=True),
    _p("engine.worker.recv", [(_HANDLE1, "start")], "the worker's handler got it",
       "frontend -> worker (request plane)", "coarse.frontend", SRC_HANDLE, optional=True),
    *_worker("engine", LLM1, "the", "coarse.prefill.queue", "coarse.prefill",
             "worker: vLLM intake and scheduler queue", "prefill compute to the first token"),
    _p("frontend.first_token", [(FIRST, "at")], _FIRST[0],
       "worker, up to the first token at the frontend (its queue and compute too unless "
       "vLLM's llm_request splits them out)", "coarse.prefill", _FIRST[1]),
)

COARSE_CHAINS: dict[str, tuple[CoarsePoint, ...]] = {
    "dynamo disaggregated": DYNAMO_DISAGG_COARSE,
    "dynamo aggregated": DYNAMO_AGG_COARSE,
}
COARSE_SOURCES: dict[str, str] = {p.id: p.source for c in COARSE_CHAINS.values() for p in c}
COARSE_STAGES = {k: v for k, v in lg.STAGES.items() if k.startswith("coarse.")}
ATTR_COLUMNS = ("vllm_ttft_s", "vllm_prefill_s", "vllm_queue_s", "busy_ns", "idle_ns")


def is_coarse(leg_column_or_stage: str) -> bool:
    """A coarse leg column (leg:~id) or stage (coarse.*)."""
    s = leg_column_or_stage.removeprefix("leg:")
    return s.startswith(PREFIX) or s.startswith("coarse.")


def slot_attributes(spans: pd.DataFrame, key: np.ndarray, slot_codes: np.ndarray,
                    slot_names: list[str], n_keys: int) -> dict[str, pd.DataFrame]:
    """Per native attribute column: (request x slot) first value, NaN where absent."""
    import numpy as np
    import pandas as pd

    out: dict[str, pd.DataFrame] = {}
    for col in ATTR_COLUMNS:
        mat = np.full((n_keys, max(len(slot_names), 1)), np.nan)
        if col in spans:
            v = pd.to_numeric(spans[col], errors="coerce").to_numpy(dtype=float)
            ok = ~np.isnan(v)
            if ok.any():
                frame = pd.DataFrame({"k": key[ok], "s": slot_codes[ok], "v": v[ok]})
                first = frame.groupby(["k", "s"], sort=False)["v"].first()
                mat[first.index.get_level_values(0), first.index.get_level_values(1)] = \
                    first.to_numpy()
        out[col] = pd.DataFrame(mat[:, :len(slot_names)], columns=slot_names)
    return out


def record_matrix(records: pd.DataFrame | None, client_ids: ArrayLike,
                  dynamo_ids: ArrayLike) -> dict[str, np.ndarray]:
    """Per request: the request_end record's durations (ms), joined by X-Request-Id, else by
    Dynamo's request id; NaN without a record."""
    import numpy as np
    import pandas as pd

    n = len(client_ids)
    cols = ("prefill_wait_time_ms", "prefill_time_ms", "ttft_ms",
            "kv_transfer_estimated_latency_ms")
    out = {c: np.full(n, np.nan) for c in cols}
    if records is None or not len(records):
        return out
    for id_col, ids in (("x_request_id", client_ids), ("request_id", dynamo_ids)):
        table = records.dropna(subset=[id_col]).drop_duplicates(id_col, keep="last")
        table = table.set_index(table[id_col].astype(str))
        want = pd.Series(ids, dtype=object).astype("string")
        for c in cols:
            got = want.map(table[c]).to_numpy(dtype=float, na_value=np.nan)
            fill = np.isnan(out[c]) & ~np.isnan(got)
            out[c][fill] = got[fill]
    return out


def coarse_times(points: tuple[CoarsePoint, ...], rows: np.ndarray, starts: pd.DataFrame,
                 ends: pd.DataFrame, clock_mat: np.ndarray, slot_names: list[str],
                 attrs: dict[str, pd.DataFrame], rec: dict[str, np.ndarray],
                 dynamo_ttft_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(times, clocks) of the coarse points for the given requests (NaN / -1 absent), on the
    same relative ns scale as the breakdown's milestone times."""
    import numpy as np

    from kvprof.analysis.breakdown import first_available  # breakdown imports this module

    n = len(rows)
    idx = {s: i for i, s in enumerate(slot_names)}

    def col(frame, slot):
        return frame.iloc[rows, idx[slot]].to_numpy(dtype=float)

    http = idx.get(sc.DYNAMO_HTTP_REQUEST)
    http_start = col(starts, sc.DYNAMO_HTTP_REQUEST) if http is not None else np.full(n, np.nan)
    http_clock = clock_mat[rows, http] if http is not None else np.full(n, -1)

    def resolve(slot, edge):
        if slot == FIRST:
            return http_start + dynamo_ttft_ms[rows] * 1e6, http_clock
        if slot == RECORD:
            values = http_start + rec["prefill_wait_time_ms"][rows] * 1e6
            if edge == "prefill_done":
                values = values + rec["prefill_time_ms"][rows] * 1e6
            return values, http_clock
        if slot == LLM:
            llm, what = edge.split(":")
            if llm not in idx:
                return None
            arrive = col(starts, llm)
            ttft = col(attrs["vllm_ttft_s"], llm) * 1e9
            values = {"arrive": arrive, "first": arrive + ttft,
                      "scheduled": arrive + ttft - col(attrs["vllm_prefill_s"], llm) * 1e9
                      }[what]
            return values, clock_mat[rows, idx[llm]]
        if slot in idx:
            return col(starts if edge == "start" else ends, slot), clock_mat[rows, idx[slot]]
        return None

    return first_available(points, n, resolve)


@dataclass
class Fill:
    """Coarse legs per request (rows) and coarse point (columns, in coarse chain order)."""

    legs_ms: np.ndarray
    filled_ms: np.ndarray  # per request: the time moved from unaccounted into coarse legs


def fill_gaps(table: lg.LegTable, fine_t: np.ndarray, points: tuple[CoarsePoint, ...],
              coarse_t: np.ndarray) -> Fill:
    """Split each unaccounted gap of the fine table with the coarse points inside it.

    Updates ``table.unaccounted_ms`` and ``table.gaps`` (a gap filled whole disappears from
    the words; one filled in part says how much stays unaccounted) and returns the coarse
    legs. A piece ending at a coarse point is named after it when the coarse chain has no
    gap of its own before that point; the piece ending at the gap's far edge is named after
    the coarse point that coincides with that fine milestone (unaccounted if there is none).
    """
    import numpy as np

    n, m = coarse_t.shape
    chain = table.chain
    ctable = lg.compute_legs(coarse_t, tuple(p.as_milestone() for p in points))
    named_here = ctable.kept & ~np.isnan(ctable.legs_ms)
    by_fine = {p.id.removeprefix(PREFIX): j for j, p in enumerate(points)}
    legs = np.full((n, m), np.nan)
    filled = np.zeros(n)
    kept = table.kept
    # Only requests with a gap (a kept milestone after the first without a named leg).
    gappy = (kept & np.isnan(table.legs_ms)).sum(axis=1) > 1
    for i in np.flatnonzero(gappy):
        ks = np.flatnonzero(kept[i])
        gap_no = 0
        new_gaps: list[str] = []
        for a, b in zip(ks[:-1], ks[1:], strict=True):
            if not np.isnan(table.legs_ms[i, b]):
                continue
            ta, tb = fine_t[i, a], fine_t[i, b]
            inside = [j for j in np.flatnonzero(ctable.kept[i])
                      if ta < coarse_t[i, j] < tb]
            end_j = by_fine.get(chain[b].id)
            pieces: list[tuple[int | None, float]] = []
            prev = ta
            for j in inside:
                pieces.append((j, coarse_t[i, j] - prev))
                prev = coarse_t[i, j]
            # The last piece ends at the gap's far edge, a fine milestone measured by a
            # native span too: named after its coarse point even where the coarse chain
            # itself dropped that point (out of order with an optional one beside it).
            pieces.append((end_j, tb - prev))
            got = 0.0
            for k, (j, ms) in enumerate(pieces):
                if j is not None and (named_here[i, j] or k == len(pieces) - 1):
                    legs[i, j] = (0.0 if np.isnan(legs[i, j]) else legs[i, j]) + ms / 1e6
                    got += ms / 1e6
            filled[i] += got
            total = (tb - ta) / 1e6
            text = table.gaps[i][gap_no] if gap_no < len(table.gaps[i]) else None
            gap_no += 1
            if text is None:
                continue
            if got < total - 1e-9:
                new_gaps.append(text + (f" ({got:.1f} ms of it in coarse legs)" if got else ""))
        # What compute_legs added after the gaps (the client's edges) stays as it was.
        new_gaps.extend(table.gaps[i][gap_no:])
        table.gaps[i] = new_gaps
    table.unaccounted_ms = table.unaccounted_ms - filled
    return Fill(legs, filled)
