"""`kvprof attach --pid`: sample a running worker with py-spy and summarise each thread's phases.

py-spy's speedscope file holds one profile per thread, named ``Thread <tid> "<name>"``
(``tid`` the OS thread id, so the main thread's equals the pid), with one sample per
sampling instant at which the thread existed; its weights are seconds (1 / rate each), so
kvprof counts samples instead of adding weights, and never adds threads together: ten idle
threads are not ten times the wall time. With ``--idle`` every thread is sampled at every
instant, so a thread's samples in a phase divided by the number of instants is that
thread's share of wall time in the phase.

Files written to ``--output`` (stem ``pyspy-<pid>-<time>``):

- ``.speedscope.json``: py-spy's own file (open it in https://www.speedscope.app).
- ``.collapsed.txt``: collapsed stacks, ``thread <tid> "<name>";outer;...;inner <samples>``.
- ``.phases.txt``: the text table printed on stdout.
- ``.phases.json``::

    {"pid": 7502, "duration_s": 5.0, "rate_hz": 100,
     "sampling": {"tool": "py-spy@0.4.3", "mode": "blocking", "instants": 499,
                  "errors": 0, "max_lag_s": null, "wall_s": 5.3},
     "threads": [                      # main thread first, then busiest first
       {"tid": "7502", "name": "MainThread", "main": true, "runs_model": true,
        "idle": false, "entry": "WorkerProc.worker_main", "samples": 499,
        "wall_share": 1.0,             # samples / instants: how long the thread was seen
        "phases": {"model forward": {"samples": 210, "share": 0.421}, ...},  # all of PHASES
        "waits": [{"site": "MessageQueue.dequeue <- WorkerProc.worker_busy_loop",
                   "samples": 230, "share": 0.461}],
        "no_python_frames": 0},
       {"tid": "7581", "name": "DeathPipeMonitor", "main": false, "idle": true, ...}],
     "files": {"speedscope": "...", "collapsed": "...", "text": "..."}}

  ``share`` is always of the sampling instants (wall time), ``idle`` marks a thread that
  waited in at least 95 % of its samples, ``runs_model`` the thread with the most model
  forward samples, ``max_lag_s`` how far py-spy fell behind its rate (null when it never
  said so: it reports lags over 1 s; it then samples back to back until it has caught up),
  ``errors`` the stacks py-spy failed to read, ``wall_s`` how long py-spy ran.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvprof.errors import BadInputError, ResourceAbsentError
from kvprof.probes.phases import PHASE_IDLE, PHASE_MODEL_FORWARD, PHASES, Frame, summarize_thread

log = logging.getLogger(__name__)

PTRACE_HINT = (
    "py-spy needs ptrace rights on the target: run as the same user with "
    "/proc/sys/kernel/yama/ptrace_scope = 0 (sysctl kernel.yama.ptrace_scope=0), or as root; "
    "in a container add the SYS_PTRACE capability (securityContext.capabilities.add: "
    "[SYS_PTRACE], or docker run --cap-add SYS_PTRACE)."
)
IDLE_THREAD_SHARE = 0.95
_THREAD_LABEL = re.compile(r'^(?:Process \d+ )?Thread (\S+) "(.*)"$', re.S)
_LAG = re.compile(r"([\d.]+)\s*(ns|µs|us|ms|s) behind in sampling")
_UNIT_S = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}


@dataclass
class ThreadProfile:
    """One thread's samples from a speedscope file: each a stack, outermost frame first."""

    tid: str
    name: str
    stacks: list[list[Frame]] = field(default_factory=list)


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


def load_speedscope(path: Path) -> tuple[list[ThreadProfile], str | None]:
    """The threads of a py-spy speedscope file, each with its own samples, and its exporter
    (``py-spy@0.4.3``)."""
    try:
        doc = json.loads(Path(path).read_text())
        frames = [Frame(str(f.get("name", "?")), str(f.get("file") or "?"),
                        int(f.get("line") or 0)) for f in doc["shared"]["frames"]]
        threads = []
        for prof in doc.get("profiles", []):
            label = str(prof.get("name", ""))
            m = _THREAD_LABEL.match(label)
            tid, name = (m.group(1), m.group(2)) if m else ("?", label)
            stacks = [[frames[i] for i in sample] for sample in prof.get("samples", [])]
            threads.append(ThreadProfile(tid, name, stacks))
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise BadInputError(f"{path} is not a py-spy speedscope file: {exc}",
                            hint="Record it with py-spy record --format speedscope.") from exc
    return threads, doc.get("exporter")


def write_collapsed(threads: list[ThreadProfile], path: Path) -> None:
    """Brendan Gregg's collapsed-stack format, one root frame per thread, sample counts."""
    counts: dict[str, int] = {}
    for thread in threads:
        root = f'thread {thread.tid} "{thread.name}"'
        for frames in thread.stacks:
            key = ";".join([root, *map(str, frames)])
            counts[key] = counts.get(key, 0) + 1
    _write_atomic(path, "".join(f"{k} {v}\n" for k, v in sorted(counts.items())))


def summarize_profile(threads: list[ThreadProfile], pid: int, duration: float, rate: int,
                      errors: int = 0, max_lag_s: float | None = None,
                      wall_s: float | None = None, tool: str | None = None) -> dict:
    """The per-thread summary that phases.json holds (see the module docstring)."""
    instants = max((len(t.stacks) for t in threads), default=0)
    per = max(instants, 1)
    rows = []
    for thread in threads:
        s = summarize_thread(thread.stacks)
        n = s["samples"]
        rows.append({
            "tid": thread.tid, "name": thread.name,
            "main": thread.name == "MainThread" or thread.tid == str(pid),
            "runs_model": False,
            "idle": n > 0 and s["phases"][PHASE_IDLE] >= IDLE_THREAD_SHARE * n,
            "entry": s["entry"], "samples": n, "wall_share": round(n / per, 4),
            "phases": {p: {"samples": c, "share": round(c / per, 4)}
                       for p, c in s["phases"].items()},
            "waits": [dict(w, share=round(w["samples"] / per, 4)) for w in s["waits"]],
            "no_python_frames": s["no_python_frames"],
        })
    model = max(rows, key=lambda r: r["phases"][PHASE_MODEL_FORWARD]["samples"], default=None)
    if model and model["phases"][PHASE_MODEL_FORWARD]["samples"] > 0:
        model["runs_model"] = True

    def busy(r: dict) -> int:
        return r["samples"] - r["phases"][PHASE_IDLE]["samples"]

    rows.sort(key=lambda r: (not r["main"], not r["runs_model"], r["idle"], -busy(r),
                             int(r["tid"]) if r["tid"].isdigit() else 0, r["name"]))
    return {"pid": pid, "duration_s": duration, "rate_hz": rate,
            "sampling": {"tool": tool, "mode": "blocking", "instants": instants,
                         "errors": errors, "max_lag_s": max_lag_s, "wall_s": wall_s},
            "threads": rows}


def render_table(summary: dict) -> str:
    """The per-thread phase summary as fixed-width text, main thread first."""
    sampling = summary["sampling"]
    instants = sampling["instants"]
    wall = f" in {sampling['wall_s']:.1f} s" if sampling.get("wall_s") else ""
    n = len(summary["threads"])
    lines = [f"pid {summary['pid']}: {n} thread{'' if n == 1 else 's'}, {instants} sampling "
             f"instants{wall} (py-spy at {summary['rate_hz']} Hz); "
             f"share = samples / instants (wall time)"]
    if sampling.get("max_lag_s"):
        lines.append(f"warning: py-spy fell up to {sampling['max_lag_s']:.1f} s behind its "
                     "rate (a loaded machine) and caught up with back-to-back samples: "
                     "shares lean towards those moments")
    if sampling.get("errors"):
        lines.append(f"warning: py-spy failed to read {sampling['errors']} stack(s)")
    for t in summary["threads"]:
        tags = [tag for tag, on in (("main", t["main"]), ("runs the model", t["runs_model"]),
                                    ("idle", t["idle"])) if on]
        entry = f", entry {t['entry']}" if t["entry"] else ""
        head = f"{t['name'] or '(unnamed)'} (tid {t['tid']})"
        head += f" [{', '.join(tags)}]" if tags else ""
        if t["idle"] and not t["main"]:
            idle = t["phases"][PHASE_IDLE]
            lines.append(f"{head}: {t['samples']} samples, {PHASE_IDLE} "
                         f"{idle['samples']} ({idle['share']:.1%}){entry}")
        else:
            lines.append(f"{head}: {t['samples']} samples{entry}")
            lines.append(f"  {'phase':<22} {'samples':>8} {'share':>7}")
            for phase in PHASES:
                p = t["phases"][phase]
                lines.append(f"  {phase:<22} {p['samples']:>8} {p['share']:>7.1%}")
        for w in t["waits"][:3]:
            lines.append(f"  waits in {w['site']}: {w['samples']} ({w['share']:.1%})")
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _pyspy_report(text: str) -> tuple[int, float | None]:
    """(errors, largest lag in s or None) from what py-spy printed."""
    m = re.search(r"Errors: (\d+)", text)
    lags = [float(v) * _UNIT_S[u] for v, u in _LAG.findall(text)]
    return (int(m.group(1)) if m else 0), (round(max(lags), 2) if lags else None)


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
    # Blocking mode (py-spy pauses the target for each read): with --nonblocking py-spy
    # loses the stacks that change while it reads them, and those are the busy ones. On a
    # loaded vLLM worker it kept 13-22 % model forward where blocking reads saw 45-60 %.
    # --idle keeps threads that sleep, so every thread has a sample at every instant.
    cmd = [pyspy, "record", "--pid", str(pid), "--duration", str(max(1, round(duration))),
           "--rate", str(rate), "--format", "speedscope", "--output", str(speedscope),
           "--idle"]
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120)
    except subprocess.TimeoutExpired as exc:
        raise ResourceAbsentError(f"py-spy did not finish sampling pid {pid}",
                                  hint="Try a lower --rate on a loaded machine.") from exc
    wall_s = round(time.monotonic() - started, 2)
    if proc.returncode != 0 or not speedscope.exists():
        raise _classify_error(proc.stderr + proc.stdout, pid)
    threads, tool = load_speedscope(speedscope)
    if not any(t.stacks for t in threads):
        raise BadInputError(f"py-spy recorded no samples of pid {pid}",
                            hint="Sample longer (--duration) or check the process is busy.")
    errors, max_lag_s = _pyspy_report(proc.stdout + proc.stderr)
    summary = summarize_profile(threads, pid, duration, rate, errors=errors,
                                max_lag_s=max_lag_s, wall_s=wall_s, tool=tool)
    collapsed = stem.with_suffix(".collapsed.txt")
    text_path = stem.with_suffix(".phases.txt")
    json_path = stem.with_suffix(".phases.json")
    summary["files"] = {"speedscope": str(speedscope), "collapsed": str(collapsed),
                        "text": str(text_path)}
    write_collapsed(threads, collapsed)
    table = render_table(summary)
    _write_atomic(json_path, json.dumps(summary, indent=2) + "\n")
    _write_atomic(text_path, table + "\n")
    sys.stdout.write(table + "\n")
    sys.stderr.write(f"kvprof: wrote {speedscope} (open in https://www.speedscope.app) and "
                     f"{json_path}\n")
    return 0
