"""kvprof microbench: time moving one request's paged KV blocks, step by step, verified.

Modules: layout (block ids, head slices), paged (vLLM-shaped caches, source bytes), engine
(CPU / CUDA copies), sides (prefill and decode ends, verification), inprocess (copy, NIXL),
twoproc (gloo, nccl across two processes), runner (the measurement), results (statistics and
the JSON schema read by kvprof.analysis), render (terminal tables).
"""
