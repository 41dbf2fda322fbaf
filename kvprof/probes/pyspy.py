"""`kvprof attach --pid`: sample a running worker with py-spy and summarise its phases."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

from kvprof.errors import BadInputError, ResourceAbsentError
from kvprof.probes.phases import PHASES, summarize_phases

log = logging.getLogger(__name__)

PTRACE_HINT = (
    "py-spy needs ptrace rights on the target: run as the same user with "
    "/proc/sys/kernel/yama/ptrace_scope = 0 (sysctl kernel.yama.ptrace_scope=0), or as root; "
    "in a container add the SYS_PTRACE capability (securityContext.capabilities.add: "
    "[SYS_PTRACE], or docker run --cap-add SYS_PTRACE)."
)


def find_pyspy() -> str:
    """The py-spy binary next to this Python, else on PATH."""
    here = Path(sys.executable).parent / "py-spy"
    if here.exists():
        return str(here)
    found = shutil.which("py-spy")
    if not found:
        raise ResourceAbsentError("py-spy is not installed",
                                  hint="pip install py-spy (it is a kvprof dependency).")
    return found


def load_speedscope(path: Path) -> list[tuple[list[str], float]]:
    """(frames outermost first, weight) for every sample of every profile in the file."""
    doc = json.loads(path.read_text())
    frames = doc["shared"]["frames"]
    names = [f"{f.get('name', '?')} ({f.get('file', '?')}:{f.get('line', 0)})" for f in frames]
    out = []
    for prof in doc.get("profiles", []):
        weights = prof.get("weights") or [1.0] * len(prof.get("samples", []))
        for sample, w in zip(prof.get("samples", []), weights, strict=False):
            out.append(([names[i] for i in sample], float(w)))
    return out


def write_collapsed(samples: list[tuple[list[str], float]], path: Path) -> None:
    """Brendan Gregg's collapsed-stack format (flamegraph.pl, speedscope, inferno)."""
    counts: dict[str, float] = {}
    for frames, w in samples:
        key = ";".join(frames)
        counts[key] = counts.get(key, 0.0) + w
    path.write_text("".join(f"{k} {int(v)}\n" for k, v in sorted(counts.items())))


def render_table(totals: dict[str, float]) -> str:
    """The phase summary as a fixed-width text table."""
    total = sum(totals.values()) or 1.0
    lines = [f"{'phase':<22} {'samples':>8} {'share':>7}"]
    for phase in PHASES:
        lines.append(f"{phase:<22} {int(totals[phase]):>8} {totals[phase] / total:>7.1%}")
    return "\n".join(lines)


def _classify_error(stderr: str, pid: int) -> Exception:
    text = stderr.lower()
    if "permission denied" in text or "operation not permitted" in text:
        return ResourceAbsentError(f"not permitted to sample pid {pid}", hint=PTRACE_HINT)
    if "no such process" in text or "failed to open process" in text:
        return BadInputError(f"no process with pid {pid}", hint="Check the PID (ps, pgrep).")
    if "python version" in text or "failed to find python" in text:
        return BadInputError(f"pid {pid} does not look like a Python process",
                             hint="Point --pid at a vLLM worker or EngineCore process.")
    first = stderr.strip().splitlines()[-1] if stderr.strip() else "unknown error"
    return ResourceAbsentError(f"py-spy could not sample pid {pid}: {first}", hint=PTRACE_HINT)


def sample_process(pid: int, duration: float, rate: int, output: Path) -> int:
    """Sample ``pid`` for ``duration`` s; write speedscope, collapsed and phase files."""
    pyspy = find_pyspy()
    output.mkdir(parents=True, exist_ok=True)
    stem = output / f"pyspy-{pid}-{time.strftime('%Y%m%dT%H%M%S')}"
    speedscope = stem.with_suffix(".speedscope.json")
    # One banner line, like py-spy's own.
    sys.stderr.write(f"kvprof: sampling pid {pid} for {duration:g}s at {rate} Hz with py-spy\n")
    cmd = [pyspy, "record", "--pid", str(pid), "--duration", str(max(1, round(duration))),
           "--rate", str(rate), "--format", "speedscope", "--output", str(speedscope),
           "--idle", "--nonblocking"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120)
    if proc.returncode != 0 or not speedscope.exists():
        raise _classify_error(proc.stderr + proc.stdout, pid)
    samples = load_speedscope(speedscope)
    if not samples:
        raise BadInputError(f"py-spy recorded no samples of pid {pid}",
                            hint="Sample longer (--duration) or check the process is busy.")
    write_collapsed(samples, stem.with_suffix(".collapsed.txt"))
    totals = summarize_phases(samples)
    table = render_table(totals)
    summary = {"pid": pid, "duration_s": duration, "rate_hz": rate,
               "samples": sum(totals.values()), "phases": totals,
               "speedscope": str(speedscope)}
    stem.with_suffix(".phases.json").write_text(json.dumps(summary, indent=2))
    stem.with_suffix(".phases.txt").write_text(table + "\n")
    sys.stdout.write(table + "\n")
    sys.stderr.write(f"kvprof: wrote {speedscope} (open in https://www.speedscope.app) and "
                     f"{stem.with_suffix('.phases.json')}\n")
    return 0
