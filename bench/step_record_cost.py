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

The buffer is drained every --drain-every steps outside the timed loop, as the recorder's
export thread does every flush interval (0.5 s: 500 steps of a 1 ms engine step, fewer of
real ones; at the drain the export thread, not the engine, frees the SchedulerOutputs the
records keep). --drain-every 0 keeps a whole round's records (20,000 steps' SchedulerOutputs,
tens of MB) alive as the first version of this bench did: that measures the page faults and
garbage-collector passes of an ever-growing heap, which no engine sees.

    .venv/bin/python bench/step_record_cost.py [--steps 20000] [--rounds 15] [--drain-every 500]
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


def _hooks_before(rev: str = BEFORE):
    """The scheduler probes as they were at commit `rev` (None without git)."""
    import subprocess
    import types

    try:
        src = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "show",
                              f"{rev}:kvprof/probes/hooks.py"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    mod = types.ModuleType(f"kvprof_hooks_{rev}")
    exec(compile(src, "hooks_before.py", "exec"), mod.__dict__)
    return mod


def _run(sched: Scheduler, steps: int, mro, drain, every: int) -> tuple[int, int]:
    """CPU and wall ns of `steps` steps; drain() (the export thread's job) runs untimed
    after every `every` steps (0: at the end only)."""
    every = every or steps
    cpu = wall = 0
    done = 0
    while done < steps:
        n = min(every, steps - done)
        t_cpu, t_wall = time.thread_time_ns(), time.perf_counter_ns()
        for _ in range(n):
            so = sched.schedule()
            sched.update_from_output(so, mro)
        cpu += time.thread_time_ns() - t_cpu
        wall += time.perf_counter_ns() - t_wall
        drain()
        done += n
    return cpu, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20000, help="steps per round")
    ap.add_argument("--rounds", type=int, default=15, help="alternating rounds")
    ap.add_argument("--drain-every", type=int, default=500,
                    help="steps between drains of the buffer, as the export thread's flush "
                         "(0: once per round)")
    ap.add_argument("--also", action="append", default=[], metavar="REV",
                    help="also run the scheduler probes of this git revision (e.g. HEAD, to "
                         "compare a change side by side); repeatable")
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
    extra = {}
    for rev in args.also:
        mod = _hooks_before(rev)
        if mod is None:
            sys.exit(f"Error: cannot read kvprof/probes/hooks.py at {rev} with git")
        cls = type(f"At_{rev}", (Scheduler,), {})
        for name in ("schedule", "update_from_output"):
            inst._wrap(cls, name, getattr(mod, "scheduler_" + name), f"bench.{rev}.{name}")
        variants[rev] = cls()
        extra[rev] = mod
    buf: deque = deque()
    hooks.set_emit(buf.append)
    for mod in (old, *extra.values()):
        if mod is not None:
            mod.set_emit(buf.append)
    mro = NS(kv_connector_output=None)
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    # Interleaved chunk by chunk (one drain interval each), the order rotating, so that every
    # variant meets the same moments of the machine's load.
    every = args.drain_every or args.steps
    names = list(variants)
    try:
        for s in variants.values():
            _run(s, 2000, mro, buf.clear, every)  # warm-up
        for r in range(args.rounds):
            for c in range(max(1, args.steps // every)):
                k = (r + c) % len(names)
                for name in names[k:] + names[:k]:
                    cpu, wall = _run(variants[name], every, mro, buf.clear, every)
                    res[name].append((cpu / every, wall / every))
    finally:
        hooks.set_emit(None)
        hooks.reset_state()
        for mod in (old, *extra.values()):
            if mod is not None:
                mod.set_emit(None)
                mod.reset_state()
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
    for rev in extra:
        print(f"step record at {rev}: {med[rev][0] - med['before'][0]:8.0f} ns CPU  "
              f"{med[rev][1] - med['before'][1]:8.0f} ns wall per step (today's: "
              f"{step_cpu:.0f} ns CPU; today / {rev}: "
              f"{step_cpu / max(1.0, med[rev][0] - med['before'][0]):.2f})")


if __name__ == "__main__":
    main()
