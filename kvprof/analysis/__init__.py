"""kvprof analysis: read what probes, collectors and microbench wrote, and explain the TTFT.

Loaders (one module each, DataFrames with documented schemas): traces (span_schema,
otlp_arrow, otlp, jaeger, perfetto), samples, aiperf, microbench_results, vllm_metrics,
placement. Analyzers: breakdown (+ join, skew), links, verdict, audit, compare. Output:
render, plots, report, convert. scenario writes the documented synthetic deployment the
tests and bench/analysis_scale.py use. This package imports only errors/semconv/model.
"""
