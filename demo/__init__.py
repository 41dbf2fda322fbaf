"""The `make demo` run: kvprof on a tiny aggregated and disaggregated vLLM deployment on a CPU."""
