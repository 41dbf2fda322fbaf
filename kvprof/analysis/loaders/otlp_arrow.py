"""Fast path: OTLP/JSON-lines files -> the span table through pyarrow's C++ JSON reader.

The stdlib path builds Python objects for every span and attribute; this one lets Arrow parse
the lines and flattens resourceSpans -> scopeSpans -> spans -> attributes with vectorised
list kernels, so a million spans load in seconds. Any file it cannot take (pretty-printed
JSON, Jaeger, types Arrow infers inconsistently) returns None and goes the stdlib way.

Malformed spans (the rules are kvprof.analysis.loaders.otlp's) are found with a few vectorised
checks on the id bytes and times; only the rows they flag go through the stdlib checks,
which skip them (counted) or normalise them (base64 ids, zero parent ids), so both paths
keep and drop the same spans.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from kvprof.analysis.loaders.otlp import (
    MalformedSpan,
    SpanProblems,
    check_otlp_span,
    span_label,
    whole_number,
)
from kvprof.analysis.loaders.span_schema import (
    ATTR_COLUMN_NAMES,
    ATTR_COLUMNS,
    CATEGORY_COLUMNS,
    NUMERIC_COLUMNS,
)

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
    present = {key: code for code, key in enumerate(encoded.dictionary.to_pylist())}
    # In ATTR_COLUMNS order: where several keys feed one column, the first listed wins.
    for key, col in ATTR_COLUMNS.items():
        code = present.get(key)
        if code is None:
            continue
        mask_np = codes == code
        values = _spread(n, owner[mask_np], text.filter(pa.array(mask_np)))
        out[col] = values if col not in out else pc.coalesce(out[col], values)
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


def _status(sp: pa.Array, n: int) -> tuple[pa.Array, pa.Array]:
    """(code as float64, message) of each span; a code written as its STATUS_CODE_* name
    goes through the stdlib mapping (rare: the probes and SDKs write numbers)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from kvprof.analysis.loaders.otlp import status_number

    status = _field(sp, "status")
    code = _field(status, "code") if status is not None else None
    message = _field(status, "message") if status is not None else None
    if code is None:
        code = pa.nulls(n, pa.float64())
    elif pa.types.is_integer(code.type) or pa.types.is_floating(code.type):
        code = pc.cast(code, pa.float64())
    else:
        code = pa.array([None if v is None else float(status_number(v))
                         for v in code.to_pylist()], pa.float64())
    if message is None or not pa.types.is_string(message.type):
        message = pa.nulls(n, pa.string())
    return code, message


def read_otlp_jsonl(path: Path, problems: SpanProblems | None = None) -> pa.Table | None:
    """The span table (as Arrow, before pandas) of one OTLP JSON-lines file, or None.

    Malformed spans are left out of the table and counted in `problems` (only when a table
    is returned: on None the stdlib reader counts them itself).
    """
    import pyarrow as pa

    try:
        return _read(path, problems)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, KeyError,
            AttributeError, TypeError, IndexError) as exc:
        # A field of the wrong JSON type gives Arrow a type flatten_otlp does not expect
        # (a list where a struct goes): the stdlib reader names the bad spans (issue 21).
        log.debug("arrow path failed for %s (%s); using the stdlib reader", path, exc)
        return None


def _read(path: Path, problems: SpanProblems | None = None) -> pa.Table | None:
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
    return flatten_otlp(table, path.name, problems)


def _bad_ids(ids: pa.Array, digits: int, empty_ok: bool = False):
    """Rows whose id is not `digits` lowercase hex digits (or is all zeros); None: no such row.

    Reads the string buffers with NumPy (a byte-class test, no regex), so a million ids cost
    a few milliseconds; ids were lowercased before.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if ids.type != pa.string():
        ids = pc.cast(ids, pa.string())
    bufs = ids.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32)[ids.offset: ids.offset + len(ids) + 1]
    lengths = np.diff(offsets)
    bad = lengths != digits
    if empty_ok:
        bad &= lengths != 0
    if bufs[2] is not None and offsets[-1] > offsets[0]:
        body = np.frombuffer(bufs[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
        # All in '0'..'f' and none in ':'..'`' (uint8 wrap-around) is the usual answer; only
        # otherwise find the bytes that are not hex digits.
        usual = body.min() >= 48 and body.max() <= 102 and not ((body - 58) < 39).any()
        not_hex = None if usual else ((body - 48) >= 10) & ((body - 97) >= 6)
        if not_hex is not None and not_hex.any():
            at = np.flatnonzero(not_hex) + offsets[0]
            bad[np.searchsorted(offsets, at, side="right") - 1] = True
    zeros = pc.equal(ids, "0" * digits)
    if pc.any(zeros).as_py():
        bad |= zeros.to_numpy(zero_copy_only=False)
    return bad if bad.any() else None


def _bad_times(start: pa.Array, end: pa.Array):
    """Rows without 0 < start <= end (missing or unparsable times are null); None: none."""
    import pyarrow.compute as pc

    ok = pc.fill_null(pc.and_(pc.greater(start, 0), pc.greater_equal(end, start)), False)
    if pc.all(ok).as_py():
        return None
    return ~ok.to_numpy(zero_copy_only=False)


def _nanos_or_none(value) -> int | None:
    try:
        return whole_number(value, "time")
    except MalformedSpan:
        return None


def _recheck(cols: dict, sp: pa.Array, bad, problems: SpanProblems):
    """Run the stdlib checks on the flagged rows: fix what they normalise, return rows to keep."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = np.flatnonzero(bad)
    take = pa.array(rows)

    def raw(name: str) -> list:
        f = _field(sp, name)
        return [None] * len(rows) if f is None else f.take(take).to_pylist()

    fields = ("traceId", "spanId", "parentSpanId", "startTimeUnixNano", "endTimeUnixNano")
    values = [raw(name) for name in fields]
    names = cols["name"].take(take).to_pylist()
    keep = np.ones(len(cols["trace_id"]), dtype=bool)
    fixed_rows: list[int] = []
    fixed: list[list] = [[], [], [], [], []]
    for j, row in enumerate(rows.tolist()):
        t, s, p, b, e = (v[j] for v in values)
        try:
            checked = check_otlp_span(t, s, p, b, e)
        except MalformedSpan as exc:
            problems.skip(f"{span_label(names[j], t)}: {exc}")
            keep[row] = False
            continue
        if checked[5]:
            problems.drop_parent(f"{span_label(names[j], checked[0])}: {checked[5]}")
        fixed_rows.append(row)
        for out, v in zip(fixed, checked[:5], strict=True):
            out.append(v)
    if fixed_rows:
        mask = np.zeros(len(keep), dtype=bool)
        mask[fixed_rows] = True
        mask_arr = pa.array(mask)
        targets = ("trace_id", "span_id", "parent_span_id", "start_ns", "end_ns")
        for col, vals in zip(targets, fixed, strict=True):
            cols[col] = pc.replace_with_mask(cols[col], mask_arr,
                                             pa.array(vals, type=cols[col].type))
    return keep


def flatten_otlp(table: pa.Table, source: str,
                 problems: SpanProblems | None = None) -> pa.Table | None:
    """resourceSpans -> scopeSpans -> spans -> the span table's columns (None: not OTLP).

    Malformed spans are dropped and counted in `problems` (see the module docstring).
    """
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
            # ASCII is enough: an id with other characters is malformed whatever its case.
            return pc.ascii_lower(f) if lower else f

        def nanos(name: str) -> pa.Array:
            """Times as int64; null where missing or not a whole number (checked below)."""
            f = _field(sp, name)
            if f is None or not (pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
                                 or pa.types.is_string(f.type)):
                return pa.nulls(n, pa.int64())
            try:
                return pc.cast(f, pa.int64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                # Some span's time is no whole number: value by value, that one becomes null.
                return pa.array([_nanos_or_none(v) for v in f.to_pylist()], pa.int64())

        cols: dict[str, pa.Array] = {
            "trace_id": text("traceId", lower=True),
            "span_id": text("spanId", lower=True),
            "parent_span_id": text("parentSpanId", lower=True),
            "name": text("name"),
            "start_ns": nanos("startTimeUnixNano"),
            "end_ns": nanos("endTimeUnixNano"),
        }
        bad = _bad_times(cols["start_ns"], cols["end_ns"])
        for col, digits, empty_ok in (("trace_id", 32, False), ("span_id", 16, False),
                                      ("parent_span_id", 16, True)):
            flagged = _bad_ids(cols[col], digits, empty_ok)
            if flagged is not None:
                bad = flagged if bad is None else bad | flagged
        found = SpanProblems()
        keep = _recheck(cols, sp, bad, found) if bad is not None else None
        span_attrs = _field(sp, "attributes")
        own = _attr_columns(n, span_attrs, None) if span_attrs is not None else {}
        resource = _field(rs, "resource")
        res_attrs = _field(resource, "attributes") if resource is not None else None
        res = _attr_columns(len(rs), res_attrs, None) if res_attrs is not None else {}
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        log.debug("arrow flattening failed for %s (%s); using the stdlib reader", source, exc)
        return None
    take_rs = pa.array(sp_rs)
    for col in ATTR_COLUMN_NAMES:
        cols[col] = _column(col, n, own.get(col), res.get(col), take_rs)
    cols["status_code"], cols["status_message"] = _status(sp, n)
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
    out = pa.table(cols)
    if keep is not None and not keep.all():
        out = out.filter(pa.array(keep))
    if problems is not None:
        problems.merge(found)
    return out
