"""Engine step records: ns added per EngineCore step by the scheduler probes, side by side.

A stand-in scheduler with the shape vLLM 0.32 calls (``schedule()`` returning a
SchedulerOutput-like object with ``num_scheduled_tokens``, ``update_from_output(so, mro)``,
``kv_cache_manager.block_pool.free_block_queue``, ``get_request_counts()``) runs steady decode
steps three ways, alternating in rounds so all share the machine's load: bare; probed by the
scheduler probes of commit fe62056 (before the step records: its hooks.py read with git);
probed by today's probes (the real installer, VllmInstrumentor._wrap, a real deque
recorder). Today minus before is what the step record (the vllm.engine.step tuple) adds.
Goal (issue 19): <= 1 us per step. Thread CPU time medians (a loaded 2-core machine
preempts us; CPU time leaves that out), wall beside it.

    .venv/bin/python bench/step_record_cost.py [--steps 20000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace as NS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Scheduler:
    """vLLM's Scheduler as the probes see it: 16 running decode requests."""

    def __init__(self) -> None:
        self.kv_cache_manager = NS(block_pool=NS(free_block_queue=NS(num_free_blocks=900),
                                                 num_gpu_blocks=1024))
        self.running = [object()] * 16
        self.waiting = []
        self.tokens = {f"cmpl-{i:04d}-0-abcdef12": 1 for i in range(16)}

    def get_request_counts(self) -> tuple[int, int]:
        return len(self.running), len(self.waiting)

    def schedule(self):
        return NS(scheduled_new_reqs=[], num_scheduled_tokens=dict(self.tokens),
                  total_num_scheduled_tokens=16, preempted_req_ids=None,
                  kv_connector_metadata=None)

    def update_from_output(self, scheduler_output, model_runner_output):
        return {}


BEFORE = "fe62056"  # the last commit without step records


def _hooks_before():
    """The scheduler probes as they were before the step records (None without git)."""
    import subprocess
    import types

    try:
        src = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "show",
                              f"{BEFORE}:kvprof/probes/hooks.py"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    mod = types.ModuleType("kvprof_hooks_before")
    exec(compile(src, "hooks_before.py", "exec"), mod.__dict__)
    return mod


def _run(sched: Scheduler, steps: int, mro) -> tuple[int, int]:
    t_cpu, t_wall = time.thread_time_ns(), time.perf_counter_ns()
    for _ in range(steps):
        so = sched.schedule()
        sched.update_from_output(so, mro)
    return time.thread_time_ns() - t_cpu, time.perf_counter_ns() - t_wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20000, help="steps per round")
    ap.add_argument("--rounds", type=int, default=15, help="alternating rounds")
    args = ap.parse_args()

    from kvprof.probes import hooks
    from kvprof.probes.instrumentor import VllmInstrumentor

    class Probed(Scheduler):
        pass

    class Before(Scheduler):
        pass

    inst = VllmInstrumentor()
    old = _hooks_before()
    variants = {"bare": Scheduler(), "probed": Probed()}
    for cls, mod in ((Probed, hooks), (Before, old)):
        if mod is None:
            continue
        for name in ("schedule", "update_from_output"):
            inst._wrap(cls, name, getattr(mod, "scheduler_" + name), f"bench.{name}")
    if old is not None:
        variants["before"] = Before()
    buf: deque = deque()
    hooks.set_emit(buf.append)
    if old is not None:
        old.set_emit(buf.append)
    mro = NS(kv_connector_output=None)
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    try:
        for s in variants.values():
            _run(s, 2000, mro)  # warm-up
        for _ in range(args.rounds):
            for name, s in variants.items():
                cpu, wall = _run(s, args.steps, mro)
                res[name].append((cpu / args.steps, wall / args.steps))
                buf.clear()  # the export thread's job; not part of the step
    finally:
        hooks.set_emit(None)
        hooks.reset_state()
        if old is not None:
            old.set_emit(None)
            old.reset_state()
    med = {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v))
           for k, v in res.items()}
    added_cpu = med["probed"][0] - med["bare"][0]
    added_wall = med["probed"][1] - med["bare"][1]
    print(f"bare step      : {med['bare'][0]:8.0f} ns CPU  {med['bare'][1]:8.0f} ns wall")
    print(f"probed step    : {med['probed'][0]:8.0f} ns CPU  {med['probed'][1]:8.0f} ns wall")
    print(f"all probes     : {added_cpu:8.0f} ns CPU  {added_wall:8.0f} ns wall per step "
          f"(ratio probed/bare {med['probed'][0] / med['bare'][0]:.2f})")
    if "before" not in med:
        print(f"before ({BEFORE}) not readable (no git): the step record alone is not "
              "separated")
        return
    step_cpu = med["probed"][0] - med["before"][0]
    step_wall = med["probed"][1] - med["before"][1]
    print(f"before {BEFORE} : {med['before'][0]:8.0f} ns CPU  {med['before'][1]:8.0f} ns wall")
    print(f"step record    : {step_cpu:8.0f} ns CPU  {step_wall:8.0f} ns wall per step "
          "(today - before; goal <= 1000 ns)")
    print("verdict        :", "OK" if step_cpu <= 1000 else "OVER the 1 us goal")


if __name__ == "__main__":
    main()
