"""GPU samplers over NVML (nvidia-ml-py): utilisation, memory, power, energy, PCIe, processes.

NVML is loaded and initialised lazily, once, by :class:`NvmlSession`, shared with the NVLink
sampler. The NVML module is a parameter (``nvml=``): production passes nothing and gets the
real ``pynvml`` from nvidia-ml-py; tests pass a fake that replays recorded nvidia-smi values.
"""

from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass, field
from struct import Struct
from types import ModuleType
from typing import Any

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

log = logging.getLogger(__name__)

# After a failed nvmlInit (no driver yet, driver reloading), try again this rarely: a
# failing dlopen every 100 ms would cost more than the whole collector.
INIT_RETRY_S = 60.0
# A value a GPU answered "not supported" for is asked again this rarely (MIG mode changes
# need a GPU reset; a minute is soon enough to notice).
UNSUPPORTED_RETRY_S = 60.0

NO_LIBRARY_HINT = (
    "no NVIDIA driver on this node, or the container lacks the NVML library "
    "(set NVIDIA_DRIVER_CAPABILITIES=utility with the NVIDIA container runtime)"
)


@dataclass(frozen=True, slots=True)
class GpuDevice:
    """One GPU as NVML enumerated it; static identity read once at initialisation."""

    index: int
    handle: Any
    uuid: str
    name: str
    pci_bus_id: str
    # Derived once: read for every value of every tick.
    entity: str = field(init=False)
    labels: dict[str, str] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entity", f"gpu{self.index}")
        object.__setattr__(self, "labels", {"gpu": str(self.index), "uuid": self.uuid})


def nvml_text(value: Any) -> str:
    """NVML strings as str."""
    # nvidia-ml-py returns str in current releases and bytes in older ones.
    return value.decode() if isinstance(value, bytes) else str(value)


_REASONS: dict[int, tuple[Any, str]] = {}


def nvml_reason(nvml: Any, err: Exception) -> str:
    """A short, actionable reason for an NVML failure (memoised per error code: an
    unsupported value fails the same way every tick)."""
    value = getattr(err, "value", None)
    if not isinstance(value, int):
        return _nvml_reason(nvml, err, value)
    entry = _REASONS.get(value)
    if entry is None or entry[0] is not nvml:
        entry = _REASONS[value] = (nvml, _nvml_reason(nvml, err, value))
    return entry[1]


def _nvml_reason(nvml: Any, err: Exception, value: Any) -> str:
    if value == getattr(nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", -1):
        return f"NVML library not found: {NO_LIBRARY_HINT}"
    if value == getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", -1):
        return "not supported on this GPU"
    if value == getattr(nvml, "NVML_ERROR_NO_PERMISSION", -1):
        return "NVML: insufficient permissions"
    return f"NVML: {err}"


class NvmlSession:
    """Lazy, once-only NVML initialisation and the list of GPUs, shared by the GPU samplers."""

    def __init__(self, nvml: ModuleType | Any | None = None, *, disabled: str | None = None):
        self._nvml = nvml
        self.disabled = disabled
        self.devices: list[GpuDevice] = []
        self.device_errors: list[NoData] = []
        self.reason: str | None = disabled
        self._ready = False
        self._next_try = 0.0

    @property
    def nvml(self) -> Any:
        return self._nvml

    def ensure(self) -> bool:
        """Initialise NVML if not yet done; False (with ``reason`` set) when it is unusable."""
        if self._ready:
            return True
        if self.disabled or time.monotonic() < self._next_try:
            return False
        self._next_try = time.monotonic() + INIT_RETRY_S
        if self._nvml is None:
            try:
                import pynvml  # nvidia-ml-py
            except ImportError:
                self.reason = "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
                return False
            self._nvml = pynvml
        nvml = self._nvml
        try:
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as err:
            self.reason = nvml_reason(nvml, err)
            log.debug("NVML unavailable: %s", self.reason)
            return False
        self.devices, self.device_errors = [], []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                pci = nvml.nvmlDeviceGetPciInfo(handle)
                self.devices.append(
                    GpuDevice(
                        index=index,
                        handle=handle,
                        uuid=nvml_text(nvml.nvmlDeviceGetUUID(handle)),
                        name=nvml_text(nvml.nvmlDeviceGetName(handle)),
                        pci_bus_id=nvml_text(pci.busId),
                    )
                )
            except nvml.NVMLError as err:
                # One broken GPU (fallen off the bus, needs reset) must not hide the others.
                self.device_errors.append(
                    NoData(f"gpu{index}", ALL_METRICS, nvml_reason(nvml, err))
                )
        self._ready = True
        self.reason = None
        return True

    def shutdown(self) -> None:
        if self._ready:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as err:
                log.debug("nvmlShutdown: %s", err)
            self._ready = False

    def unavailable(self, result: SampleSet) -> bool:
        """Record the session-level no-data in ``result``; True when there is nothing to read."""
        if not self.ensure():
            result.no_data.append(
                NoData(WHOLE_COLLECTOR, ALL_METRICS, self.reason or "NVML unavailable")
            )
            return True
        result.no_data.extend(self.device_errors)
        return False


# nvmlValueType_t (nvml.h ABI) -> member of the nvmlValue_t union holding the number.
VALUE_MEMBER = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal",
                6: "usVal"}
# nvmlValueType_t -> the union member's native layout (all members start at offset 0).
_VALUE_STRUCTS = {t: Struct("@" + code) for t, code in
                  {0: "d", 1: "I", 2: "L", 3: "Q", 4: "q", 5: "i", 6: "H"}.items()}
_RECORDS: dict[type, Struct | None] = {}
_FIELD_STRUCTS: dict[Any, bool] = {}
_DTYPES: dict[type, Any] = {}
_PLANS: dict[bytes, list[tuple[Any, str]]] = {}


def field_value(nvml: Any, fv: Any) -> float:
    """The number in an nvmlFieldValue_t, whatever its declared type."""
    return float(getattr(fv.value, VALUE_MEMBER.get(fv.valueType, "ullVal")))


def _field_dtype(struct: type) -> Any:
    """A numpy view of nvmlFieldValue_t built from the ctypes layout, with one overlapping
    member per union type, so a whole answer is decoded without a Python loop."""
    import numpy as np

    dtype = _DTYPES.get(struct)
    if dtype is None:
        value = struct.value.offset
        ulong = "u8" if ctypes.sizeof(ctypes.c_ulong) == 8 else "u4"
        members = {"dVal": "f8", "uiVal": "u4", "ulVal": ulong, "ullVal": "u8",
                   "sllVal": "i8", "siVal": "i4", "usVal": "u2"}
        names = ["nvmlReturn", "valueType", *members]
        dtype = _DTYPES[struct] = np.dtype({
            "names": names,
            "formats": ["u4", "u4", *members.values()],
            "offsets": [struct.nvmlReturn.offset, struct.valueType.offset,
                        *[value] * len(members)],
            "itemsize": ctypes.sizeof(struct),
        })
    return dtype


def bulk_field_values(answers: list[Any]) -> tuple[Any, Any] | None:
    """Several ``nvmlDeviceGetFieldValues`` answers, concatenated, as (float64 values,
    nvmlReturn codes) arrays.

    pynvml returns a ctypes array of nvmlFieldValue_t; numpy reads the raw records, so the
    36 fields per GPU that NVLink asks for at 10 Hz (18 links x TX/RX), of all GPUs at
    once, cost a handful of array operations and no Python loop. None when an answer is not
    such an array (another binding): use :func:`field_values`. A failed field's value is
    meaningless.
    """
    import numpy as np

    struct = getattr(answers[0], "_type_", None) if answers else None
    if not (_is_field_value_array(struct)
            and all(getattr(a, "_type_", None) is struct for a in answers)):
        return None
    data = answers[0] if len(answers) == 1 else b"".join(
        [memoryview(a).cast("B") for a in answers])
    raw = np.frombuffer(data, dtype=_field_dtype(struct))
    types = raw["valueType"]
    key = types.tobytes()
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 256:
            _PLANS.clear()
        plan = _PLANS[key] = [
            (np.flatnonzero(types == t), VALUE_MEMBER[t]) for t in np.unique(types).tolist()
            if t in VALUE_MEMBER]
    if len(plan) == 1 and len(plan[0][0]) == len(raw):
        values = raw[plan[0][1]].astype(np.float64)
    else:
        values = np.zeros(len(raw))
        for index, member in plan:
            values[index] = raw[member][index]
    return values, raw["nvmlReturn"]


def _record_struct(struct: type) -> Struct | None:
    """A struct.Struct reading (valueType, nvmlReturn, 8 value bytes) from one record of
    nvml.h's layout; None for a layout not in that order (read member by member then)."""
    if struct not in _RECORDS:
        kind, ret, value = struct.valueType, struct.nvmlReturn, struct.value
        size = ctypes.sizeof(struct)
        if (kind.size, ret.size, value.size) == (4, 4, 8) and (
                kind.offset + 4 <= ret.offset and ret.offset + 4 <= value.offset
                and value.offset + 8 <= size):
            _RECORDS[struct] = Struct(
                f"={kind.offset}xI{ret.offset - kind.offset - 4}xI"
                f"{value.offset - ret.offset - 4}x8s{size - value.offset - 8}x")
        else:
            _RECORDS[struct] = None
    return _RECORDS[struct]


def field_values(answer: Any) -> tuple[list[float], list[int]]:
    """``nvmlDeviceGetFieldValues``'s answer as (values, nvmlReturn codes), record by record:
    cheaper than numpy for a few fields (PCIe asks two). The value of a failed field is 0."""
    values: list[float] = []
    codes: list[int] = []
    struct = getattr(answer, "_type_", None)
    record = _record_struct(struct) if _is_field_value_array(struct) else None
    if record is not None:
        for vtype, code, raw in record.iter_unpack(memoryview(answer).cast("B")):
            codes.append(code)
            values.append(0.0 if code else float(
                _VALUE_STRUCTS.get(vtype, _VALUE_STRUCTS[3]).unpack_from(raw)[0]))
        return values, codes
    for fv in answer:  # another binding: whatever objects with these members it returns
        code = fv.nvmlReturn
        codes.append(code)
        values.append(0.0 if code else float(
            getattr(fv.value, VALUE_MEMBER.get(fv.valueType, "ullVal"))))
    return values, codes


def _is_field_value_array(struct: Any) -> bool:
    """Whether ``struct`` (an answer's ``_type_``) is a ctypes nvmlFieldValue_t."""
    known = _FIELD_STRUCTS.get(struct)
    if known is None:
        known = _FIELD_STRUCTS[struct] = (
            isinstance(struct, type) and issubclass(struct, ctypes.Structure)
            and all(hasattr(struct, m) for m in ("nvmlReturn", "valueType", "value")))
    return known


class _GpuLost(Exception):
    """Internal: stop reading a GPU that fell off the bus for the rest of this tick."""


# Per GPU, in this order: the series of GpuSampler (value index -> metric, counter).
GPU_SERIES = (
    (semconv.METRIC_GPU_INFO, False),
    (semconv.METRIC_GPU_UTILIZATION, False),
    (semconv.METRIC_GPU_MEMORY_UTILIZATION, False),
    (semconv.METRIC_GPU_MEMORY_USED, False),
    (semconv.METRIC_GPU_MEMORY_TOTAL, False),
    (semconv.METRIC_GPU_POWER, False),
    (semconv.METRIC_GPU_ENERGY, True),
    (semconv.METRIC_GPU_TEMPERATURE, False),
    (semconv.METRIC_GPU_PCIE_TX, True),
    (semconv.METRIC_GPU_PCIE_RX, True),
)


class GpuSampler:
    """Per-GPU utilisation, memory, power, energy, temperature and PCIe byte counters."""

    name = "nvml"

    def __init__(self, session: NvmlSession):
        self.session = session
        self._keys: dict[str, SeriesKeys] = {}
        # (GPU index, metric) -> (ask again after, its NoData): what a GPU answered "not
        # supported" (utilisation in MIG mode, power on some boards) is not asked 10 times
        # a second, each a driver call and an exception; its no-data is still reported.
        self._unsupported: dict[tuple[int, str], tuple[float, NoData]] = {}
        self.unsupported_retry_s = UNSUPPORTED_RETRY_S
        self._now = 0.0

    def sample(self) -> SampleSet:
        return timed_sample(self.name, self._sample)

    def _sample(self, result: SampleSet) -> None:
        if self.session.unavailable(result):
            return
        nvml = self.session.nvml
        devices = self.session.devices
        self._now = time.monotonic()
        values: list[float | None] = []
        for gpu in devices:
            values += self._sample_gpu(nvml, gpu, result)
        # One block for all GPUs: one lookup per tick for what is missing (N/A values).
        key = tuple(gpu.uuid for gpu in devices)
        keys = self._keys.get(key)
        if keys is None:
            rows = []
            for gpu in devices:
                info = {**gpu.labels, "name": gpu.name, "pci_bus_id": gpu.pci_bus_id}
                rows += [(metric, gpu.entity, info if i == 0 else gpu.labels, counter)
                         for i, (metric, counter) in enumerate(GPU_SERIES)]
            keys = self._keys[key] = SeriesKeys(rows)
        result.add_block(keys, values)

    def _sample_gpu(self, nvml: Any, gpu: GpuDevice, result: SampleSet) -> list[float | None]:
        """The GPU_SERIES values of one GPU, None where NVML gave none (NoData recorded)."""
        v: list[float | None] = [None] * len(GPU_SERIES)
        v[0] = 1.0  # gpu info
        try:
            self._read_gpu(nvml, gpu, v, result)
        except _GpuLost:
            pass  # the rest of this GPU's values stay None for this tick
        return v

    def _read_gpu(self, nvml: Any, gpu: GpuDevice, v: list[float | None],
                  result: SampleSet) -> None:
        handle, error, now, unsupported = gpu.handle, nvml.NVMLError, self._now, self._unsupported

        def read(metric: str, call, *args):  # noqa: ANN001, ANN202
            known = unsupported.get((gpu.index, metric))
            if known is not None and now < known[0]:
                result.no_data.append(known[1])
                return None
            try:
                return call(handle, *args)
            except error as err:
                no_data = NoData(gpu.entity, metric, nvml_reason(nvml, err))
                result.no_data.append(no_data)
                if err.value == getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", -1):
                    unsupported[gpu.index, metric] = (now + self.unsupported_retry_s, no_data)
                if err.value == getattr(nvml, "NVML_ERROR_GPU_IS_LOST", -1):
                    raise _GpuLost from err
                return None

        util = read(semconv.METRIC_GPU_UTILIZATION, nvml.nvmlDeviceGetUtilizationRates)
        if util is not None:
            v[1], v[2] = util.gpu / 100.0, util.memory / 100.0
        mem = read(semconv.METRIC_GPU_MEMORY_USED, nvml.nvmlDeviceGetMemoryInfo)
        if mem is not None:
            v[3], v[4] = float(mem.used), float(mem.total)
        milliwatts = read(semconv.METRIC_GPU_POWER, nvml.nvmlDeviceGetPowerUsage)
        if milliwatts is not None:
            v[5] = milliwatts / 1000.0
        millijoules = read(semconv.METRIC_GPU_ENERGY, nvml.nvmlDeviceGetTotalEnergyConsumption)
        if millijoules is not None:
            v[6] = millijoules / 1000.0
        celsius = read(semconv.METRIC_GPU_TEMPERATURE, nvml.nvmlDeviceGetTemperature,
                       nvml.NVML_TEMPERATURE_GPU)
        if celsius is not None:
            v[7] = float(celsius)
        # Field values read the driver's running byte counters; nvmlDeviceGetPcieThroughput
        # would block ~20 ms per GPU per call, which a 10 Hz loop cannot afford.
        pcie = [nvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, nvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES]
        answer = read(semconv.METRIC_GPU_PCIE_TX, nvml.nvmlDeviceGetFieldValues, pcie)
        if answer is None:
            return
        values, codes = field_values(answer)
        for i, metric in enumerate((semconv.METRIC_GPU_PCIE_TX, semconv.METRIC_GPU_PCIE_RX)):
            if i >= len(codes):
                break
            if codes[i] != nvml.NVML_SUCCESS:
                err = nvml.NVMLError(codes[i])
                result.no_data.append(NoData(gpu.entity, metric, nvml_reason(nvml, err)))
            else:
                v[8 + i] = values[i]


class GpuProcessSampler:
    """The compute processes on each GPU with their host PIDs (slow: run it at ~1 Hz)."""

    name = "gpu_processes"

    def __init__(self, session: NvmlSession):
        self.session = session
        # uuid -> host PIDs of the last sample, for the placement sampler's PID -> pod join.
        self.pids_by_gpu: dict[str, list[int]] = {}
        # (uuid, pid) -> labels, reused while the process lives (sinks cache by identity).
        self._labels: dict[tuple[str, int], dict[str, str]] = {}

    def sample(self) -> SampleSet:
        return timed_sample(self.name, self._sample)

    def _sample(self, result: SampleSet) -> None:
        if self.session.unavailable(result):
            return
        nvml = self.session.nvml
        pids_by_gpu: dict[str, list[int]] = {}
        previous, self._labels = self._labels, {}
        for gpu in self.session.devices:
            try:
                processes = nvml.nvmlDeviceGetComputeRunningProcesses(gpu.handle)
            except nvml.NVMLError as err:
                result.no_data.append(
                    NoData(gpu.entity, semconv.METRIC_GPU_PROCESS, nvml_reason(nvml, err))
                )
                continue
            pids = []
            for proc in processes:
                pid = int(proc.pid)
                pids.append(pid)
                labels = previous.get((gpu.uuid, pid)) or {**gpu.labels, "pid": str(pid)}
                self._labels[gpu.uuid, pid] = labels
                result.samples.append(Sample(semconv.METRIC_GPU_PROCESS, 1.0, gpu.entity, labels))
                used = getattr(proc, "usedGpuMemory", None)
                if isinstance(used, int) and used >= 0:
                    result.samples.append(Sample(semconv.METRIC_GPU_PROCESS_MEMORY, float(used),
                                                 gpu.entity, labels))
            pids_by_gpu[gpu.uuid] = pids
        self.pids_by_gpu = pids_by_gpu
