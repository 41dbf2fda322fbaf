"""InfiniBand / RoCE port sampler over ``<sysfs>/class/infiniband/*/ports/*`` (node_exporter style).

``port_xmit_data`` / ``port_rcv_data`` count 4-octet words (IBTA PortCounters), so bytes =
raw x 4. The 32-bit legacy files wrap within seconds at 200-400 Gb/s; the 64-bit
``counters_ext/*_64`` files are preferred when the driver provides them. Byte, packet and
wait counters are read every tick (:class:`IbPortSampler`); error counters, state, link layer
and rate change slowly and are read by :class:`IbPortStateSampler` at ~1 Hz, which keeps the
file opens per 10 Hz tick few.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
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

WORD_BYTES = 4
DISCOVERY_REFRESH_S = 10.0

# (metric, legacy counters/ file, counters_ext/ 64-bit file, multiplier)
TRAFFIC_COUNTERS = (
    (semconv.METRIC_IB_XMIT, "port_xmit_data", "port_xmit_data_64", WORD_BYTES),
    (semconv.METRIC_IB_RCV, "port_rcv_data", "port_rcv_data_64", WORD_BYTES),
    (semconv.METRIC_IB_XMIT_PACKETS, "port_xmit_packets", "port_xmit_packets_64", 1),
    (semconv.METRIC_IB_RCV_PACKETS, "port_rcv_packets", "port_rcv_packets_64", 1),
    (semconv.METRIC_IB_XMIT_WAIT, "port_xmit_wait", None, 1),
)
RATE_OF = {semconv.METRIC_IB_XMIT: semconv.METRIC_IB_XMIT_RATE,
           semconv.METRIC_IB_RCV: semconv.METRIC_IB_RCV_RATE}

ERROR_COUNTERS = (
    "symbol_error",
    "link_error_recovery",
    "link_downed",
    "port_rcv_errors",
    "port_rcv_remote_physical_errors",
    "port_rcv_switch_relay_errors",
    "port_xmit_discards",
    "port_xmit_constraint_errors",
    "port_rcv_constraint_errors",
    "local_link_integrity_errors",
    "excessive_buffer_overrun_errors",
    "VL15_dropped",
)

_RATE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*Gb/sec")


class SysfsValueError(ValueError):
    """A sysfs file that is missing, empty or not a number; the message is the reason."""


def parse_rate_bytes_per_s(text: str) -> float:
    """``"25 Gb/sec (1X EDR)"`` -> 3.125e9 bytes/s (the signalling data rate / 8)."""
    match = _RATE_RE.match(text)
    if not match:
        raise SysfsValueError(f"unrecognised rate: {text[:40]!r}")
    return float(match.group(1)) * 1e9 / 8


def parse_state(text: str) -> str:
    """``"4: ACTIVE"`` -> ``"ACTIVE"``."""
    return text.split(":", 1)[-1].strip()


class SysfsFiles:
    """Small sysfs attribute files read through descriptors kept open.

    sysfs regenerates an attribute on every read at offset 0, so ``pread(fd, n, 0)`` on a
    kept descriptor gives a fresh value; an open + close per file per read was most of the
    samplers' cost. A read error (device gone: ENODEV) drops the descriptor, the next read
    reopens.
    """

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def raw(self, path: str) -> bytes:
        fd = self.fds.get(path)
        if fd is None:
            try:
                fd = self.fds[path] = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise SysfsValueError("file missing") from None
            except OSError as err:
                raise SysfsValueError(f"unreadable: {err.strerror}") from None
        try:
            data = os.pread(fd, 256, 0)
        except OSError as err:  # e.g. ENODEV, or EINVAL from a driver that cannot answer
            self.close_path(path)
            raise SysfsValueError(f"unreadable: {err.strerror}") from None
        data = data.strip()
        if not data:
            raise SysfsValueError("file empty")
        return data

    def text(self, path: str) -> str:
        return self.raw(path).decode("ascii", "replace")

    def int(self, path: str) -> int:
        data = self.raw(path)
        try:
            return int(data)
        except ValueError:
            # e.g. "N/A (no PMA)" from ports whose HCA has no performance management agent
            raise SysfsValueError(f"not a number: {data[:40].decode('ascii', 'replace')!r}"
                                  ) from None

    def close_path(self, path: str) -> None:
        fd = self.fds.pop(path, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for path in list(self.fds):
            self.close_path(path)

    def __del__(self) -> None:
        self.close()


@dataclass(slots=True)
class _Port:
    device: str
    port: str
    path: str
    labels: dict[str, str]
    # metric -> (file path, multiplier), chosen at discovery: counters_ext when present
    traffic: list[tuple[str, str, int]] = field(default_factory=list)
    # error counter name -> labels, and (state, phys_state, link_layer) -> labels: reused
    # dicts, so sinks that cache per labels object do not re-encode them every second
    error_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    state_labels: dict[tuple[str, str, str], dict[str, str]] = field(default_factory=dict)

    @property
    def entity(self) -> str:
        return f"{self.device}/{self.port}"

    @property
    def identity(self) -> tuple[str, list[tuple[str, str, int]]]:
        return self.path, self.traffic


class _IbPorts:
    """Port discovery shared by the fast (traffic) and slow (state, errors) samplers."""

    name = "infiniband"

    def __init__(self, sysfs: Path | str = "/sys"):
        self.root = Path(sysfs) / "class" / "infiniband"
        self._ports: list[_Port] = []
        self._discovered_at: float | None = None

    def sample(self) -> SampleSet:
        return timed_sample(self.name, self._sample)

    def _discover(self) -> list[_Port]:
        ports = []
        for dev_dir in sorted(self.root.iterdir()):
            ports_dir = dev_dir / "ports"
            if not ports_dir.is_dir():
                continue
            for port_dir in sorted(ports_dir.iterdir(), key=lambda p: p.name):
                labels = {"device": dev_dir.name, "port": port_dir.name}
                port = _Port(dev_dir.name, port_dir.name, str(port_dir), labels)
                ext = port_dir / "counters_ext"
                for metric, legacy, wide, mult in TRAFFIC_COUNTERS:
                    if wide and (ext / wide).exists():
                        port.traffic.append((metric, str(ext / wide), mult))
                    else:
                        port.traffic.append((metric, str(port_dir / "counters" / legacy), mult))
                ports.append(port)
        return ports

    def _ports_changed(self, ports: list[_Port]) -> None:
        """Hook: the port list was replaced (hot-plug)."""

    def ports(self, result: SampleSet) -> list[_Port]:
        """The current ports (rediscovered now and then for hot-plug), or a recorded no-data."""
        now = time.monotonic()
        if self._discovered_at is None or now - self._discovered_at > DISCOVERY_REFRESH_S:
            ports = self._discover() if self.root.is_dir() else []
            self._discovered_at = now
            # Unchanged (the usual case): keep the old objects, their caches and open files.
            if [p.identity for p in ports] != [p.identity for p in self._ports]:
                self._ports = ports
                self._ports_changed(ports)
        if not self._ports:
            result.no_data.append(NoData(
                WHOLE_COLLECTOR, ALL_METRICS,
                f"no InfiniBand/RoCE devices under {self.root}",
            ))
        return self._ports

    def _sample(self, result: SampleSet) -> None:
        raise NotImplementedError


class IbPortSampler(_IbPorts):
    """Per-port byte, packet and xmit-wait counters and the achieved byte rates (every tick)."""

    name = "infiniband"

    def __init__(self, sysfs: Path | str = "/sys"):
        super().__init__(sysfs)
        self.files = SysfsFiles()
        # Built per port list: every traffic counter of every port, in order, and the two
        # rate series per port; the previous tick's values and time for the rates.
        self._slots: list[tuple[str, str, str, int]] = []  # (entity, metric, path, mult)
        self._fast: list[tuple[int, int]] | None = None  # (fd, mult) once all are open
        self._counter_keys = SeriesKeys(())
        self._rate_keys = SeriesKeys(())
        self._rate_of: list[tuple[int, int]] = []  # (rate slot, counter slot)
        self._previous: list[int | None] = []
        self._previous_ts = 0.0

    def close(self) -> None:
        self.files.close()
        self._fast = None

    def _ports_changed(self, ports: list[_Port]) -> None:
        self.close()  # ports came or went: drop descriptors of the old tree
        counters, rates = [], []
        self._rate_of, self._slots = [], []
        for port in ports:
            for metric, path, mult in port.traffic:
                rate_metric = RATE_OF.get(metric)
                if rate_metric is not None:
                    self._rate_of.append((len(rates), len(counters)))
                    rates.append((rate_metric, port.entity, port.labels, False))
                counters.append((metric, port.entity, port.labels, True))
                self._slots.append((port.entity, metric, path, mult))
        self._counter_keys = SeriesKeys(counters)
        self._rate_keys = SeriesKeys(rates)
        self._previous = []

    def _read_all(self, result: SampleSet) -> list[int | None]:
        """Every counter of every port; None (with its NoData) for one that failed."""
        if self._fast is not None:
            pread = os.pread
            try:
                # int() takes the bytes with their newline; "", "N/A" raise ValueError.
                return [int(pread(fd, 64, 0)) * mult for fd, mult in self._fast]
            except (OSError, ValueError):
                self._fast = None  # something is wrong: the careful path says what
        values: list[int | None] = []
        for entity, metric, path, mult in self._slots:
            try:
                values.append(self.files.int(path) * mult)
            except SysfsValueError as err:
                name = path.rsplit("/", 2)
                result.no_data.append(NoData(entity, metric, f"{name[-2]}/{name[-1]}: {err}"))
                values.append(None)
        if None not in values:
            fds = self.files.fds
            self._fast = [(fds[path], mult) for _, _, path, mult in self._slots]
        return values

    def _sample(self, result: SampleSet) -> None:
        if not self.ports(result):
            return
        values = self._read_all(result)
        result.add_block(self._counter_keys, [None if v is None else float(v) for v in values])
        previous, elapsed = self._previous, result.ts - self._previous_ts
        self._previous, self._previous_ts = values, result.ts
        if len(previous) != len(values) or elapsed <= 0:
            return  # first reading (or a clock step back): no interval yet
        rates: list[float | None] = [None] * len(self._rate_keys)
        for slot, i in self._rate_of:
            now, before = values[i], previous[i]
            # A counter that went down was reset or wrapped (32-bit sysfs counters wrap within
            # seconds at 400 Gb/s): the true increase is unknowable, so no rate this interval
            # rather than a negative or absurdly large one.
            if now is not None and before is not None and now >= before:
                rates[slot] = (now - before) / elapsed
        result.add_block(self._rate_keys, rates)


class IbPortStateSampler(_IbPorts):
    """Per-port state, link layer, link rate and error counters (slow: run it at ~1 Hz)."""

    name = "infiniband_state"

    def __init__(self, sysfs: Path | str = "/sys"):
        super().__init__(sysfs)
        self.files = SysfsFiles()

    def _ports_changed(self, ports: list[_Port]) -> None:
        self.files.close()

    def _sample(self, result: SampleSet) -> None:
        for port in self.ports(result):
            self._sample_port(port, result)

    def _sample_port(self, port: _Port, result: SampleSet) -> None:
        samples, no_data = result.samples, result.no_data
        entity = port.entity
        base = port.path
        read_text, read_int = self.files.text, self.files.int
        try:
            state = parse_state(read_text(f"{base}/state"))
            phys = parse_state(read_text(f"{base}/phys_state"))
        except SysfsValueError as err:
            no_data.append(NoData(entity, semconv.METRIC_IB_UP, f"state: {err}"))
        else:
            try:
                link_layer = read_text(f"{base}/link_layer")
            except SysfsValueError:
                link_layer = "unknown"
            labels = port.state_labels.get((state, phys, link_layer))
            if labels is None:
                labels = port.state_labels[state, phys, link_layer] = {
                    **port.labels, "state": state, "phys_state": phys, "link_layer": link_layer}
            samples.append(Sample(semconv.METRIC_IB_UP, 1.0 if state == "ACTIVE" else 0.0,
                                  entity, labels))
        try:
            rate = parse_rate_bytes_per_s(read_text(f"{base}/rate"))
        except SysfsValueError as err:
            no_data.append(NoData(entity, semconv.METRIC_IB_RATE, f"rate: {err}"))
        else:
            samples.append(Sample(semconv.METRIC_IB_RATE, rate, entity, port.labels))
        for counter in ERROR_COUNTERS:
            try:
                value = read_int(f"{base}/counters/{counter}")
            except SysfsValueError as err:
                if str(err) == "file missing":
                    continue  # not every driver has every error counter (hfi1 vs mlx5)
                no_data.append(NoData(entity, semconv.METRIC_IB_ERRORS,
                                      f"counters/{counter}: {err}"))
                continue
            labels = port.error_labels.get(counter)
            if labels is None:
                labels = port.error_labels[counter] = {**port.labels, "counter": counter}
            samples.append(Sample(semconv.METRIC_IB_ERRORS, float(value), entity, labels,
                                  counter=True))
