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
procfs reads are kvprof's cost). Medians over the rounds, [min - max] after them.
Goal: <= 1 % of one core at 10 Hz, NVML library calls excluded.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "collectors"))

from fake_nvml import FakeNvml, parse_nvidia_smi_xml, replay, replicate  # noqa: E402

from kvprof.collectors.daemon import CollectorLoop, build_samplers  # noqa: E402
from kvprof.collectors.parquet_sink import ParquetSink  # noqa: E402
from kvprof.collectors.prometheus_sink import LatestSamplesCollector, render_text  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures" / "collectors"
ROUNDS = 7
TICKS = 100  # per round and configuration: a multiple of 10, so the 1 Hz samplers run 1/10
INTERVAL_S = 0.1
SCRAPE_EVERY_S = 15.0  # Prometheus' default scrape interval
ROTATE_S = 60.0  # kvprof collect's default file length
GOAL_PCT = 1.0


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


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        sysfs = ib_tree_with_8_ports(tmp_path / "sys")
        fake = fake_nvml()
        schedule, _ = build_samplers(sysfs=sysfs, nvml=fake, kubelet_socket=None, node="bench")
        # Placement runs every 5 s and asks the kubelet and the API server: not a per-tick cost.
        schedule = [s for s in schedule if s.sampler.name != "placement"]
        latest = LatestSamplesCollector()
        parquet = ParquetSink(tmp_path / "out", "bench", rotate_s=3600)
        configs = {
            "samplers only": [],
            "+ Prometheus": [lambda r, _s: latest.update(r)],
            "+ Prometheus + Parquet": [lambda r, _s: latest.update(r),
                                       lambda r, s: parquet.write(r, sticky=s)],
        }
        loops = {name: CollectorLoop(list(schedule), INTERVAL_S, sinks)
                 for name, sinks in configs.items()}
        k = 0
        for loop in loops.values():  # warm up: discovery, imports, caches, the first file
            for _ in range(30):
                fake.advance(INTERVAL_S)
                loop.tick(k)
                k += 1
        k = (k // 10 + 1) * 10
        total: dict[str, list[float]] = {name: [] for name in configs}
        own: dict[str, list[float]] = {name: [] for name in configs}
        nvml_share: list[float] = []
        samples = 0
        for _ in range(ROUNDS):
            for name, loop in loops.items():
                fake.journal = []
                start = time.process_time()
                for _ in range(TICKS):
                    fake.advance(INTERVAL_S)
                    results = loop.tick(k)
                    k += 1
                spent = (time.process_time() - start) / TICKS
                journal, fake.journal = fake.journal, None
                start = time.process_time()
                replay(fake, journal)
                library = (time.process_time() - start) / TICKS
                total[name].append(spent)
                own[name].append(spent - library)
                nvml_share.append(library)
                samples = sum(r.sample_count() for r in results)
        start = time.process_time()
        for _ in range(20):
            text = render_text(latest)
        scrape = (time.process_time() - start) / 20
        start = time.process_time()
        parquet.finish()
        finish = time.process_time() - start

    print(f"node: 8 GPUs x 18 NVLink links (fake NVML), 8 IB ports, host + NICs; "
          f"{samples} samples in a 10 Hz tick; {ROUNDS} rounds x {TICKS} ticks per "
          "configuration, interleaved; CPU = time.process_time; median [min-max] of rounds")
    print(f"{'configuration':24s} {'ms CPU/tick':>22s} {'fake NVML ms':>13s} "
          f"{'kvprof ms/tick':>22s} {'% of one core at 10 Hz (kvprof)':>32s}")
    for name in configs:
        print(f"{name:24s} {spread(total[name], 1e3):>22s} "
              f"{statistics.median(nvml_share) * 1e3:>13.3f} {spread(own[name], 1e3):>22s} "
              f"{spread([pct(x) for x in own[name]], fmt='{:.2f}'):>32s}")
    print(f"fake NVML calls alone: {spread(nvml_share, 1e3)} ms/tick (subtracted above, "
          "per round)")
    scrape_pct = scrape / SCRAPE_EVERY_S * 100
    finish_pct = finish / ROTATE_S * 100
    print(f"/metrics scrape (on the HTTP thread): {scrape * 1e3:.2f} ms CPU per scrape, "
          f"{len(text) // 1024} KiB -> {scrape_pct:.3f} % of a core at one scrape per "
          f"{SCRAPE_EVERY_S:g} s")
    print(f"Parquet file finish (last row group, footer, rename): {finish * 1e3:.2f} ms per "
          f"file -> {finish_pct:.3f} % of a core at one file per {ROTATE_S:g} s")
    everything = statistics.median(own["+ Prometheus + Parquet"])
    overall = pct(everything) + scrape_pct + finish_pct
    verdict = "meets" if overall <= GOAL_PCT else "MISSES"
    print(f"all in (samplers + both sinks + scrape + file finish, NVML calls excluded): "
          f"{overall:.2f} % of one core -> {verdict} the {GOAL_PCT:g} % goal "
          f"({overall / GOAL_PCT:.2f}x of it)")


if __name__ == "__main__":
    main()
