"""A fake NVML module that replays recorded `nvidia-smi -q -x` values (tests and bench only).

It has the call surface of nvidia-ml-py's ``pynvml`` that kvprof uses and reuses the real
library's constants, ``NVMLError`` classes and ``c_nvmlFieldValue_t`` structs, so the code under
test handles exactly what the real binding returns. Values come from the XML fixtures:
utilisation, memory, power, temperature, PCI bus id, UUID, name, compute processes. "N/A" in
the XML replays as NVML_ERROR_NOT_SUPPORTED. PCIe and NVLink counters are running totals
integrated over the fake clock (``advance``) from the recorded PCIe tx/rx rates; the XML
fixtures record no NVLink traffic, so NVLink links/rates are an explicit constructor choice.
"""

from __future__ import annotations

import ctypes
import functools
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pynvml

MIB = 1024 * 1024


@dataclass
class FakeGpu:
    index: int
    uuid: str
    name: str
    pci_bus_id: str
    gpu_util: int | None
    mem_util: int | None
    mem_used: int
    mem_total: int
    power_mw: int | None
    temperature: int | None
    pcie_tx_bps: float
    pcie_rx_bps: float
    processes: list[tuple[int, int]] = field(default_factory=list)  # (pid, used bytes)


def _num(text: str | None) -> float | None:
    if text is None:
        return None
    match = re.match(r"\s*([0-9.]+)", text)
    return float(match.group(1)) if match else None  # "N/A" -> None


def parse_nvidia_smi_xml(path: Path | str) -> list[FakeGpu]:
    """The GPUs of one `nvidia-smi -q -x` file, values in NVML's units."""
    root = ET.parse(path).getroot()
    gpus = []
    for i, g in enumerate(root.findall("gpu")):
        util = g.find("utilization")
        fb = g.find("fb_memory_usage")
        # driver >= 535 writes <gpu_power_readings>, older drivers <power_readings>
        power = g.find("gpu_power_readings")
        if power is None:
            power = g.find("power_readings")
        power_w = _num(power.findtext("power_draw")) if power is not None else None
        procs = []
        for p in g.findall("processes/process_info"):
            if "C" in (p.findtext("type") or ""):
                procs.append((int(p.findtext("pid")), int(_num(p.findtext("used_memory")) * MIB)))
        tx = _num(g.findtext("pci/tx_util")) or 0.0
        rx = _num(g.findtext("pci/rx_util")) or 0.0
        gpu_util = _num(util.findtext("gpu_util"))
        mem_util = _num(util.findtext("memory_util"))
        temp = _num(g.findtext("temperature/gpu_temp"))
        gpus.append(FakeGpu(
            index=i,
            uuid=g.findtext("uuid"),
            name=g.findtext("product_name"),
            pci_bus_id=g.findtext("pci/pci_bus_id"),
            gpu_util=None if gpu_util is None else int(gpu_util),
            mem_util=None if mem_util is None else int(mem_util),
            mem_used=int(_num(fb.findtext("used")) * MIB),
            mem_total=int(_num(fb.findtext("total")) * MIB),
            power_mw=None if power_w is None else int(round(power_w * 1000)),
            temperature=None if temp is None else int(temp),
            # nvidia-smi's "KB/s" is 1000 bytes/s
            pcie_tx_bps=tx * 1000.0,
            pcie_rx_bps=rx * 1000.0,
            processes=procs,
        ))
    return gpus


def replicate(gpus: list[FakeGpu], count: int) -> list[FakeGpu]:
    """``count`` GPUs cycling through the recorded ones, each with its own UUID and bus id."""
    out = []
    for i in range(count):
        src = gpus[i % len(gpus)]
        out.append(FakeGpu(**{**src.__dict__, "index": i,
                              "uuid": src.uuid[:-2] + f"{i:02x}",
                              "pci_bus_id": f"00000000:{0x18 + i * 0x10:02X}:00.0",
                              "processes": list(src.processes)}))
    return out


class _Handle:
    def __init__(self, gpu: FakeGpu):
        self.gpu = gpu


class FakeNvml:
    """Module-like fake of ``pynvml``; pass it as ``nvml=`` to NvmlSession / build_samplers."""

    NVMLError = pynvml.NVMLError

    def __init__(self, gpus: list[FakeGpu], *, nvlink_links: int = 0,
                 nvlink_kib_per_s: float = 0.0, init_error: int | None = None,
                 errors: dict[tuple[int, str], int] | None = None,
                 field_errors: dict[tuple[int, int], int] | None = None,
                 lost_gpus: set[int] = frozenset()):
        self.gpus = gpus
        self.nvlink_links = nvlink_links
        self.nvlink_kib_per_s = nvlink_kib_per_s
        self.init_error = init_error
        self.errors = errors or {}
        self.field_errors = field_errors or {}
        self.lost_gpus = set(lost_gpus)
        self.elapsed = 0.0
        self.calls: dict[str, int] = {}
        self.initialised = 0
        self._plans: dict[tuple, tuple] = {}
        # When a list: every library call as (method, args), so bench/collector_cost.py can
        # replay exactly the calls a run made and subtract the fake's own CPU time.
        self.journal: list | None = None


    def advance(self, seconds: float) -> None:
        self.elapsed += seconds

    def _call(self, name: str, handle: _Handle | None = None) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if handle is None:
            return
        if handle.gpu.index in self.lost_gpus:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        code = self.errors.get((handle.gpu.index, name))
        if code is not None:
            raise pynvml.NVMLError(code)

    # --- library ------------------------------------------------------------------------
    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        self._call("nvmlInit")
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self) -> None:  # noqa: N802
        self._call("nvmlShutdown")

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        self._call("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:  # noqa: N802
        self._call("nvmlDeviceGetHandleByIndex")
        if index in self.lost_gpus:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return _Handle(self.gpus[index])

    # --- identity -----------------------------------------------------------------------
    def nvmlDeviceGetUUID(self, h: _Handle) -> str:  # noqa: N802
        self._call("nvmlDeviceGetUUID", h)
        return h.gpu.uuid

    def nvmlDeviceGetName(self, h: _Handle) -> str:  # noqa: N802
        self._call("nvmlDeviceGetName", h)
        return h.gpu.name

    def nvmlDeviceGetPciInfo(self, h: _Handle) -> SimpleNamespace:  # noqa: N802
        self._call("nvmlDeviceGetPciInfo", h)
        return SimpleNamespace(busId=h.gpu.pci_bus_id)

    # --- values -------------------------------------------------------------------------
    @staticmethod
    def _maybe(value):
        if value is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return value

    def nvmlDeviceGetUtilizationRates(self, h: _Handle) -> SimpleNamespace:  # noqa: N802
        self._call("nvmlDeviceGetUtilizationRates", h)
        return SimpleNamespace(gpu=self._maybe(h.gpu.gpu_util), memory=self._maybe(h.gpu.mem_util))

    def nvmlDeviceGetMemoryInfo(self, h: _Handle) -> SimpleNamespace:  # noqa: N802
        self._call("nvmlDeviceGetMemoryInfo", h)
        return SimpleNamespace(used=h.gpu.mem_used, total=h.gpu.mem_total,
                               free=h.gpu.mem_total - h.gpu.mem_used)

    def nvmlDeviceGetPowerUsage(self, h: _Handle) -> int:  # noqa: N802
        self._call("nvmlDeviceGetPowerUsage", h)
        return self._maybe(h.gpu.power_mw)

    def nvmlDeviceGetTotalEnergyConsumption(self, h: _Handle) -> int:  # noqa: N802
        self._call("nvmlDeviceGetTotalEnergyConsumption", h)
        # Not in `nvidia-smi -q -x`: integrate the recorded power draw over the fake clock.
        return int(self._maybe(h.gpu.power_mw) * self.elapsed)

    def nvmlDeviceGetTemperature(self, h: _Handle, sensor: int) -> int:  # noqa: N802
        self._call("nvmlDeviceGetTemperature", h)
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._maybe(h.gpu.temperature)

    def nvmlDeviceGetComputeRunningProcesses(self, h: _Handle) -> list:  # noqa: N802
        self._call("nvmlDeviceGetComputeRunningProcesses", h)
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in h.gpu.processes]

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h: _Handle, link: int) -> SimpleNamespace:  # noqa: N802
        self._call("nvmlDeviceGetNvLinkRemotePciInfo", h)
        if link >= self.nvlink_links:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        # An NVSwitch system: every link ends on a switch port.
        return SimpleNamespace(busId=f"00000000:{0xC0 + link // 4:02X}:00.0")

    def nvmlDeviceGetFieldValues(self, h: _Handle, field_ids: list):  # noqa: N802
        """A fresh ctypes array of c_nvmlFieldValue_t, as pynvml returns.

        Built member by member once per request (slow: pynvml's Python __setattr__), then
        copied from that template per call with the running counters written through numpy,
        so the fake's own cost, which bench/collector_cost.py subtracts, stays small next to
        kvprof's and does not drown it in noise.
        """
        self._call("nvmlDeviceGetFieldValues", h)
        key = (h.gpu.index, tuple(field_ids))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan(h.gpu, field_ids)
        array_type, template, counters, per_second = plan
        out = array_type.from_buffer_copy(template)
        if len(counters):
            import numpy as np

            view = np.frombuffer(out, dtype=_ULL_VIEW)
            view["ull"][counters] = (per_second * self.elapsed).astype(np.uint64)
        return out

    def _plan(self, gpu: FakeGpu, field_ids: list):
        import numpy as np

        template = (pynvml.c_nvmlFieldValue_t * len(field_ids))()
        counters, per_second = [], []
        for i, (fv, item) in enumerate(zip(template, field_ids, strict=True)):
            field_id, scope = item if isinstance(item, tuple) else (item, 0)
            fv.fieldId, fv.scopeId = field_id, scope
            fv.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
            fv.nvmlReturn = pynvml.NVML_SUCCESS
            code = self.field_errors.get((gpu.index, field_id))
            value = self._field(gpu, field_id, scope) if code is None else None
            if value is None:
                fv.nvmlReturn = code if code is not None else pynvml.NVML_ERROR_NOT_SUPPORTED
            elif field_id == pynvml.NVML_FI_DEV_NVLINK_GET_STATE:
                fv.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT  # as the driver answers
                fv.value.uiVal = int(value[0])
            elif value[1]:
                counters.append(i)
                per_second.append(value[1])
            else:
                fv.value.ullVal = int(value[0])
        return (type(template), bytes(template), np.array(counters, dtype=np.intp),
                np.array(per_second, dtype=np.float64))

    def _field(self, gpu: FakeGpu, field_id: int, scope: int) -> tuple[float, float] | None:
        """(constant, per second of the fake clock) of a field, None when unsupported."""
        if field_id == pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES:
            return 0.0, gpu.pcie_tx_bps
        if field_id == pynvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES:
            return 0.0, gpu.pcie_rx_bps
        if field_id == pynvml.NVML_FI_DEV_NVLINK_LINK_COUNT:
            return (self.nvlink_links, 0.0) if self.nvlink_links else None
        if scope >= self.nvlink_links:
            return None
        if field_id == pynvml.NVML_FI_DEV_NVLINK_GET_STATE:
            return 1, 0.0
        if field_id in (pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX,
                        pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX):
            # Links differ (scope + 1) so a mixed-up scope shows in the test.
            return 0.0, self.nvlink_kib_per_s * (scope + 1)
        return None


# The nvmlValue_t union of each nvmlFieldValue_t record read as an unsigned 64-bit integer.
_ULL_VIEW = {"names": ["ull"], "formats": ["<u8"],
             "offsets": [pynvml.c_nvmlFieldValue_t.value.offset],
             "itemsize": ctypes.sizeof(pynvml.c_nvmlFieldValue_t)}


def _journaled(method):
    @functools.wraps(method)
    def call(self, *args):
        if self.journal is not None:
            self.journal.append((method, args))
        return method(self, *args)
    return call


for _name, _method in list(vars(FakeNvml).items()):
    if _name.startswith("nvml"):
        setattr(FakeNvml, _name, _journaled(_method))
for _name, _value in vars(pynvml).items():
    if _name.startswith("NVML_"):  # the real library's constants, plain attributes as there
        setattr(FakeNvml, _name, _value)


def replay(fake: FakeNvml, journal: list) -> float:
    """Make the journaled calls again, nothing else, and return the CPU seconds they took.

    Each call goes through the same journaling wrapper as in the journaled run (into a
    throwaway journal), so what is timed is exactly the fake library's side of those calls.
    NVML errors are raised as then: raising is the library's cost, kvprof's handling is not.
    """
    import time

    calls = [(getattr(fake, method.__name__), args) for method, args in journal]
    fake.journal, saved = [], fake.journal
    start = time.process_time()
    for call, args in calls:
        try:
            call(*args)
        except pynvml.NVMLError:
            pass
    spent = time.process_time() - start
    fake.journal = saved
    return spent
