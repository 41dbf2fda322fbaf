"""kvprof: profile the KV-cache hand-off in disaggregated LLM serving."""

__version__ = "0.1.0"
