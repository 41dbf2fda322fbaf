"""The OpenTelemetry Collector ClickHouse exporter's ``otel_traces`` table: its DDL (both
attribute variants) and the check that a table has the columns kvprof's SQL reads.

The two CREATE TABLE statements are the exporter's (opentelemetry-collector-contrib,
exporter/clickhouseexporter/internal/sqltemplates/traces_table.sql and traces_json_table.sql,
Apache-2.0, Copyright The OpenTelemetry Authors), with the cluster, engine and TTL
placeholders filled for one local MergeTree table: tests create them in chDB and insert spans
the way the exporter does, so the SQL is checked against the schema it meets in production.
"""

from __future__ import annotations

from kvprof.errors import BadInputError

TABLE = "otel_traces"

MAP_DDL = """CREATE TABLE IF NOT EXISTS {db}.{table} (
    Timestamp DateTime64(9) CODEC(Delta, ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    ParentSpanId String CODEC(ZSTD(1)),
    TraceState String CODEC(ZSTD(1)),
    SpanName LowCardinality(String) CODEC(ZSTD(1)),
    SpanKind LowCardinality(String) CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    SpanAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    Duration UInt64 CODEC(ZSTD(1)),
    StatusCode LowCardinality(String) CODEC(ZSTD(1)),
    StatusMessage String CODEC(ZSTD(1)),
    Events Nested (
        Timestamp DateTime64(9),
        Name LowCardinality(String),
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    Links Nested (
        TraceId String,
        SpanId String,
        TraceState String,
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_key mapKeys(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_value mapValues(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_duration Duration TYPE minmax GRANULARITY 1
) ENGINE = MergeTree()
PARTITION BY toDate(Timestamp)
ORDER BY (ServiceName, SpanName, toDateTime(Timestamp))
SETTINGS index_granularity=8192, ttl_only_drop_parts = 1
"""

JSON_DDL = """CREATE TABLE IF NOT EXISTS {db}.{table} (
    Timestamp DateTime64(9) CODEC(Delta, ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    ParentSpanId String CODEC(ZSTD(1)),
    TraceState String CODEC(ZSTD(1)),
    SpanName LowCardinality(String) CODEC(ZSTD(1)),
    SpanKind LowCardinality(String) CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes JSON CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    SpanAttributes JSON CODEC(ZSTD(1)),
    Duration UInt64 CODEC(ZSTD(1)),
    StatusCode LowCardinality(String) CODEC(ZSTD(1)),
    StatusMessage String CODEC(ZSTD(1)),
    Events Nested (
        Timestamp DateTime64(9),
        Name LowCardinality(String),
        Attributes JSON
    ) CODEC(ZSTD(1)),
    Links Nested (
        TraceId String,
        SpanId String,
        TraceState String,
        Attributes JSON
    ) CODEC(ZSTD(1)),
    INDEX idx_duration Duration TYPE minmax GRANULARITY 1
) ENGINE = MergeTree()
PARTITION BY toDate(Timestamp)
ORDER BY (ServiceName, SpanName, toDateTime(Timestamp), Timestamp)
SETTINGS index_granularity=8192, ttl_only_drop_parts = 1
"""

# Columns kvprof's SQL reads, and the type each must have (the attribute columns: either).
NEEDED = {"Timestamp": ("DateTime64(9)",), "TraceId": ("String",), "SpanId": ("String",),
          "ParentSpanId": ("String",), "SpanName": ("LowCardinality(String)", "String"),
          "Duration": ("UInt64",), "StatusCode": ("LowCardinality(String)", "String"),
          "StatusMessage": ("String",)}
ATTRIBUTE_COLUMNS = ("ResourceAttributes", "SpanAttributes")
MAP_TYPE = "Map(LowCardinality(String), String)"


def variant_of(columns: dict[str, str], where: str) -> str:
    """``"map"`` or ``"json"`` (how the table stores attributes), from DESCRIBE's
    name -> type; a table of another schema is a BadInputError naming what differs."""
    wrong = [f"{c} (missing)" if c not in columns else f"{c} is {columns[c]}"
             for c, types in NEEDED.items() if columns.get(c) not in types]
    kinds = set()
    for c in ATTRIBUTE_COLUMNS:
        t = columns.get(c)
        if t in (MAP_TYPE, "Map(String, String)"):
            kinds.add("map")
        elif t is not None and t.startswith("JSON"):
            kinds.add("json")
        else:
            wrong.append(f"{c} (missing)" if t is None else f"{c} is {t}")
    if wrong or len(kinds) != 1:
        raise BadInputError(
            f"{where} is not the OpenTelemetry Collector ClickHouse exporter's traces table: "
            + (", ".join(wrong[:4]) + (f" (and {len(wrong) - 4} more)" if len(wrong) > 4 else "")
               if wrong else "ResourceAttributes and SpanAttributes differ in type"),
            hint="Point --traces at the table the collector's clickhouse exporter writes "
            "(clickhouse://HOST:8123/DB, table otel_traces; another name: ?table=NAME).")
    return kinds.pop()
