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


def _per_value(ids: pd.Series, fn) -> pd.Series:
    """``fn`` of ``ids.astype("string")``, run once per distinct value: a request's id sits
    on a dozen spans, and the regex kernels cost per row."""
    import pandas as pd

    s = ids.astype("string")
    codes, uniques = pd.factorize(s)
    out = fn(pd.Series(uniques, dtype=s.dtype))
    return pd.Series(out.array.take(codes, allow_fill=True), index=ids.index, dtype=s.dtype)


def client_request_id(ids: pd.Series) -> pd.Series:
    """The id the client chose, from vLLM's request ids (vectorised, Arrow regex kernels)."""
    return _per_value(ids, _client_request_id)


def _client_request_id(s: pd.Series) -> pd.Series:
    s = s.str.replace(_ENGINE_SUFFIX, "", regex=True)
    has_prefix = s.str.contains(_OPENAI_PREFIX, regex=True)
    stripped = s.str.replace(_OPENAI_PREFIX, "", regex=True)
    # The prompt index only follows a completions id ("cmpl-<id>-0"), never a bare client id.
    stripped = stripped.where(~s.str.startswith("cmpl-").fillna(False),
                              stripped.str.replace(_PROMPT_INDEX, "", regex=True))
    return stripped.where(has_prefix.fillna(False), s)


def external_id(ids: pd.Series) -> pd.Series:
    """vLLM's request id without the engine's random suffix (what kvprof's trace keys use)."""
    return _per_value(ids, lambda s: s.str.replace(_ENGINE_SUFFIX, "", regex=True))


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
    # Every id column as (per-span code, distinct values): the regexes and the graph's id
    # table work on the distinct values (a request's id sits on a dozen spans), and a
    # column's values per span are only built for the few rows a label needs.
    rid = _coded(spans["request_id"])
    ext = (rid[0], _values(external_id(pd.Series(rid[1], dtype="string"))))
    client_from_rid = (rid[0], _values(client_request_id(pd.Series(rid[1], dtype="string"))))
    xid = (_coded(spans["x_request_id"]) if "x_request_id" in spans
           else (np.full(n, -1, dtype=np.int64), np.array([], dtype=object)))
    remote = _coded(spans["remote_request_id"])
    remote_client = (np.where(decode_side, remote[0], -1),
                     _values(client_request_id(pd.Series(remote[1], dtype="string"))))
    foreign = (_coded(spans["foreign_request_id"]) if "foreign_request_id" in spans
               else (np.full(n, -1, dtype=np.int64), np.array([], dtype=object)))
    xid_set = (np.where(_present(xid) & _nonempty(xid), xid[0], -1), xid[1])
    id_cols = [xid_set, client_from_rid, remote_client, foreign]
    # Edges trace -> id; components of the bipartite graph are requests. One id table over
    # the columns' distinct values: the same id in two columns is one node.
    t_parts, i_parts = [], []
    value_parts, offset = [], 0
    for codes, values in id_cols:
        ok = _present((codes, values))
        if ok.any():
            t_parts.append(t_codes[ok])
            i_parts.append(codes[ok] + offset)
        value_parts.append(values)
        offset += len(values)
    if t_parts:
        all_values = np.concatenate(value_parts) if value_parts else np.array([], dtype=object)
        node_of_value, node_uni = pd.factorize(all_values)
        i_codes = node_of_value[np.concatenate(i_parts)]
        trace_comp = _components(n_t, np.concatenate(t_parts), i_codes, len(node_uni))
    else:
        trace_comp = np.arange(n_t)
    notes: list[str] = []
    trace_comp = _split_shared(spans, t_codes, trace_comp, notes)
    comp_codes, comp_uni = pd.factorize(trace_comp)
    codes = comp_codes[t_codes] if n else np.zeros(0, dtype=np.int64)
    n_req = len(comp_uni)
    trace = (t_codes, np.asarray(t_uni, dtype=object))
    labels = _labels(n_req, codes, ext, client_from_rid, xid, decode_side, trace)
    client = np.full(n_req, None, dtype=object)
    for col in ((np.where(~decode_side, client_from_rid[0], -1), client_from_rid[1]), xid):
        ok = _present(col)
        client[codes[ok]] = col[1][col[0][ok]]  # the explicit header wins
    return RequestKeys(codes=codes, labels=labels, client_ids=client, notes=notes)


def first_rows(codes: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Among rows ``pos``: the distinct codes, ascending, and each one's first row (as
    ``np.unique(codes[pos], return_index=True)`` gives them, without its sort)."""
    import numpy as np

    if not len(pos):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    none = np.iinfo(np.int64).max
    at = np.full(int(codes[pos].max()) + 1, none, dtype=np.int64)
    np.minimum.at(at, codes[pos], np.asarray(pos, dtype=np.int64))
    uniq = np.flatnonzero(at != none)
    return uniq, at[uniq]


def _coded(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(per-row code, distinct values as str objects); code -1 = null."""
    import numpy as np
    import pandas as pd

    codes, uniques = pd.factorize(col.astype("string"))
    return codes.astype(np.int64), np.asarray(uniques, dtype=object)


def _values(s: pd.Series) -> np.ndarray:
    """A string Series as objects, None for null."""
    import numpy as np
    import pandas as pd

    v = s.to_numpy(dtype=object)
    return np.where(pd.isna(v), None, v)


def _present(col: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Per row: has a (non-null) value."""
    import numpy as np

    codes, values = col
    ok_value = np.array([v is not None for v in values] + [False], dtype=bool)
    return ok_value[codes]  # code -1 picks the trailing False


def _nonempty(col: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    import numpy as np

    codes, values = col
    return np.array([v != "" for v in values] + [False], dtype=bool)[codes]


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
    """Prefill-side request id (external), else a client id, else the trace id.

    Columns are (per-span code, distinct values) pairs (``_coded``)."""
    import numpy as np

    labels = np.full(n_req, None, dtype=object)
    for col, rows in ((trace_ids, None), (client, None), (xid, None),
                      (ext, ~decode_side)):
        ok = _present(col) & (rows if rows is not None else True)
        # Each request's first span with a value: later columns overwrite earlier ones.
        req, at = first_rows(codes, np.flatnonzero(ok))
        labels[req] = col[1][col[0][at]]
    return labels


def _split_shared(spans, t_codes, trace_comp, notes):
    """Components holding two roots of one name are two requests sharing an id: split
    them back into their traces."""
    import numpy as np
    import pandas as pd

    is_root = spans["name"].isin(ROOTS).to_numpy()
    if not is_root.any():
        return trace_comp
    names = spans["name"][is_root].astype(str)
    roots = pd.DataFrame({"comp": trace_comp[t_codes[is_root]], "name": names.values,
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
