"""Run a Dynamo entry point after demo/dynamo/shims.py (no sitecustomize, no edited package).

This module stays ``__main__`` while Dynamo runs (runpy without alter_sys), so the processes
vLLM spawns (EngineCore, Worker) re-import it as ``__mp_main__`` and get the per-process
shims too (shims.install_process_shims, at import).

    python -m demo.dynamo.launch worker ARGS...    # = python -m dynamo.vllm ARGS...
    python -m demo.dynamo.launch frontend ARGS...  # = python -m dynamo.frontend ARGS...
    python -m demo.dynamo.launch check             # import everything, print versions (JSON)

Run from the repository root (or with it on PYTHONPATH) with .venv-dynamo's python.
"""

from __future__ import annotations

import json
import runpy
import sys

from demo.dynamo import shims

# Every process: the launcher itself and each spawn child that re-imports it.
shims.install_process_shims()

ENTRY_POINTS = {"worker": "dynamo.vllm", "frontend": "dynamo.frontend"}


def check() -> dict:
    """Import what the stack runs; the versions and the shims it took."""
    installed = shims.install()
    from importlib.metadata import version

    import dynamo.frontend.main  # noqa: F401
    import dynamo.vllm.main  # noqa: F401
    import vllm

    import kvprof  # noqa: F401

    return {
        "shims": installed,
        "vllm": vllm.__version__,
        **{name: version(name) for name in ("ai-dynamo", "ai-dynamo-runtime", "torch",
                                            "transformers", "pydantic", "nixl", "kvprof")},
    }


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*ENTRY_POINTS, "check"):
        sys.exit(__doc__)
    if argv[0] == "check":
        print(json.dumps(check()))
        return
    shims.install()
    module = ENTRY_POINTS[argv[0]]
    # As `python -m module ARGS`, except that this module stays sys.modules["__main__"]:
    # multiprocessing's spawn children then re-import it (not Dynamo's __main__), shims first.
    sys.argv = [module, *argv[1:]]
    runpy.run_module(f"{module}.__main__", run_name="__main__", alter_sys=False)


if __name__ == "__main__":
    main()
