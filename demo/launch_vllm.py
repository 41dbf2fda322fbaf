"""Run vLLM's OpenAI server after the demo's NIXL shims (demo/dynamo/shims.py, 2 and 3).

    python -m demo.launch_vllm ARGS...   # = python -m vllm.entrypoints.openai.api_server ARGS

On this CPU machine NIXL's progress thread busy-polls a whole core per engine and vLLM's
NIXL worker re-pins the engine's compute thread to the last core (both measured, both named
with their upstream source in demo/dynamo/shims.py): two engines on two cores then share one
core and starve the rest. This module stays ``__main__`` while vLLM runs, so the EngineCore
and Worker that vLLM spawns re-import it and take the shims too. Nothing installed is edited;
KVPROF_DEMO_NIXL_SHIMS=none runs vLLM as it is.
"""

from __future__ import annotations

import runpy
import sys

from demo.dynamo import shims

# Every process: this launcher and each spawn child that re-imports it.
shims.install_process_shims()

ENTRY = "vllm.entrypoints.openai.api_server"

if __name__ == "__main__":
    sys.argv = [ENTRY, *sys.argv[1:]]
    runpy.run_module(ENTRY, run_name="__main__", alter_sys=False)
