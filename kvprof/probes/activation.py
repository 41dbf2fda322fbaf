"""Turn the probes on in this process when (and only when) the environment asks for it."""

from __future__ import annotations

import logging
import os

from kvprof.probes.config import ProbeConfig

log = logging.getLogger(__name__)


def activate(config: ProbeConfig | None = None) -> bool:
    """Instrument vLLM (now or at its import) if KVPROF_ENABLED is set; True if active.

    Safe to call from a sitecustomize, the vllm.general_plugins entry point, or both: the
    second call finds the instrumentor already active. Never raises.
    """
    try:
        cfg = config or ProbeConfig.from_env()
        if not cfg.enabled:
            return False
        from kvprof.probes.instrumentor import get_instrumentor
        from kvprof.probes.recorder import get_recorder

        instrumentor = get_instrumentor()
        if not instrumentor.is_instrumented:
            recorder = get_recorder(cfg)
            instrumentor.instrument(emit=recorder.emit)
        return instrumentor.is_instrumented
    except Exception:  # a probe must never stop the host program from starting
        log.warning("kvprof: probes could not be activated in pid %s", os.getpid(),
                    exc_info=True)
        return False
