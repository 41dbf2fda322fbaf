"""The vllm.general_plugins entry point: vLLM calls register() in every engine process."""

from __future__ import annotations


def register() -> None:
    """Activate the probes if KVPROF_ENABLED is set; a plain install changes nothing."""
    from kvprof.probes.activation import activate

    activate()
