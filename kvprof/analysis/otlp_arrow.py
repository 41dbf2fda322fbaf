"""Fast path: OTLP/JSON-lines files -> the span table through pyarrow's C++ JSON reader.

The stdlib path builds Python objects for every span and attribute; this one lets Arrow parse
the lines and flattens resourceSpans -> scopeSpans -> spans -> attributes with vectorised
list kernels, so a million spans load in seconds. Any file it cannot take (pretty-printed
JSON, Jaeger, types Arrow infers inconsistently) returns None and goes the stdlib way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from kvprof.analysis.span_schema import ATTR_COLUMNS, CATEGORY_COLUMNS, NUMERIC_COLUMNS

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

# A JSON line (one export batch) must fit in one block, so a file with longer lines is read again
# with the big block. Big blocks cost less CPU per byte than small ones (measured: 64 MiB blocks
# parse the bench's 470 MB in ~25% less CPU than 1 MiB blocks); files are read in parallel by
# the caller, so the cores stay busy anyway.
_BLOCKS = (64 << 20, 512 << 20)


def _field(arr: pa.Array, name: str):
    import pyarrow.compute as pc

    if arr.type.get_field_index(name) < 0:
        return None
    return pc.struct_field(arr, name)


def _value_text(values: pa.Array) -> pa.Array:
    """An AnyValue struct array -> its scalar as text (null for arrays/maps/absent)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = []
    for name in ("stringValue", "intValue", "doubleValue", "boolValue"):
        f = _field(values, name)
        if f is not None:
            parts.append(f if f.type == pa.string() else pc.cast(f, pa.string()))
    if not parts:
        return pa.nulls(len(values), pa.string())
    return pc.coalesce(*parts) if len(parts) > 1 else parts[0]


def _spread(n: int, owner, values: pa.Array) -> pa.Array:
    """Length-n array: values[j] at row owner[j] (the last one wins), null elsewhere."""
    import numpy as np
    import pyarrow as pa

    pos = np.full(n, -1, dtype=np.int64)
    pos[np.asarray(owner, dtype=np.int64)] = np.arange(len(values), dtype=np.int64)
    index = pa.array(pos, mask=pos < 0)
    return values.take(index)


def _attr_columns(n: int, attrs_list: pa.Array, owner_of_list) -> dict[str, pa.Array]:
    """Per wanted attribute key: a length-n text column (owner_of_list maps lists to rows)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    flat = pc.list_flatten(attrs_list)
    parent = pc.list_parent_indices(attrs_list).to_numpy()
    owner = owner_of_list[parent] if owner_of_list is not None else parent
    keys = _field(flat, "key")
    vals = _field(flat, "value")
    if keys is None or vals is None or len(flat) == 0:
        return {}
    text = _value_text(vals)
    # Hash the keys once; a handful of distinct keys then select by integer code.
    encoded = pc.dictionary_encode(pc.fill_null(keys, ""))
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    out = {}
    for code, key in enumerate(encoded.dictionary.to_pylist()):
        col = ATTR_COLUMNS.get(key)
        if col is None:
            continue
        mask_np = codes == code
        out[col] = _spread(n, owner[mask_np], text.filter(pa.array(mask_np)))
    return out


def _column(col: str, n: int, own, res, take_rs) -> pa.Array:
    """One attribute column: the span's own value, else its resource's; typed for pandas.

    Category columns are dictionary-encoded here (C++), which hands pandas ready-made
    Categoricals; a resource-only column is encoded on the few resource rows and spread by
    index, so the million-row column is never hashed.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if col in NUMERIC_COLUMNS:
        if own is None and res is not None:
            return pc.cast(res, pa.float64(), safe=False).take(take_rs)
        value = own if own is not None else pa.nulls(n, pa.string())
        if res is not None:
            value = pc.coalesce(value, res.take(take_rs))
        return pc.cast(value, pa.float64(), safe=False)
    if col not in CATEGORY_COLUMNS:
        if own is None:
            return res.take(take_rs) if res is not None else pa.nulls(n, pa.string())
        return own if res is None else pc.coalesce(own, res.take(take_rs))
    if own is None and res is not None:
        return pc.dictionary_encode(res).take(take_rs)
    if own is None:
        return pa.DictionaryArray.from_arrays(pa.nulls(n, pa.int32()), pa.array([], pa.string()))
    return pc.dictionary_encode(own if res is None else pc.coalesce(own, res.take(take_rs)))


def read_otlp_jsonl(path: Path) -> pa.Table | None:
    """The span table (as Arrow, before pandas) of one OTLP JSON-lines file, or None."""
    import pyarrow as pa

    try:
        return _read(path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, KeyError) as exc:
        log.debug("arrow path failed for %s (%s); using the stdlib reader", path, exc)
        return None


def _read(path: Path) -> pa.Table | None:
    import pyarrow as pa
    import pyarrow.json as pj

    table = None
    for block in _BLOCKS:
        try:
            table = pj.read_json(path, read_options=pj.ReadOptions(block_size=block))
            break
        except pa.ArrowInvalid as exc:
            if "straddling" not in str(exc).lower() and "block" not in str(exc).lower():
                log.debug("arrow cannot read %s (%s); using the stdlib reader", path, exc)
                return None
        except (pa.ArrowNotImplementedError, OSError) as exc:
            log.debug("arrow cannot read %s (%s); using the stdlib reader", path, exc)
            return None
    if table is None:
        return None
    return flatten_otlp(table, path.name)


def flatten_otlp(table: pa.Table, source: str) -> pa.Table | None:
    """resourceSpans -> scopeSpans -> spans -> the span table's columns (None: not OTLP)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if table.column_names != ["resourceSpans"] or table.num_rows == 0:
        return None
    try:
        rs_list = table.column("resourceSpans").combine_chunks()
        rs = pc.list_flatten(rs_list)
        ss_list = _field(rs, "scopeSpans")
        if ss_list is None:
            return None
        ss = pc.list_flatten(ss_list)
        ss_rs = pc.list_parent_indices(ss_list).to_numpy()
        sp_list = _field(ss, "spans")
        if sp_list is None:
            return None
        sp = pc.list_flatten(sp_list)
        n = len(sp)
        sp_rs = ss_rs[pc.list_parent_indices(sp_list).to_numpy()]

        def text(name: str, lower: bool = False) -> pa.Array:
            f = _field(sp, name)
            if f is None:
                return pa.array([""] * n, pa.string())
            f = f if f.type == pa.string() else pc.cast(f, pa.string())
            f = pc.fill_null(f, "")
            return pc.utf8_lower(f) if lower else f

        def nanos(name: str) -> pa.Array:
            f = _field(sp, name)
            if f is None:
                return pa.array(np.zeros(n, dtype=np.int64))
            return pc.fill_null(pc.cast(f, pa.int64()), 0)

        cols: dict[str, pa.Array] = {
            "trace_id": text("traceId", lower=True),
            "span_id": text("spanId", lower=True),
            "parent_span_id": text("parentSpanId", lower=True),
            "name": text("name"),
            "start_ns": nanos("startTimeUnixNano"),
            "end_ns": nanos("endTimeUnixNano"),
        }
        span_attrs = _field(sp, "attributes")
        own = _attr_columns(n, span_attrs, None) if span_attrs is not None else {}
        resource = _field(rs, "resource")
        res_attrs = _field(resource, "attributes") if resource is not None else None
        res = _attr_columns(len(rs), res_attrs, None) if res_attrs is not None else {}
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        log.debug("arrow flattening failed for %s (%s); using the stdlib reader", source, exc)
        return None
    take_rs = pa.array(sp_rs)
    for col in ATTR_COLUMNS.values():
        cols[col] = _column(col, n, own.get(col), res.get(col), take_rs)
    # The clock domain: node, else host, else service. Worked out per resource (a few rows)
    # when no span overrides those attributes, then spread to the spans by index.
    parts = ("node", "host", "service")
    if any(c in own for c in parts) or not res:
        cols["clock"] = pc.dictionary_encode(pc.coalesce(
            *(pc.cast(cols[c], pa.string()) for c in parts), pa.scalar("unknown")))
    else:
        small = [res[c] for c in parts if c in res]
        cols["clock"] = pc.dictionary_encode(pc.coalesce(*small, pa.scalar("unknown"))).take(
            take_rs)
    cols["source"] = pa.DictionaryArray.from_arrays(
        pa.array(np.zeros(n, dtype=np.int32)), pa.array([source], pa.string()))
    return pa.table(cols)
