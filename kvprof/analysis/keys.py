"""One key per request: group spans of every process a request passed through.

The spans of one request may sit in one trace (the router's traceparent reached every
engine, Dynamo's frontend continued it) or in several (a proxy that forwards only
X-Request-Id, a traceparent lost on the way). Traces are joined when they share a request
id: the client's X-Request-Id (kvprof's API-server and router spans carry it; Dynamo's
spans have ``x_request_id``), the id vLLM made of it (``cmpl-<id>-0-<8 hex>``, normalised
back to ``<id>``), the prefill request a decode request names (``remote_request_id``), and
Dynamo's own request id. Traces linked through such ids form one request; when one id links
several requests (a client reusing an X-Request-Id), those traces stay apart and a note says
so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvprof import semconv as sc

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

# vLLM: "cmpl-<id>-<n>" (completions, prompt n), "chatcmpl-<id>" (chat), then
# "-<8 random hex>" added by the engine. Stripped in that order, from the right.
_ENGINE_SUFFIX = r"-[0-9a-f]{8}$"
_PROMPT_INDEX = r"-\d+$"
_OPENAI_PREFIX = r"^(?:chat)?cmpl-"
# Spans that start a request's work in one process: two of one name in one group means two
# requests share an id.
ROOTS = (sc.SPAN_ROUTER_REQUEST, sc.DYNAMO_HTTP_REQUEST, sc.SPAN_PREFILL, sc.SPAN_REQUEST)


def client_request_id(ids: pd.Series) -> pd.Series:
    """The id the client chose, from vLLM's request ids (vectorised, Arrow regex kernels)."""
    s = ids.astype("string")
    s = s.str.replace(_ENGINE_SUFFIX, "", regex=True)
    has_prefix = s.str.contains(_OPENAI_PREFIX, regex=True)
    stripped = s.str.replace(_OPENAI_PREFIX, "", regex=True)
    # The prompt index only follows a completions id ("cmpl-<id>-0"), never a bare client id.
    stripped = stripped.where(~s.str.startswith("cmpl-").fillna(False),
                              stripped.str.replace(_PROMPT_INDEX, "", regex=True))
    return stripped.where(has_prefix.fillna(False), s)


def external_id(ids: pd.Series) -> pd.Series:
    """vLLM's request id without the engine's random suffix (what kvprof's trace keys use)."""
    return ids.astype("string").str.replace(_ENGINE_SUFFIX, "", regex=True)


@dataclass
class RequestKeys:
    """Per span the request it belongs to; per request its label and ids."""

    codes: np.ndarray  # request index of each span (aligned to the spans table)
    labels: np.ndarray  # per request: the prefill request id, else the client id, else trace
    client_ids: np.ndarray  # per request: the client's X-Request-Id (object, None if unknown)
    notes: list[str] = field(default_factory=list)


def assign_request_keys(spans: pd.DataFrame, decode_side: np.ndarray) -> RequestKeys:
    """Group spans into requests (see the module docstring).

    ``decode_side``: True for spans recorded by a decode engine (their request id is the
    decode engine's own; remote_request_id names the prefill request).
    """
    import numpy as np
    import pandas as pd

    n = len(spans)
    t_codes, t_uni = pd.factorize(spans["trace_id"])
    n_t = len(t_uni)
    rid = spans["request_id"]
    ext = external_id(rid)
    client_from_rid = client_request_id(rid)
    xid = spans["x_request_id"].astype("string") if "x_request_id" in spans else pd.Series(
        pd.NA, index=spans.index, dtype="string")
    remote = spans["remote_request_id"].astype("string")
    foreign = (spans["foreign_request_id"].astype("string") if "foreign_request_id" in spans
               else pd.Series(pd.NA, index=spans.index, dtype="string"))
    id_cols = [xid.where(xid != "", pd.NA), client_from_rid,
               client_request_id(remote.where(pd.Series(decode_side, index=spans.index))),
               foreign]
    # Edges trace -> id; components of the bipartite graph are requests.
    t_parts, i_parts = [], []
    for col in id_cols:
        ok = col.notna().to_numpy()
        if ok.any():
            t_parts.append(t_codes[ok])
            i_parts.append(col[ok].to_numpy(dtype=object))
    if t_parts:
        ids_all = np.concatenate(i_parts)
        i_codes, i_uni = pd.factorize(ids_all)
        trace_comp = _components(n_t, np.concatenate(t_parts), i_codes, len(i_uni))
    else:
        trace_comp = np.arange(n_t)
    notes: list[str] = []
    trace_comp = _split_shared(spans, t_codes, trace_comp, notes)
    comp_codes, comp_uni = pd.factorize(trace_comp)
    codes = comp_codes[t_codes] if n else np.zeros(0, dtype=np.int64)
    n_req = len(comp_uni)
    labels = _labels(n_req, codes, ext, client_from_rid, xid, decode_side, spans["trace_id"])
    client = np.full(n_req, None, dtype=object)
    for col in (client_from_rid.where(pd.Series(~decode_side, index=spans.index)), xid):
        ok = col.notna().to_numpy()
        client[codes[ok]] = col[ok].to_numpy(dtype=object)  # the explicit header wins
    return RequestKeys(codes=codes, labels=labels, client_ids=client, notes=notes)


def _components(n_traces: int, trace_of_edge, id_of_edge, n_ids: int):
    """Connected components of the trace-id graph, as the smallest trace index reached.

    Label propagation: each id takes the smallest label of its traces, each trace the
    smallest of its ids, until nothing changes; a request's traces are a couple of hops
    apart, so this settles in a few vectorised rounds.
    """
    import numpy as np

    label = np.arange(n_traces)
    while True:
        id_label = np.full(n_ids, n_traces, dtype=np.int64)
        np.minimum.at(id_label, id_of_edge, label[trace_of_edge])
        new = label.copy()
        np.minimum.at(new, trace_of_edge, id_label[id_of_edge])
        new = new[new]  # jump to the label's own label: halves the rounds on long chains
        if np.array_equal(new, label):
            return label
        label = new


def _labels(n_req, codes, ext, client, xid, decode_side, trace_ids):
    """Prefill-side request id (external), else a client id, else the trace id."""
    import numpy as np

    labels = np.full(n_req, None, dtype=object)
    for col, rows in ((trace_ids, None), (client, None), (xid, None),
                      (ext, ~decode_side)):
        ok = col.notna().to_numpy() & (rows if rows is not None else True)
        # Earlier spans first: the first value per request is written last, so it wins.
        idx = np.flatnonzero(ok)[::-1]
        labels[codes[idx]] = col.to_numpy(dtype=object)[idx]
    return labels


def _split_shared(spans, t_codes, trace_comp, notes):
    """Components holding two roots of one name are two requests sharing an id: split
    them back into their traces."""
    import numpy as np
    import pandas as pd

    names = spans["name"].astype(str)
    is_root = names.isin(ROOTS).to_numpy()
    if not is_root.any():
        return trace_comp
    roots = pd.DataFrame({"comp": trace_comp[t_codes[is_root]], "name": names[is_root].values,
                          "trace": t_codes[is_root]}).drop_duplicates()
    per = roots.groupby(["comp", "name"])["trace"].nunique()
    shared = per[per > 1].index.get_level_values("comp").unique()
    if len(shared) == 0:
        return trace_comp
    out = trace_comp.copy()
    bad = np.isin(out, shared)
    out[bad] = out.max() + 1 + np.flatnonzero(bad)
    notes.append(f"{len(shared)} request id(s) were shared by several requests (a client "
                 "reusing X-Request-Id?): those traces are reported apart, joined by trace "
                 "id only.")
    return out
