"""Engine limits the demo's vLLM engines share (vLLM stack and Dynamo stack), chosen so that
the top concurrency level saturates a 2-core machine and its queues show.

At concurrency 16 with 4 running sequences per engine, 12 requests wait in a scheduler queue;
128 KV blocks of 32 tokens hold about 7 requests of 512 + 16 tokens, so a prefill engine
whose finished requests keep their blocks until the decode side pulls them (kv.hold) runs
out of blocks before it runs out of sequence slots. Standard library only: demo.dynamo.stack
imports it too.
"""

from __future__ import annotations

MAX_NUM_SEQS = 4
# One step prefills at most 4 prompts of 512 tokens.
MAX_NUM_BATCHED_TOKENS = 2048
# --num-gpu-blocks-override (it applies to the CPU backend's KV cache too).
KV_BLOCKS = 128


def engine_limit_args() -> list[str]:
    """vLLM engine flags for the limits above."""
    return ["--max-num-seqs", str(MAX_NUM_SEQS),
            "--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS),
            "--num-gpu-blocks-override", str(KV_BLOCKS)]
