"""Host samplers: CPU and memory (psutil, ~1 Hz) and per-NIC bytes (every tick), where a
KV transfer that fell back to TCP shows up on the Ethernet NIC instead of the IB port."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from kvprof import semconv
from kvprof.collectors.base import (
    ALL_METRICS,
    WHOLE_COLLECTOR,
    NoData,
    Sample,
    SampleSet,
    SeriesKeys,
    timed_sample,
)

# Interfaces that never carry a KV transfer between nodes.
_SKIP_NICS = ("lo",)
# One pread of <proc>/net/dev; read again from where it stopped when a node has more NICs.
_NET_DEV_CHUNK = 64 * 1024
_NO_LABELS: dict[str, str] = {}


@contextlib.contextmanager
def _procfs(root: str) -> Iterator[None]:
    """Point psutil at another procfs root (``/host/proc`` in the DaemonSet) for one call.

    psutil keeps the root in a module global; the daemon samples from one thread, so
    swapping it around the calls is safe and keeps ``--proc`` a real parameter.
    """
    import psutil

    previous = psutil.PROCFS_PATH
    psutil.PROCFS_PATH = root
    try:
        yield
    finally:
        psutil.PROCFS_PATH = previous


class HostSampler:
    """Host CPU utilisation (since the previous sample) and memory used/total, via psutil.

    Scheduled at ~1 Hz (daemon.HOST_EVERY_S): psutil parses all of /proc/stat and
    /proc/meminfo per call, ~0.2 ms, and host CPU / memory need no 10 Hz resolution.
    """

    name = "host"

    def __init__(self, proc: Path | str = "/proc"):
        self.proc = str(proc)
        self._primed = False

    def sample(self) -> SampleSet:
        return timed_sample(self.name, self._sample)

    def _sample(self, result: SampleSet) -> None:
        import psutil

        with _procfs(self.proc):
            try:
                # interval=None: utilisation since the previous call, no blocking.
                cpu = psutil.cpu_percent(interval=None)
                if self._primed:
                    result.samples.append(Sample(semconv.METRIC_HOST_CPU, cpu / 100.0,
                                                 "host", _NO_LABELS))
                else:
                    # psutil's very first answer is meaningless (no previous reading).
                    result.no_data.append(NoData("host", semconv.METRIC_HOST_CPU,
                                                 "first reading: no interval yet"))
                self._primed = True
            except (OSError, RuntimeError) as err:
                result.no_data.append(NoData("host", semconv.METRIC_HOST_CPU, str(err)))
            try:
                mem = psutil.virtual_memory()
                result.samples.append(Sample(semconv.METRIC_HOST_MEMORY_USED, float(mem.used),
                                             "host", _NO_LABELS))
                result.samples.append(Sample(semconv.METRIC_HOST_MEMORY_TOTAL,
                                             float(mem.total), "host", _NO_LABELS))
            except (OSError, RuntimeError) as err:
                result.no_data.append(NoData("host", semconv.METRIC_HOST_MEMORY_USED, str(err)))


def parse_net_dev(text: str) -> list[tuple[str, int, int]]:
    """``/proc/net/dev`` -> [(interface, rx bytes, tx bytes)] (the counters psutil reports
    as bytes_recv / bytes_sent), loopback left out."""
    out = []
    for line in text.splitlines()[2:]:
        name, sep, counters = line.partition(":")
        if not sep:
            continue
        fields = counters.split()
        name = name.strip()
        if name in _SKIP_NICS or len(fields) < 9:
            continue
        out.append((name, int(fields[0]), int(fields[8])))
    return out


class NicSampler:
    """RX/TX bytes of every network interface but loopback, from ``<proc>/net/dev``.

    Read every tick through a descriptor kept open (procfs regenerates the file on each
    read at offset 0), parsed directly: psutil's net_io_counters builds a namedtuple per
    NIC and costs ~0.1 ms per call, a tenth of the collector's whole 10 Hz budget.
    """

    name = "nic"

    def __init__(self, proc: Path | str = "/proc"):
        self.path = os.path.join(str(proc), "net", "dev")
        self._fd: int | None = None
        self._keys: dict[tuple[str, ...], SeriesKeys] = {}

    def sample(self) -> SampleSet:
        return timed_sample(self.name, self._sample)

    def _read(self) -> str:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        chunks = [os.pread(self._fd, _NET_DEV_CHUNK, 0)]
        while len(chunks[-1]) == _NET_DEV_CHUNK:
            chunks.append(os.pread(self._fd, _NET_DEV_CHUNK, _NET_DEV_CHUNK * len(chunks)))
        return b"".join(chunks).decode("ascii", "replace")

    def _sample(self, result: SampleSet) -> None:
        try:
            nics = parse_net_dev(self._read())
        except (OSError, ValueError) as err:
            self.close()  # reopen next time (namespace gone, procfs remounted)
            reason = getattr(err, "strerror", None) or str(err)
            result.no_data.append(NoData(WHOLE_COLLECTOR, ALL_METRICS,
                                         f"cannot read {self.path}: {reason}"))
            return
        names = tuple(name for name, _, _ in nics)
        keys = self._keys.get(names)
        if keys is None:
            if len(self._keys) > 16:  # interfaces come and go with pods: bound the cache
                self._keys.clear()
            rows = []
            for name in names:
                labels = {"nic": name}
                rows += [(semconv.METRIC_NIC_TX, name, labels, True),
                         (semconv.METRIC_NIC_RX, name, labels, True)]
            keys = self._keys[names] = SeriesKeys(rows)
        values: list[float] = []
        for _, rx, tx in nics:
            values += (float(tx), float(rx))
        result.add_block(keys, values)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()
