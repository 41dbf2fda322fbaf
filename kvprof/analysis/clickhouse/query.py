"""The SQL that turns an ``otel_traces``-shaped relation into kvprof's span table.

One statement does the heavy part where the traces are stored: it keeps only the spans the
analysis reads (kvprof's probes, NVIDIA Dynamo's and vLLM's own, by name; optionally only
traces that touched one service, in a time window), flattens the attribute maps into the
span table's columns (kvprof.analysis.loaders.span_schema: a span's own attribute before
its resource's, the first listed key before the others) and returns them as Arrow. The
same statement runs on a ClickHouse server and on chDB; over local OTLP/JSON-lines files
chDB first reads them into the exporter's shape (``otlp_files_relation``), so both paths
share one extraction.
"""

from __future__ import annotations

from kvprof import semconv as sc
from kvprof.analysis.loaders.span_schema import ATTR_COLUMNS, CATEGORY_COLUMNS, NUMERIC_COLUMNS

# Span names the report reads (the breakdown's, the engine steps', the causes'); the rest of
# a fleet's spans stay on the cluster.
READ_NAMES = tuple(sorted({*sc.ALL_SPANS, *sc.FOREIGN_SPANS, sc.SPAN_ENGINE_STEP,
                           sc.DYNAMO_HTTP_REQUEST, sc.DYNAMO_ROUTE, sc.DYNAMO_HANDLE,
                           sc.VLLM_LLM_REQUEST}))

# OTLP JSON: AnyValue as text (numbers and bools are read as their JSON text).
_VALUE = ("Tuple(stringValue Nullable(String), intValue Nullable(String), "
          "doubleValue Nullable(String), boolValue Nullable(String))")
_ATTRS = f"Array(Tuple(key String, value {_VALUE}))"
OTLP_STRUCTURE = (
    f"resourceSpans Array(Tuple(resource Tuple(attributes {_ATTRS}), "
    "scopeSpans Array(Tuple(scope Tuple(name Nullable(String), version Nullable(String)), "
    "spans Array(Tuple(traceId String, spanId String, parentSpanId Nullable(String), "
    "name String, kind Nullable(String), startTimeUnixNano String, endTimeUnixNano String, "
    f"attributes {_ATTRS}, status Tuple(code Nullable(String), message Nullable(String))))))))")


# LowCardinality columns as Arrow dictionaries; numbers and bools in OTLP JSON read as text.
SETTINGS = (" SETTINGS output_format_arrow_low_cardinality_as_dictionary = 1, "
            "input_format_skip_unknown_fields = 1")


def quote(text: str) -> str:
    """A ClickHouse string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def ident(name: str) -> str:
    """A ClickHouse identifier (back-quoted)."""
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def _keys_of(column: str) -> list[str]:
    return [k for k, c in ATTR_COLUMNS.items() if c == column]


def _attr(col: str, key: str, variant: str) -> str:
    if variant == "json":
        # JSON columns split keys at dots into paths; getSubcolumn reads "a.b" as that path.
        return f"CAST(getSubcolumn({col}, {quote(key)}) AS Nullable(String))"
    return f"if(mapContains({col}, {quote(key)}), {col}[{quote(key)}], NULL)"


def column_exprs(variant: str) -> list[str]:
    """One SELECT expression per attribute column: the span's own keys, then its resource's."""
    out = []
    for column in dict.fromkeys(ATTR_COLUMNS.values()):
        keys = _keys_of(column)
        parts = [_attr("SpanAttributes", k, variant) for k in keys]
        parts += [_attr("ResourceAttributes", k, variant) for k in keys]
        expr = f"coalesce({', '.join(parts)})" if len(parts) > 1 else parts[0]
        if column in NUMERIC_COLUMNS:
            expr = f"toFloat64OrNull({expr})"
        elif column in CATEGORY_COLUMNS:
            # Sent as an Arrow dictionary (a few distinct values per million rows).
            expr = f"toLowCardinality({expr})"
        out.append(f"{expr} AS {ident(column)}")
    return out


def spans_sql(relation: str, variant: str, service: str | None = None,
              lookback_s: float | None = None, order: str = "",
              names: tuple[str, ...] | None = READ_NAMES) -> str:
    """The extraction statement over ``relation`` (a table name or a parenthesised query
    with the exporter's columns). ``service``: only traces that hold a span of that
    service; ``lookback_s``: only spans that start within that many seconds before the
    newest span stored (on a live table: the last hour; on a finished run's: its last hour);
    ``names``: the span names kept (None: all, as the pandas loader keeps them)."""
    where = [f"SpanName IN ({', '.join(quote(n) for n in names)})"] if names else ["1"]
    window = ""
    if lookback_s is not None:
        window = (f"Timestamp >= (SELECT max(Timestamp) FROM {relation}) - "
                  f"toIntervalNanosecond({int(lookback_s * 1e9)})")
        where.append(window)
    if service:
        where.append(f"TraceId IN (SELECT TraceId FROM {relation} WHERE ServiceName = "
                     f"{quote(service)}" + (f" AND {window}" if window else "") + ")")
    status = ("multiIf(StatusCode IN ('Ok', 'STATUS_CODE_OK', '1'), 1., "
              "StatusCode IN ('Error', 'STATUS_CODE_ERROR', '2'), 2., NULL)")
    cols = [
        "lower(TraceId) AS trace_id", "lower(SpanId) AS span_id",
        "lower(ParentSpanId) AS parent_span_id", "toLowCardinality(toString(SpanName)) AS name",
        "toUnixTimestamp64Nano(Timestamp) AS start_ns",
        "toUnixTimestamp64Nano(Timestamp) + toInt64(Duration) AS end_ns",
        *column_exprs(variant),
        f"{status} AS status_code", "nullIf(StatusMessage, '') AS status_message",
    ]
    return (f"SELECT {', '.join(cols)} FROM {relation} WHERE {' AND '.join(where)}"
            + (f" ORDER BY {order}" if order else "") + SETTINGS)


def _attr_map(expr: str) -> str:
    """OTLP JSON attributes (key, AnyValue) -> the exporter's Map (values as text)."""
    return (f"mapFromArrays(arrayMap(a -> a.key, {expr}), arrayMap(a -> coalesce("
            "a.value.stringValue, a.value.intValue, a.value.doubleValue, a.value.boolValue, ''),"
            f" {expr}))")


def otlp_files_relation(pattern: str) -> str:
    """OTLP/JSON-lines files (a glob chDB expands) as a relation with the exporter's columns
    (Map variant), plus ``_path`` and ``_pos`` to keep the files' span order."""
    return (
        "(SELECT fromUnixTimestamp64Nano(toInt64(sp.startTimeUnixNano)) AS Timestamp, "
        "sp.traceId AS TraceId, sp.spanId AS SpanId, "
        "ifNull(sp.parentSpanId, '') AS ParentSpanId, sp.name AS SpanName, "
        "toUInt64(toInt64(sp.endTimeUnixNano) - toInt64(sp.startTimeUnixNano)) AS Duration, "
        f"{_attr_map('rs.resource.attributes')} AS ResourceAttributes, "
        f"{_attr_map('sp.attributes')} AS SpanAttributes, "
        "ifNull(sp.status.code, '') AS StatusCode, "
        "ifNull(sp.status.message, '') AS StatusMessage, "
        # The usual well-formed span (the pandas loader's rules: ids of lowercase-able hex,
        # not all zeros, 0 < start <= end); a file with any other goes the pandas way.
        "toBool(match(lower(sp.traceId), '^[0-9a-f]{32}$') AND sp.traceId != repeat('0', 32) "
        "AND match(lower(sp.spanId), '^[0-9a-f]{16}$') AND sp.spanId != repeat('0', 16) "
        "AND (ifNull(sp.parentSpanId, '') = '' OR (match(lower(sp.parentSpanId), "
        "'^[0-9a-f]{16}$') AND sp.parentSpanId != repeat('0', 16))) "
        "AND toInt64OrZero(sp.startTimeUnixNano) > 0 "
        "AND toInt64OrZero(sp.startTimeUnixNano) <= toInt64OrZero(sp.endTimeUnixNano)) AS _ok, "
        "_path, (_row_number, i, j, k) AS _pos "
        f"FROM file({quote(pattern)}, 'JSONEachRow', {quote(OTLP_STRUCTURE)}) "
        "ARRAY JOIN resourceSpans AS rs, arrayEnumerate(resourceSpans) AS i "
        "ARRAY JOIN rs.scopeSpans AS ss, arrayEnumerate(rs.scopeSpans) AS j "
        "ARRAY JOIN ss.spans AS sp, arrayEnumerate(ss.spans) AS k)")
