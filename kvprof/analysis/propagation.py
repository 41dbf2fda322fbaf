"""Trace propagation hop by hop: which hop carried a request's trace, which only its ids,
and which dropped both, so that the join failed there.

A request crosses hops: client -> router (or NVIDIA Dynamo's frontend) -> prefill engine ->
(kv_transfer_params) -> decode engine, and router -> decode engine. Across each hop the
caller should hand on the W3C ``traceparent`` (one trace in Jaeger) and an id the analysis
can join on (``X-Request-Id``, vLLM's request id, the ``remote_request_id`` in
kv_transfer_params). Per hop this counts the requests whose two sides share a trace, those
joined by an id only (the traceparent was lost there), and the sides that found no partner
at all: that hop dropped both, and the request falls apart into rows of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

ROUTER, PREFILL, DECODE, AGGREGATED = "router", "prefill", "decode", "aggregated"


@dataclass(frozen=True)
class Hop:
    upstream: str
    downstream: str
    carries: str  # what should cross it


HOPS = (
    Hop(ROUTER, PREFILL, "traceparent, X-Request-Id"),
    Hop(PREFILL, DECODE, "kv_transfer_params (traceparent, remote_request_id)"),
    Hop(ROUTER, DECODE, "traceparent, X-Request-Id"),
    Hop(ROUTER, AGGREGATED, "traceparent, X-Request-Id"),
)


def _words(side: str, router_label: str) -> str:
    return router_label if side == ROUTER else f"{side} engine"


def hop_table(trace_codes: np.ndarray, request_codes: np.ndarray, sides: dict[str, np.ndarray],
              router_label: str = "router") -> tuple[list[dict], list[str]]:
    """Per hop whose two ends both appear in the spans: the counts described above, and a
    note for each hop that lost the trace or the whole request.

    ``trace_codes`` / ``request_codes``: per span, its trace and the request it was joined
    into; ``sides``: per side name (ROUTER, PREFILL, ...), a mask of the spans recorded there.
    """
    import pandas as pd

    per_side = {}
    for name, mask in sides.items():
        if mask.any():
            per_side[name] = pd.DataFrame({"req": request_codes[mask],
                                           "trace": trace_codes[mask]}).drop_duplicates()
    reqs = {name: set(frame["req"]) for name, frame in per_side.items()}
    rows: list[dict] = []
    notes: list[str] = []
    for hop in HOPS:
        if hop.upstream not in per_side or hop.downstream not in per_side:
            continue
        up, down = reqs[hop.upstream], reqs[hop.downstream]
        if hop.upstream == ROUTER:
            # A router request that went to an aggregated engine never meets a prefill or a
            # decode engine (and one served disaggregated never meets an aggregated one).
            other = reqs.get(AGGREGATED, set()) if hop.downstream != AGGREGATED else (
                reqs.get(PREFILL, set()) | reqs.get(DECODE, set()))
            up = up - other
            if hop.downstream == DECODE and PREFILL in reqs:
                up = up & reqs[PREFILL]  # only what reached a prefill engine goes on
        both = up & down
        shared = set(per_side[hop.upstream].merge(per_side[hop.downstream],
                                                  on=["req", "trace"])["req"]) & both
        row = {"hop": f"{_words(hop.upstream, router_label)} -> "
                      f"{_words(hop.downstream, router_label)}",
               "carries": hop.carries, "requests": len(up | down), "same_trace": len(shared),
               "joined_by_id_only": len(both - shared),
               "upstream_without_downstream": len(up - down),
               "downstream_without_upstream": len(down - up)}
        rows.append(row)
        notes.extend(_hop_notes(row, hop, router_label))
    return rows, notes


def _hop_notes(row: dict, hop: Hop, router_label: str) -> list[str]:
    up_w, down_w = _words(hop.upstream, router_label), _words(hop.downstream, router_label)
    notes = []
    lost_up, lost_down = row["upstream_without_downstream"], row["downstream_without_upstream"]
    if lost_up or lost_down:
        what = "; ".join(x for x in (
            f"{lost_up} {up_w} request(s) found no {down_w} request" if lost_up else "",
            f"{lost_down} {down_w} request(s) found no {up_w} request" if lost_down else "")
            if x)
        notes.append(
            f"Propagation broke at {row['hop']}: {what}. Neither the trace nor an id to join "
            f"on ({hop.carries}) crossed this hop for them, so each side is a row of its own "
            f"(the {down_w}'s rows have no client TTFT). Forward those with the request, or "
            "look for requests this side never traced.")
    if row["joined_by_id_only"]:
        notes.append(
            f"{row['hop']}: {row['joined_by_id_only']} of {row['requests']} request(s) kept "
            "their ids but not their trace (no traceparent crossed this hop): kvprof joins "
            "them by request id; in Jaeger they are separate traces.")
    return notes


def client_hop(source: np.ndarray, by_id: str, by_window: str, router_label: str) -> dict:
    """The client -> router hop: how each traced request found its aiperf record."""
    import numpy as np

    return {"hop": f"client -> {router_label}", "carries": "X-Request-Id",
            "requests": int(len(source)),
            "same_trace": None,
            "joined_by_id_only": int(np.sum(source == by_id)),
            "joined_by_time_window": int(np.sum(source == by_window)),
            "upstream_without_downstream": None,
            "downstream_without_upstream": int(np.sum(source == None))}  # noqa: E711
