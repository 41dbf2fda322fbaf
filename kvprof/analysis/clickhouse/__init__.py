"""Traces where fleets keep them: the OpenTelemetry Collector ClickHouse exporter's
``otel_traces`` table (``clickhouse://``) and the same SQL on chDB over local files."""
