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
* The CPUID test says nothing about that permission, and the kernels do not ask for it: in
  ``vllm/_C.abi3.so`` the AMX instantiations of ``cpu_attention::AttentionMainLoop`` (OpenMP
  bodies) execute ``ldtilecfg`` directly, and the one ``arch_prctl`` request for XTILEDATA
  (``syscall(158, 0x1023, 18)``) in that library sits inside the bundled oneDNN's
  ``amx::is_available()``, which runs when oneDNN checks for its own AMX kernels. So vLLM's
  attention relies on something else in the process having asked first. Inferred, not
  observed: in the crashing worker nothing had, by the time of its first step over loaded
  KV; a plain bf16 engine (its warm-up and matmuls go through oneDNN first) did. Ruled out
  with strace on a non-AMX CPU: creating a NIXL agent with the UCX backend installs no
  sigaltstack (a small one would make Linux refuse the permission with ENOSPC).
* What could not be done here: run on an AMX CPU, so the order of first AMX uses in the
  crashing worker is inferred, not observed. The workaround is what is known to work on
  both kinds of CPU: serve in float16 (a block size vLLM's AMX path does not take is not an
  option: the CPU backend wants multiples of 32).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

# The configuration the demo and the tests use on every x86-64 CPU, with or without AMX.
PORTABLE_DTYPE = "float16"
AMX_FLAG = "amx_tile"
# Where /proc is (a container with the host's mounted elsewhere; `kvprof check --proc`).
ENV_PROC = "KVPROF_PROC"


def cpu_flags(cpuinfo: str | Path | None = None) -> set[str]:
    """The first CPU's flags (empty when cpuinfo is unreadable); default
    $KVPROF_PROC/cpuinfo, else /proc/cpuinfo."""
    if cpuinfo is None:
        cpuinfo = Path(os.environ.get(ENV_PROC) or "/proc") / "cpuinfo"
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def has_amx(cpuinfo: str | Path | None = None) -> bool:
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
        """--dtype, or the model's own dtype for auto (its config.json: a local folder, or
        the Hugging Face cache's copy of a hub id; None when neither is readable)."""
        if self.dtype and self.dtype != "auto":
            return _normal_dtype(self.dtype)
        for config in _model_configs(self.model):
            try:
                doc = json.loads(config.read_text())
            except (OSError, ValueError):
                continue
            return _normal_dtype(str(doc.get("torch_dtype") or doc.get("dtype") or ""))
        return None


def _model_configs(model: str | None) -> list[Path]:
    """Where a model's config.json can be without a download: the folder itself, or the
    snapshots of a hub id ("Qwen/Qwen3-32B") in the Hugging Face cache."""
    if not model:
        return []
    if Path(model).is_dir():
        return [Path(model) / "config.json"]
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "hub")
    snapshots = Path(hub) / ("models--" + model.replace("/", "--")) / "snapshots"
    try:
        return sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime,
                      reverse=True)
    except OSError:
        return []


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


def parse_serve_argv(argv: list[str], env: dict[str, str] | None = None) -> ServeConfig:
    """dtype, model, block size and KV connector from a vLLM/Dynamo worker command line
    (``env``: the environment it runs in, for Dynamo's DYN_CONNECTOR; default this one)."""
    block = _option(argv, "--block-size")
    kv = _option(argv, "--kv-transfer-config")
    connector = None
    if kv:
        try:
            connector = json.loads(kv).get("kv_connector")
        except (ValueError, AttributeError):
            connector = "NixlConnector" if "Nixl" in kv else None
    else:
        # Dynamo before 1.6 named connectors instead: --connector nixl, or DYN_CONNECTOR.
        named = _option(argv, "--connector") or (os.environ if env is None else env).get(
            "DYN_CONNECTOR", "")
        if "nixl" in named.lower():
            connector = "NixlConnector"
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

