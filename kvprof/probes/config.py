"""Probe configuration, read from the environment the attach launcher (or a pod spec) sets."""

from __future__ import annotations

import os
from dataclasses import dataclass

from kvprof import semconv

EXPORTERS = ("otlp", "file", "console", "none")
ENV_STATS_DIR = "KVPROF_STATS_DIR"  # where each process leaves its span counts for the launcher
ENV_FILE_MAX_BYTES = "KVPROF_FILE_MAX_BYTES"
ENV_FLUSH_INTERVAL = "KVPROF_FLUSH_INTERVAL"
DEFAULT_FILE_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ProbeConfig:
    """Everything a probed process needs to know; immutable once read."""

    enabled: bool
    exporter: str = "file"
    output: str = "out/traces"
    role: str = "auto"
    service_name: str | None = None
    stats_dir: str | None = None
    file_max_bytes: int = DEFAULT_FILE_MAX_BYTES
    flush_interval_s: float = 0.5

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ProbeConfig:
        e = os.environ if env is None else env
        enabled = e.get(semconv.ENV_ENABLED, "").strip().lower() in ("1", "true", "yes", "on")
        exporter = e.get(semconv.ENV_EXPORTER, "file").strip().lower() or "file"
        if exporter not in EXPORTERS:
            exporter = "none"
        try:
            max_bytes = int(e.get(ENV_FILE_MAX_BYTES, DEFAULT_FILE_MAX_BYTES))
        except ValueError:
            max_bytes = DEFAULT_FILE_MAX_BYTES
        try:
            interval = float(e.get(ENV_FLUSH_INTERVAL, "0.5"))
        except ValueError:
            interval = 0.5
        return cls(
            enabled=enabled,
            exporter=exporter,
            output=e.get(semconv.ENV_OUTPUT, "out/traces"),
            role=(e.get(semconv.ENV_ROLE, "auto").strip().lower() or "auto"),
            service_name=e.get(semconv.ENV_SERVICE_NAME) or None,
            stats_dir=e.get(ENV_STATS_DIR) or None,
            file_max_bytes=max(4096, max_bytes),
            flush_interval_s=max(0.01, interval),
        )
