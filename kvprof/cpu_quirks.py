"""Known CPU/vLLM combinations that crash, found on real machines, with their workaround.

AMX + bf16 + NixlConnector (vLLM 0.32 on CPU), issue 11. On a CPU with AMX tiles
(``amx_tile`` in /proc/cpuinfo: Sapphire Rapids and later), the NIXL *decode* engine's worker
died with SIGILL (exit code -4) on its first step after a KV load; the same engines in
float16, a bf16 engine without a connector (prefix-cache hits included) and a bf16
ExampleConnector pair all served fine. What the installed vLLM source shows:

* ``vllm/v1/attention/backends/cpu_attn.py::_get_attn_isa`` returns ``"amx"`` exactly when
  ``torch.cpu._is_amx_tile_supported()`` (a CPUID test) holds, the dtype is bfloat16 and
  ``block_size % 32 == 0``; float16 never takes that branch ("vec" kernels, AVX-512/AVX2).
  On CPU vLLM requires a block size that is a multiple of 32, so bf16 on an AMX CPU always
  runs the AMX attention kernels.
* Those kernels (``vllm/_C*.so``: ``init_tile_config``) execute AMX tile instructions, which
  Linux only allows after the process asked for the XTILEDATA state
  (``arch_prctl(ARCH_REQ_XCOMP_PERM)``); an AMX instruction without that permission, or whose
  tile configuration is not loaded in the executing thread, raises #UD, i.e. SIGILL.
* The CPUID test says nothing about that permission. Only the NIXL consumer crashes, on the
  first attention call over KV written by NIXL, after NIXL/UCX started its own threads and
  signal handling in the worker; the exact instruction could not be pinned down from the
  Python source (it is inside the compiled kernels), so the workaround is what is known to
  work on both kinds of CPU: serve in float16 (or pass a block size vLLM's AMX path does not
  take, which the CPU backend does not allow).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The configuration the demo and the tests use on every x86-64 CPU, with or without AMX.
PORTABLE_DTYPE = "float16"
AMX_FLAG = "amx_tile"


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The first CPU's flags (empty when /proc/cpuinfo is unreadable)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def has_amx(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU advertises AMX tiles (vLLM's CPU backend then picks AMX kernels)."""
    return AMX_FLAG in cpu_flags(cpuinfo)


@dataclass(frozen=True)
class ServeConfig:
    """The parts of a vLLM command line that decide whether the AMX crash applies."""

    dtype: str | None = None  # --dtype as given ("auto" or absent -> model's config)
    model: str | None = None
    block_size: int | None = None
    connector: str | None = None

    def effective_dtype(self) -> str | None:
        """--dtype, or the model's own dtype for auto (read from a local config.json)."""
        if self.dtype and self.dtype != "auto":
            return _normal_dtype(self.dtype)
        if self.model:
            config = Path(self.model) / "config.json"
            try:
                doc = json.loads(config.read_text())
            except (OSError, ValueError):
                return None
            return _normal_dtype(str(doc.get("torch_dtype") or doc.get("dtype") or ""))
        return None


def _normal_dtype(name: str) -> str:
    name = name.lower().removeprefix("torch.")
    return {"bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(name, name)


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def parse_serve_argv(argv: list[str]) -> ServeConfig:
    """dtype, model, block size and KV connector from a vLLM/Dynamo worker command line."""
    block = _option(argv, "--block-size")
    kv = _option(argv, "--kv-transfer-config")
    connector = None
    if kv:
        try:
            connector = json.loads(kv).get("kv_connector")
        except (ValueError, AttributeError):
            connector = "NixlConnector" if "Nixl" in kv else None
    model = _option(argv, "--model")
    if model is None and len(argv) > 2 and argv[1:3] == ["serve", argv[2]]:
        model = argv[2]  # `vllm serve MODEL`
    return ServeConfig(dtype=_option(argv, "--dtype"), model=model,
                       block_size=int(block) if block and block.isdigit() else None,
                       connector=connector)


def amx_bf16_nixl_warning(config: ServeConfig, amx: bool | None = None) -> str | None:
    """The warning for the AMX + bf16 + NixlConnector combination, else None."""
    if not (has_amx() if amx is None else amx):
        return None
    if config.connector is None or "nixl" not in config.connector.lower():
        return None
    if config.effective_dtype() != "bfloat16":
        return None
    if config.block_size is not None and config.block_size % 32 != 0:
        return None  # vLLM's AMX attention path needs block_size % 32 == 0
    return ("this CPU has AMX (amx_tile) and the engine serves bfloat16 with NixlConnector: "
            "vLLM 0.32's CPU backend runs its AMX attention kernels there, and the NIXL decode "
            "worker has died with SIGILL (exit -4) on its first step after a KV load. "
            f"Workaround: serve with --dtype {PORTABLE_DTYPE} (works with and without AMX).")


def warning_for_command(argv: list[str], amx: bool | None = None) -> str | None:
    """amx_bf16_nixl_warning for a command line (what `kvprof attach` is about to run)."""
    return amx_bf16_nixl_warning(parse_serve_argv(argv), amx)

