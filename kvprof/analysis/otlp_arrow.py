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

# Small blocks parse in parallel on all cores; a JSON line (one export batch) must fit in one
# block, so a file with longer lines is read again with the big block.
_BLOCKS = (1 << 20, 64 << 20)


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
    import pyarrow.compute as pc

    flat = pc.list_flatten(attrs_list)
    parent = pc.list_parent_indices(attrs_list).to_numpy()
    owner = owner_of_list[parent] if owner_of_list is not None else parent
    keys = _field(flat, "key")
    vals = _field(flat, "value")
    if keys is None or vals is None or len(flat) == 0:
        return {}
    text = _value_text(vals)
    out = {}
    for key, col in ATTR_COLUMNS.items():
        mask = pc.equal(keys, key)
        if not pc.any(mask).as_py():
            continue
        mask_np = mask.to_numpy(zero_copy_only=False)
        out[col] = _spread(n, owner[mask_np], text.filter(mask))
    return out


def read_otlp_jsonl(path: Path) -> pa.Table | None:
    """The span table (as Arrow, before pandas) of one OTLP JSON-lines file, or None."""
    import pyarrow as pa

    try:
        return _read(path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, KeyError) as exc:
        log.debug("arrow path failed for %s (%s); using the stdlib reader", path, exc)
        return None


def _read(path: Path) -> pa.Table | None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
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
        log.debug("arrow flattening failed for %s (%s); using the stdlib reader", path, exc)
        return None
    take_rs = pa.array(sp_rs)
    for col in ATTR_COLUMNS.values():
        value = own.get(col)
        if col in res:
            default = res[col].take(take_rs)
            value = default if value is None else pc.coalesce(value, default)
        if value is None:
            value = pa.nulls(n, pa.string())
        if col in NUMERIC_COLUMNS:
            value = pc.cast(value, pa.float64(), safe=False) if value.type != pa.float64() \
                else value
        cols[col] = value
    cols["source"] = pa.array(np.full(n, path.name, dtype=object), pa.string())
    cols["clock"] = pc.coalesce(cols["node"], cols["host"], cols["service"],
                                pa.scalar("unknown"))
    # Dictionary-encoding here (C++) hands pandas ready-made Categoricals.
    for col in CATEGORY_COLUMNS:
        cols[col] = pc.dictionary_encode(cols[col])
    return pa.table(cols)
