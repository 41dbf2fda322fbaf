"""Readers of every input the analysis takes: traces (OTLP/JSON, Jaeger, Perfetto), aiperf
exports, collector Parquet, microbench JSON, vLLM logs and metrics; each into a documented
table."""
