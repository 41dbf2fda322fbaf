"""The ``kvprof collect`` daemon: drift-free sampling loop feeding /metrics and Parquet files."""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from kvprof.collectors.base import Sampler, SampleSet
from kvprof.collectors.host import HostSampler, NicSampler
from kvprof.collectors.infiniband import IbPortSampler, IbPortStateSampler
from kvprof.collectors.kubeapi import KubePodSource
from kvprof.collectors.nvlink import NvlinkSampler, NvlinkStateSampler
from kvprof.collectors.nvml import GpuProcessSampler, GpuSampler, NvmlSession
from kvprof.collectors.placement import PlacementSampler, node_name
from kvprof.collectors.schedstat import SchedstatSampler
from kvprof.errors import UsageError

log = logging.getLogger("kvprof.collectors")

# How often the slow samplers run, whatever --interval is: process lists cost milliseconds
# of NVML time; link states, error counters and placement change rarely. Host CPU / memory
# run every tick like the counters (the README says 10 Hz): psutil costs ~0.06 ms of CPU per
# sample here, 0.06% of a core at 10 Hz (measured, issue 22).
PROCESS_EVERY_S = 1.0
IB_STATE_EVERY_S = 1.0
NVLINK_STATE_EVERY_S = 1.0
HOST_EVERY_S = 0.0  # every tick
PLACEMENT_EVERY_S = 5.0


@dataclass(slots=True)
class Scheduled:
    """A sampler and how often it runs; ``every_s=0`` means every tick."""

    sampler: Sampler
    every_s: float = 0.0
    # Parquet stores only changed sets of "sticky" samplers (placement).
    sticky: bool = False


def build_samplers(
    *,
    sysfs: Path | str = "/sys",
    proc: Path | str = "/proc",
    no_nvml: bool = False,
    kubelet_socket: Path | str | None = None,
    nvml: Any = None,
    pod_source: KubePodSource | None = None,
    node: str | None = None,
    with_host: bool = True,
    watch_pids: tuple[str, ...] = (),
    watch_names: tuple[str, ...] = (),
    watch_attach: bool = True,
    interval: float = 0.1,
) -> tuple[list[Scheduled], NvmlSession]:
    """The node's samplers in run order (GPU processes before placement, which joins them)."""
    session = NvmlSession(nvml, disabled="NVML disabled by --no-nvml" if no_nvml else None)
    processes = GpuProcessSampler(session)

    def uuid_by_bus() -> dict[str, str]:
        return {gpu.pci_bus_id: gpu.uuid for gpu in session.devices}

    placement = PlacementSampler(
        kubelet_socket=kubelet_socket, proc=proc, sysfs=sysfs, node=node,
        pod_source=pod_source if pod_source is not None else KubePodSource(),
        gpu_pids=lambda: processes.pids_by_gpu, gpu_uuid_by_bus=uuid_by_bus,
    )
    schedule = [
        Scheduled(GpuSampler(session)),
        Scheduled(NvlinkSampler(session)),
        Scheduled(NvlinkStateSampler(session), NVLINK_STATE_EVERY_S),
        Scheduled(processes, PROCESS_EVERY_S),
        Scheduled(IbPortSampler(sysfs)),
        Scheduled(IbPortStateSampler(sysfs), IB_STATE_EVERY_S),
    ]
    if with_host:
        schedule.append(Scheduled(NicSampler(proc)))
        schedule.append(Scheduled(HostSampler(proc), HOST_EVERY_S))
        # Every tick: a leg of a few ms that lost its core must find the wait in its window.
        schedule.append(Scheduled(SchedstatSampler(proc, watch_pids=watch_pids,
                                                   watch_names=watch_names,
                                                   watch_attach=watch_attach,
                                                   interval_s=interval)))
    schedule.append(Scheduled(placement, PLACEMENT_EVERY_S, sticky=True))
    return schedule, session


class CollectorLoop:
    """Runs the schedule at a fixed rate and hands every SampleSet to the sinks."""

    def __init__(self, schedule: list[Scheduled], interval: float,
                 sinks: list[Callable[[SampleSet, bool], None]]):
        self.schedule = schedule
        self.interval = interval
        self.sinks = sinks
        self.ticks = 0
        self.late_ticks = 0
        self._every = [max(1, round(s.every_s / interval)) if s.every_s else 1 for s in schedule]

    def tick(self, index: int | None = None, *, everything: bool = False) -> list[SampleSet]:
        """One round: every sampler due at tick ``index`` (all of them when ``everything``)."""
        index = self.ticks if index is None else index
        results = []
        for scheduled, every in zip(self.schedule, self._every, strict=True):
            if not everything and index % every:
                continue
            result = scheduled.sampler.sample()
            results.append(result)
            for sink in self.sinks:
                sink(result, scheduled.sticky)
        self.ticks += 1
        return results

    def run(self, stop: threading.Event, duration: float | None = None,
            on_first_tick: Callable[[], None] | None = None) -> None:
        """Tick at ``start + k * interval`` (no drift); a late tick skips, never bunches up."""
        start = time.monotonic()
        deadline = start + duration if duration is not None else math.inf
        k = 0
        while not stop.is_set():
            self.tick(k)  # tick 0 runs every sampler: slow ones included
            if k == 0 and on_first_tick is not None:
                on_first_tick()
            k += 1
            target = start + k * self.interval
            now = time.monotonic()
            if now > target:
                # Overran (a slow NVML call, a stalled disk): skip to the next future slot.
                behind = math.floor((now - start) / self.interval) + 1
                self.late_ticks += behind - k
                k = behind
                target = start + k * self.interval
            if target >= deadline:
                stop.wait(max(0.0, deadline - now))
                return
            stop.wait(target - now)


def parse_listen(listen: str) -> tuple[str, int] | None:
    """``HOST:PORT`` -> (host, port); ``''`` -> None (no /metrics server)."""
    if not listen:
        return None
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen {listen!r} is not HOST:PORT",
                         hint="e.g. --listen 0.0.0.0:9402 (9400 is dcgm-exporter's port)")
    return host.strip("[]") or "0.0.0.0", int(port)


def once_json(results: list[SampleSet], node: str) -> str:
    """One full sample set as JSON: per collector, its samples and its explicit no-data."""
    doc: dict[str, Any] = {"node": node, "ts": max((r.ts for r in results), default=0.0),
                           "collectors": {}}
    for r in results:
        doc["collectors"][r.collector] = {
            "ok": r.ok,
            "duration_s": round(r.duration_s, 6),
            "samples": [{"metric": s.metric, "entity": s.entity, "value": s.value,
                         "labels": s.labels, **({"counter": True} if s.counter else {})}
                        for s in r.all_samples()],
            "no_data": [{"entity": n.entity, "metric": n.metric, "reason": n.reason}
                        for n in r.no_data],
        }
    return json.dumps(doc, indent=2, sort_keys=False)


def _configure_logging() -> None:
    logger = logging.getLogger("kvprof")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def run_collect_command(
    interval: float = 0.1,
    once: bool = False,
    fmt: str = "json",
    listen: str = "127.0.0.1:9402",
    output: Path | None = None,
    rotate: float = 60.0,
    sysfs: Path = Path("/sys"),
    proc: Path = Path("/proc"),
    no_nvml: bool = False,
    kubelet_socket: Path | None = None,
    duration: float | None = None,
    watch_pids: tuple[str, ...] = (),
    watch_names: tuple[str, ...] = (),
    watch_attach: bool = True,
    *,
    out: TextIO | None = None,
    nvml: Any = None,
    pod_source: KubePodSource | None = None,
) -> None:
    """The body of ``kvprof collect`` (options: kvprof/commands/collect.py)."""
    out = out or sys.stdout
    if not interval > 0:
        raise UsageError(f"--interval must be > 0, got {interval}", hint="e.g. --interval 0.1")
    if fmt not in ("json", "prom"):
        raise UsageError(f"--format must be json or prom, got {fmt!r}",
                         hint="--format json (default) or --format prom")
    if not rotate > 0:
        raise UsageError(f"--rotate must be > 0 seconds, got {rotate}", hint="e.g. --rotate 60")
    if duration is not None and duration < 0:
        raise UsageError(f"--duration must be >= 0, got {duration}", hint="e.g. --duration 30")
    from kvprof.inputs import option_number

    # nan passes every comparison above and an infinite wait never ends (issue 21).
    option_number(interval, "--interval", maximum=3600)
    option_number(rotate, "--rotate", maximum=7 * 86400)
    option_number(duration, "--duration", strict=False)
    if output is not None and not once:
        from kvprof.outputs import make_dir

        make_dir(output, "--output")  # fail now, not after the first samples
    address = None if once else parse_listen(listen)
    _configure_logging()
    node = node_name()
    schedule, session = build_samplers(sysfs=sysfs, proc=proc, no_nvml=no_nvml,
                                       kubelet_socket=kubelet_socket, nvml=nvml,
                                       pod_source=pod_source, node=node,
                                       watch_pids=tuple(watch_pids),
                                       watch_names=tuple(watch_names),
                                       watch_attach=watch_attach, interval=interval)
    from kvprof.collectors.prometheus_sink import LatestSamplesCollector

    latest = LatestSamplesCollector()
    try:
        if once:
            _run_once(schedule, interval, latest, fmt, node, out)
        else:
            _run_daemon(schedule, interval, latest, address, output, rotate, node, duration)
    finally:
        session.shutdown()


def _run_once(schedule: list[Scheduled], interval: float, latest: Any, fmt: str, node: str,
              out: TextIO) -> None:
    from kvprof.collectors.prometheus_sink import render_text

    loop = CollectorLoop(schedule, interval, sinks=[])
    # Two readings one interval apart, so CPU utilisation and IB rates are real rates.
    loop.tick(everything=True)
    time.sleep(interval)
    results = loop.tick(everything=True)
    if fmt == "json":
        out.write(once_json(results, node) + "\n")
    else:
        for r in results:
            latest.update(r)
        out.write(render_text(latest).decode())
    out.flush()


def _run_daemon(schedule: list[Scheduled], interval: float, latest: Any,
                address: tuple[str, int] | None, output: Path | None, rotate: float,
                node: str, duration: float | None) -> None:
    from kvprof.collectors.parquet_sink import ParquetSink
    from kvprof.collectors.prometheus_sink import MetricsServer

    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("kvprof collect: %s received, finishing the current file",
                 signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    server = None
    parquet = ParquetSink(output, node, rotate) if output is not None else None
    sinks: list[Callable[[SampleSet, bool], None]] = [lambda r, _sticky: latest.update(r)]
    if parquet is not None:
        sinks.append(lambda r, sticky: parquet.write(r, sticky=sticky))
    try:
        if address is not None:
            try:
                server = MetricsServer(latest, *address).start()
            except OSError as err:
                from kvprof.errors import ResourceAbsentError

                raise ResourceAbsentError(
                    f"cannot listen on {address[0]}:{address[1]}: {err.strerror or err}",
                    hint="pick a free port with --listen HOST:PORT, or --listen '' for none",
                ) from err
        where = f"http://{address[0]}:{server.port}/metrics" if server else "no /metrics"
        log.info("kvprof collect: node %s, every %g s, %s, Parquet %s", node, interval, where,
                 f"under {output} (new file every {rotate:g} s)" if output else "off")
        loop = CollectorLoop(schedule, interval, sinks)
        loop.run(stop, duration, on_first_tick=latest.ready.set)
        files = 0
        if parquet is not None:
            parquet.finish()
            files = len(parquet.files_written)
        log.info("kvprof collect: stopped after %d ticks (%d late), %d Parquet file(s) written",
                 loop.ticks, loop.late_ticks, files)
        if parquet is not None and parquet.write_errors:
            from kvprof.errors import KvprofError

            raise KvprofError(
                f"{parquet.write_errors} Parquet file(s) under {output} could not be written "
                f"({parquet.last_error}); {files} were",
                hint="Make --output a writable directory with free space (df -h).")
    finally:
        if parquet is not None:
            parquet.finish()
        if server is not None:
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
