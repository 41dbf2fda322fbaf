"""Static GPU topology from sysfs: each GPU's NUMA node and the InfiniBand device(s) closest."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

NVIDIA_VENDOR = "0x10de"
# PCI class 0x0300 (VGA) and 0x0302 (3D controller): datacenter GPUs are 0x0302.
GPU_CLASSES = ("0x0300", "0x0302")


@dataclass(frozen=True, slots=True)
class GpuTopology:
    """Where one GPU sits: NUMA node, and the IB devices nearest on the PCIe tree."""

    pci_bus_id: str
    numa_node: int | None
    closest_ib: tuple[str, ...]
    # "pcie-switch": under the same PCIe switch (GPUDirect RDMA at full speed),
    # "host-bridge": same root complex, "numa": same NUMA node only, "none".
    ib_affinity: str


def normalise_bus_id(bus_id: str) -> str:
    """NVML's ``00000000:01:00.0`` and sysfs's ``0000:01:00.0`` -> ``0000:01:00.0``."""
    domain, _, rest = bus_id.strip().lower().partition(":")
    return f"{domain[-4:].rjust(4, '0')}:{rest}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _numa(device_dir: Path) -> int | None:
    text = _read(device_dir / "numa_node")
    try:
        value = int(text) if text is not None else -1
    except ValueError:
        return None
    return value if value >= 0 else None  # -1: the platform did not say


def _pci_chain(path: Path) -> list[str]:
    """The PCI hops from the root complex down to the device (``pci0000:00``, bridges, dev)."""
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    for i, part in enumerate(parts):
        if part.startswith("pci") and ":" in part:
            return parts[i:]
    return []


def _common(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def gpu_topology(sysfs: Path | str = "/sys") -> list[GpuTopology]:
    """Every NVIDIA GPU on the PCI bus with its NUMA node and closest IB device(s)."""
    root = Path(sysfs)
    pci_dir = root / "bus" / "pci" / "devices"
    ib_dir = root / "class" / "infiniband"
    ibs: list[tuple[str, list[str], int | None]] = []
    if ib_dir.is_dir():
        for dev in sorted(ib_dir.iterdir()):
            device = dev / "device"
            if device.exists():
                ibs.append((dev.name, _pci_chain(device), _numa(device)))
    gpus = []
    if not pci_dir.is_dir():
        return gpus
    for dev in sorted(pci_dir.iterdir()):
        if _read(dev / "vendor") != NVIDIA_VENDOR:
            continue
        if not (_read(dev / "class") or "").startswith(GPU_CLASSES):
            continue
        chain = _pci_chain(dev)
        numa = _numa(dev)
        best, best_depth = [], 0
        for name, ib_chain, _ in ibs:
            # Depth 1 = same root complex; deeper = a shared bridge/switch below it.
            depth = _common(chain[:-1], ib_chain[:-1])
            if depth > best_depth:
                best, best_depth = [name], depth
            elif depth == best_depth and depth > 0:
                best.append(name)
        if best_depth >= 2:
            affinity = "pcie-switch"
        elif best_depth == 1:
            affinity = "host-bridge"
        else:
            best = [name for name, _, ib_numa in ibs if numa is not None and ib_numa == numa]
            affinity = "numa" if best else "none"
        gpus.append(GpuTopology(normalise_bus_id(dev.name), numa, tuple(best), affinity))
    return gpus
