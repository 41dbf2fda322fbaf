"""Command lines and environments of the demo's vLLM servers, each under `kvprof attach`."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from demo.limits import engine_limit_args
from kvprof.cpu_quirks import PORTABLE_DTYPE

SERVED_MODEL_NAME = "tiny"

# On CPU the KV block size must be a multiple of 32 (shared/context/vllm-on-cpu.md).
BLOCK_SIZE = 32
MAX_MODEL_LEN = 2048
# GiB of DRAM per engine for the KV cache; three engines x about 3 GB RSS fit in 24 GiB.
KV_CACHE_GIB = 1


@dataclass(frozen=True)
class ServerSpec:
    """One vLLM OpenAI server: its name, port, role and the cores its compute is pinned to."""

    name: str  # also the log name and the OTel service.name
    port: int
    role: str  # "aggregated" | "prefill" | "decode"
    cores: str  # VLLM_CPU_OMP_THREADS_BIND, e.g. "0" or "0-1"
    side_channel_port: int | None = None  # NIXL handshake listener (disagg only)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def kv_transfer_config(role: str) -> str:
    """NixlConnector over UCX in DRAM: prefill produces the KV, decode pulls it."""
    kv_role = {"prefill": "kv_producer", "decode": "kv_consumer"}[role]
    return json.dumps(
        {"kv_connector": "NixlConnector", "kv_role": kv_role, "kv_buffer_device": "cpu"}
    )


def vllm_argv(spec: ServerSpec, model_dir: Path, python: str = sys.executable) -> list[str]:
    """`python -m vllm.entrypoints.openai.api_server ...` (`vllm serve` fails in vllm-cpu),
    through demo/launch_vllm.py for the NIXL shims the two engines need on two cores."""
    argv = [
        python, "-m", "demo.launch_vllm",
        "--model", str(model_dir),
        "--served-model-name", SERVED_MODEL_NAME,
        "--host", "127.0.0.1",
        "--port", str(spec.port),
        "--max-model-len", str(MAX_MODEL_LEN),
        "--block-size", str(BLOCK_SIZE),
        # bf16 NIXL decode engines die with SIGILL on AMX CPUs (kvprof/cpu_quirks.py);
        # float16 serves on every x86-64 CPU, with or without AMX.
        "--dtype", PORTABLE_DTYPE,
        # Small enough that the demo's top level queues (demo/limits.py).
        *engine_limit_args(),
        # torch.compile warm-up doubles engine start on 2 cores and the tiny model gains
        # nothing from it; eager keeps the demo near its 5-minute budget.
        "--enforce-eager",
        # Every request must really prefill and really move its KV, not hit a cached prefix.
        "--no-enable-prefix-caching",
        "--uvicorn-log-level", "warning",
    ]
    if spec.role in ("prefill", "decode"):
        argv += ["--kv-transfer-config", kv_transfer_config(spec.role)]
    return argv


def vllm_env(spec: ServerSpec) -> dict[str, str]:
    """Everything on loopback, compute pinned to spec.cores (vllm-on-cpu.md, "Engines")."""
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB),
        "VLLM_CPU_OMP_THREADS_BIND": spec.cores,
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
        "UCX_NET_DEVICES": "lo",
        # No hub look-ups: the model is a local folder.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if spec.side_channel_port is not None:
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(spec.side_channel_port)
    return env


def attach_argv(
    inner: list[str], trace_dir: Path, service_name: str, role: str,
    python: str = sys.executable,
) -> list[str]:
    """Wrap a command in `kvprof attach --exporter file` so its processes write OTLP files."""
    return [
        python, "-m", "kvprof", "attach",
        "--exporter", "file",
        "--output", str(trace_dir),
        "--service-name", service_name,
        "--role", role,
        "--", *inner,
    ]


def attach_role(spec: ServerSpec) -> str:
    """kvprof attach's --role: prefill / decode for the pair, auto for the aggregated one."""
    return spec.role if spec.role in ("prefill", "decode") else "auto"
