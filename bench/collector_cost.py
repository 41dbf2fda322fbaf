"""CPU cost of the collector on a big node: 8 GPUs x 18 NVLink links, 8 IB ports, host, NICs.

The NVML calls go to the fake NVML (tests/collectors/fake_nvml.py, replaying the recorded
A100 values): it journals every call a tick makes, and the same calls are replayed alone
and timed, so "kvprof only" = the tick's CPU time minus the fake library's (the goal counts
everything but the NVML library calls). The 8 IB ports are the recorded mlx5 sysfs fixture
replicated into a temp tree; host CPU/memory and NIC bytes are this machine's.

Three configurations run side by side, interleaved round by round so load on a shared
machine hits them alike: the samplers alone, + the Prometheus sink (what a tick does for
/metrics: keep the latest set; rendering happens on scrape and is priced separately), and
+ the Parquet sink (row groups every FLUSH_ROWS rows; the file's close + rename is priced
per 60 s file). CPU time is time.process_time (all threads, user + system: the sysfs and
procfs reads are kvprof's cost). Per configuration: the median over the rounds and the
least-disturbed round (min; on a shared machine other processes only ever add time, as
timeit's documentation says), with the machine's load average printed alongside.
Goal: <= 1 % of one core at 10 Hz, NVML library calls excluded.

A fourth configuration adds the schedstat sampler (CPU waits per thread,
kvprof/collectors/schedstat.py) watching a disaggregated serving node's processes, spawned
here as real processes: 4 engine processes (API server + EngineCore, prefill and decode) of
64 threads with 8 active each, a router of 8 threads (2 active), a load generator of 4
processes x 6 threads (1 active); an active thread wakes every 2 ms. The ticks of every
configuration are TICK_GAP_S apart (sleeping, not counted as CPU), so the watched threads
move between two ticks as they would between two 100 ms ticks. The difference between the
third and the fourth configuration is what schedstat sampling costs, side by side in one run.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "collectors"))

from fake_nvml import FakeNvml, parse_nvidia_smi_xml, replay, replicate  # noqa: E402

from kvprof.collectors.daemon import CollectorLoop, Scheduled, build_samplers  # noqa: E402
from kvprof.collectors.parquet_sink import FLUSH_S, ParquetSink  # noqa: E402
from kvprof.collectors.prometheus_sink import LatestSamplesCollector, render_text  # noqa: E402
from kvprof.collectors.schedstat import SchedstatSampler  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures" / "collectors"
ROUNDS = 30
# Ticks per round and configuration: 5 s at 10 Hz, so each round holds the 1 Hz samplers
# 5 times and the Parquet sink's row group once, as in real time (FLUSH_S).
TICKS = 50
INTERVAL_S = 0.1
SCRAPE_EVERY_S = 15.0  # Prometheus' default scrape interval
ROTATE_S = 60.0  # kvprof collect's default file length
GOAL_PCT = 1.0
WITH_SCHEDSTAT = "+ Prom + Parquet + schedstat"
TICK_GAP_S = 0.003
WATCH_MARK = "kvprof-bench-watched"
# (processes, threads each, active threads each) of the watched serving node
WATCHED = ((4, 64, 8), (1, 8, 2), (4, 6, 1))
_WATCHED_CODE = """
import sys, threading, time
threads, active = int(sys.argv[2]), int(sys.argv[3])
stop = threading.Event()
def busy():
    while not stop.is_set():
        time.sleep(0.002)
        sum(range(200))
for i in range(threads - 1):
    threading.Thread(target=busy if i < active else stop.wait, daemon=True).start()
sys.stdin.read()
"""


def spawn_watched() -> list[subprocess.Popen]:
    """The serving node's processes the schedstat sampler watches (until stdin closes)."""
    procs = []
    for count, threads, active in WATCHED:
        for _ in range(count):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", _WATCHED_CODE, WATCH_MARK, str(threads), str(active)],
                stdin=subprocess.PIPE))
    time.sleep(1.0)  # every thread started
    return procs


def ib_tree_with_8_ports(root: Path) -> Path:
    src = FIXTURES / "sysfs_ib" / "class" / "infiniband" / "mlx5_0"
    for i in range(8):
        shutil.copytree(src, root / "class" / "infiniband" / f"mlx5_{i}")
    return root


def fake_nvml() -> FakeNvml:
    gpus = parse_nvidia_smi_xml(FIXTURES / "nvidia" / "telegraf_nvidia_smi_a100-sxm4-v12.xml")
    return FakeNvml(replicate(gpus, 8), nvlink_links=18, nvlink_kib_per_s=5e6)


def pct(seconds_per_tick: float) -> float:
    """Share of one core at 10 Hz, in percent."""
    return seconds_per_tick / INTERVAL_S * 100


def spread(values: list[float], scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    return (fmt.format(statistics.median(values) * scale) + " [" + fmt.format(min(values) * scale)
            + "-" + fmt.format(max(values) * scale) + "]")


def schedstat_at(rev: str):
    """kvprof/collectors/schedstat.py as it was at git revision `rev`, as a module."""
    import importlib.util

    src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:kvprof/collectors/schedstat.py"],
                         capture_output=True, text=True, check=True).stdout
    name = f"schedstat_at_{rev}".replace("~", "_").replace("^", "_")
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    exec(compile(src, f"schedstat@{rev}", "exec"), mod.__dict__)
    return mod


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--also", metavar="REV", help="a 5th configuration: the schedstat sampler "
                    "as it was at this git revision (e.g. HEAD), side by side with today's")
    args = ap.parse_args()
    old = schedstat_at(args.also) if args.also else None
    watched = spawn_watched()
    try:
        run(watched, old, args.also)
        if old is not None:
            sampler_side_by_side(old, args.also)
    finally:
        for proc in watched:
            proc.kill()
            proc.wait()


def sampler_side_by_side(old, rev: str, rounds: int = 40, ticks: int = 40) -> None:  # noqa: ANN001
    """The schedstat sampler alone, today's and `rev`'s, watching the same spawned node,
    round by round in alternating order: a direct ratio, without the rest of the collector
    (whose noise the difference of two configurations above carries)."""
    samplers = {"today": SchedstatSampler(watch_attach=False, watch_names=[WATCH_MARK],
                                          interval_s=INTERVAL_S),
                rev: old.SchedstatSampler(watch_attach=False, watch_names=[WATCH_MARK],
                                          interval_s=INTERVAL_S)}
    for sampler in samplers.values():
        for _ in range(TICKS):
            sampler.sample()
            time.sleep(TICK_GAP_S)
    spent: dict[str, list[float]] = {name: [] for name in samplers}
    names = list(samplers)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            sampler = samplers[name]
            start = time.process_time()
            for _ in range(ticks):
                sampler.sample()
                time.sleep(TICK_GAP_S)
            spent[name].append((time.process_time() - start) / ticks)
    med = {k: statistics.median(v) for k, v in spent.items()}
    least = {k: min(v) for k, v in spent.items()}
    print(f"schedstat sampler alone, today vs {rev}, {rounds} alternating rounds x {ticks} "
          f"ticks (load average {os.getloadavg()[0]:.1f}): median {med['today'] * 1e3:.3f} vs "
          f"{med[rev] * 1e3:.3f} ms CPU/tick ({pct(med['today']):.3f} vs {pct(med[rev]):.3f} "
          f"% of a core; ratio {med['today'] / med[rev]:.2f}), least-disturbed "
          f"{least['today'] * 1e3:.3f} vs {least[rev] * 1e3:.3f} (ratio "
          f"{least['today'] / least[rev]:.2f})")


def run(watched: list[subprocess.Popen], old=None, rev: str | None = None) -> None:  # noqa: ANN001
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        sysfs = ib_tree_with_8_ports(tmp_path / "sys")
        fake = fake_nvml()
        schedule, _ = build_samplers(sysfs=sysfs, nvml=fake, kubelet_socket=None, node="bench")
        # Placement runs every 5 s and asks the kubelet and the API server: not a per-tick cost.
        # The schedstat sampler is priced on its own below, watching the spawned processes.
        schedule = [s for s in schedule if s.sampler.name not in ("placement", "schedstat")]
        schedstat = SchedstatSampler(watch_attach=False, watch_names=[WATCH_MARK],
                                     interval_s=INTERVAL_S)
        latest = LatestSamplesCollector()
        parquet = ParquetSink(tmp_path / "out", "bench", rotate_s=3600)
        configs = {
            "samplers only": [],
            "+ Prometheus": [lambda r, _s: latest.update(r)],
            "+ Prometheus + Parquet": [lambda r, _s: latest.update(r),
                                       lambda r, s: parquet.write(r, sticky=s)],
            WITH_SCHEDSTAT: [lambda r, _s: latest.update(r),
                             lambda r, s: parquet.write(r, sticky=s)],
        }
        extra = {WITH_SCHEDSTAT: schedstat}
        if old is not None:
            at = f"  same, schedstat@{rev}"
            configs[at] = configs[WITH_SCHEDSTAT]
            extra[at] = old.SchedstatSampler(watch_attach=False, watch_names=[WATCH_MARK],
                                             interval_s=INTERVAL_S)
        loops = {name: CollectorLoop(list(schedule) + ([Scheduled(extra[name])]
                                                       if name in extra else []),
                                     INTERVAL_S, sinks)
                 for name, sinks in configs.items()}
        k = 0
        rows = 0
        for loop in loops.values():  # warm up: discovery, imports, caches, the first file
            rows = 0
            for _ in range(TICKS):
                fake.advance(INTERVAL_S)
                # a Parquet row per sample and per no-data, and 2 self-metric rows per set
                rows += sum(r.sample_count() + len(r.no_data) + 2 for r in loop.tick(k))
                k += 1
        # The ticks run back to back here, not 100 ms apart: "a row group every FLUSH_S of
        # sample time" becomes "a row group every FLUSH_S worth of rows".
        assert TICKS * INTERVAL_S == FLUSH_S
        parquet.flush_rows, parquet.flush_s = rows, math.inf
        total: dict[str, list[float]] = {name: [] for name in configs}
        library: dict[str, list[float]] = {name: [] for name in configs}
        samples = 0
        for _ in range(ROUNDS):
            for name, loop in loops.items():
                fake.journal = []
                start = time.process_time()
                for _ in range(TICKS):
                    fake.advance(INTERVAL_S)
                    results = loop.tick(k)
                    k += 1
                    time.sleep(TICK_GAP_S)
                spent = (time.process_time() - start) / TICKS
                journal, fake.journal = fake.journal, None
                total[name].append(spent)
                library[name].append(replay(fake, journal) / TICKS)
                samples = max(samples, sum(r.sample_count() for r in results))
        start = time.process_time()
        for _ in range(20):
            text = render_text(latest)
        scrape = (time.process_time() - start) / 20
        start = time.process_time()
        parquet.finish()
        finish = time.process_time() - start

    load = os.getloadavg()[0]
    print(f"node: 8 GPUs x 18 NVLink links (fake NVML), 8 IB ports, host + NICs; {samples} "
          f"samples per 10 Hz tick; {ROUNDS} rounds x {TICKS} ticks per configuration, "
          f"interleaved; CPU = time.process_time; load average {load:.1f} on "
          f"{os.cpu_count()} CPUs")
    print(f"{'':28s} {'---- median of rounds (ms CPU/tick) ----':>41s}  "
          f"{'-- least-disturbed round --':>27s}")
    print(f"{'configuration':28s} {'all':>7s} {'fake NVML':>10s} {'kvprof':>8s} "
          f"{'% core':>7s}  {'kvprof':>8s} {'% core':>7s}")
    own: dict[str, tuple[float, float]] = {}
    for name in configs:
        # Each quantity estimated on its own (the tick, the replayed library calls), then
        # subtracted: a difference per round would pair unrelated disturbances.
        median = statistics.median(total[name]) - statistics.median(library[name])
        least = min(total[name]) - min(library[name])
        own[name] = (median, least)
        print(f"{name:28s} {statistics.median(total[name]) * 1e3:7.3f} "
              f"{statistics.median(library[name]) * 1e3:10.3f} {median * 1e3:8.3f} "
              f"{pct(median):6.2f}%  {least * 1e3:8.3f} {pct(least):6.2f}%")
    print("kvprof = CPU time of the ticks minus that of the same fake NVML calls replayed "
          "alone; % core = share of one core at 10 Hz")
    scrape_pct = scrape / SCRAPE_EVERY_S * 100
    finish_pct = finish / ROTATE_S * 100
    print(f"/metrics scrape (on the HTTP thread): {scrape * 1e3:.2f} ms CPU per scrape of "
          f"{len(text) // 1024} KiB -> {scrape_pct:.3f} % of a core at one scrape per "
          f"{SCRAPE_EVERY_S:g} s")
    print(f"Parquet file finish (last row group, footer, rename): {finish * 1e3:.2f} ms per "
          f"file -> {finish_pct:.3f} % of a core at one file per {ROTATE_S:g} s")
    extra = scrape_pct + finish_pct
    n_procs = sum(c for c, _, _ in WATCHED)
    n_threads = sum(c * t for c, t, _ in WATCHED)
    n_active = sum(c * a for c, _, a in WATCHED)
    base, with_ss = own["+ Prometheus + Parquet"], own[WITH_SCHEDSTAT]
    print(f"schedstat sampling ({n_procs} watched processes, {n_threads} threads, {n_active} "
          f"active), side by side: +{(with_ss[0] - base[0]) * 1e3:.3f} ms CPU/tick = "
          f"+{pct(with_ss[0]) - pct(base[0]):.2f} % of a core (median), "
          f"+{(with_ss[1] - base[1]) * 1e3:.3f} ms = +{pct(with_ss[1]) - pct(base[1]):.2f} % "
          "(least-disturbed)")
    if old is not None:
        then = own[f"  same, schedstat@{rev}"]
        print(f"schedstat sampling today vs at {rev}, side by side: "
              f"{(with_ss[0] - base[0]) * 1e3:.3f} vs {(then[0] - base[0]) * 1e3:.3f} ms CPU/tick "
              f"(median; ratio {(with_ss[0] - base[0]) / max(1e-9, then[0] - base[0]):.2f}), "
              f"{(with_ss[1] - base[1]) * 1e3:.3f} vs {(then[1] - base[1]) * 1e3:.3f} "
              f"(least-disturbed; ratio "
              f"{(with_ss[1] - base[1]) / max(1e-9, then[1] - base[1]):.2f})")
    for name in ("+ Prometheus + Parquet", WITH_SCHEDSTAT):
        median_pct = pct(own[name][0]) + extra
        min_pct = pct(own[name][1]) + extra
        verdict = "meets" if min_pct <= GOAL_PCT else "MISSES"
        print(f"all in, {name.removeprefix('+ ')} (samplers + sinks + scrape + file finish, "
              f"NVML calls excluded): {min_pct:.2f} % of one core in the least-disturbed "
              f"round, {median_pct:.2f} % median -> {verdict} the {GOAL_PCT:g} % goal")


if __name__ == "__main__":
    main()
