"""Transports inside one process: a plain copy, and NIXL between two agents (UCX loopback)."""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from kvprof.errors import ResourceAbsentError
from kvprof.microbench.engine import CpuEngine, CudaEngine
from kvprof.microbench.layout import TransferLayout
from kvprof.microbench.paged import SourcePattern
from kvprof.microbench.sides import DecodeSide, PrefillSide, descriptor_table

log = logging.getLogger(__name__)

NIXL_HINT = (
    "Install nixl with a UCX backend (pip install nixl); on a CPU-only host UCX needs "
    "UCX_NET_DEVICES=lo (kvprof sets it when unset). Or use --transport copy or gloo."
)


class CopyWire:
    """The wire as one memcpy per decode rank: what a same-process hand-off costs."""

    name = "copy"
    methods = {
        "wire": "one memcpy of each decode rank's staging buffer",
        "per_descriptor": "one memcpy per descriptor, issued from a Python loop",
    }

    def connect(self, prefill: PrefillSide, decode: DecodeSide) -> dict[str, float]:
        self._jobs = [
            job
            for src, dst in zip(prefill.staging, decode.recv, strict=True)
            for job in prefill.engine.copy_jobs(dst, src)
        ]
        table = descriptor_table(prefill, decode, with_views=isinstance(prefill.engine, CudaEngine))
        self._per_descriptor = prefill.engine.descriptor_copier(table)
        self.descriptors = len(table.src_addr)
        self._engine = prefill.engine
        return {}

    def send(self) -> None:
        self._engine.run(self._jobs)

    def per_descriptor(self) -> None:
        self._per_descriptor()
        self._engine.sync()

    def close(self) -> None:
        """Nothing was opened."""


class NixlWire:
    """NIXL READs by a decode agent from a prefill agent: the path vLLM's NixlConnector takes."""

    name = "nixl"
    methods = {
        "wire": "NIXL READ (UCX), one descriptor per decode rank's staging buffer",
        "per_descriptor": "NIXL READ (UCX), one descriptor per (layer, K|V, block, heads)",
    }

    def __init__(self, device: str) -> None:
        self.device = device
        self.mem_type = "VRAM" if device.startswith("cuda") else "DRAM"
        self._handles: list = []
        self._regs: list = []
        self.prefill_agent = self.decode_agent = None

    def connect(self, prefill: PrefillSide, decode: DecodeSide) -> dict[str, float]:
        t0 = time.perf_counter()
        self.prefill_agent, self.decode_agent = _nixl_agents()
        t1 = time.perf_counter()
        src_tensors = [t for c in prefill.caches for t in c.tensors] + prefill.staging
        dst_tensors = [t for c in decode.caches for t in c.tensors] + decode.recv
        try:
            self._regs = [
                self.prefill_agent.register_memory(src_tensors),
                self.decode_agent.register_memory(dst_tensors),
            ]
            remote = self.decode_agent.add_remote_agent(self.prefill_agent.get_agent_metadata())
        except Exception as exc:  # nixl raises its own nixlBackendError and RuntimeError
            raise ResourceAbsentError(
                f"NIXL could not register memory: {exc}", hint=NIXL_HINT
            ) from None
        t2 = time.perf_counter()
        # One descriptor per decode rank for the staged wire, one per block for per_descriptor.
        dev = 0 if self.mem_type == "DRAM" else int(prefill.staging[0].device.index or 0)

        def whole(tensors: list) -> np.ndarray:
            return np.array([(t.data_ptr(), t.numel(), dev) for t in tensors], dtype=np.uint64)

        self._wire = self._read(whole(decode.recv), whole(prefill.staging), remote)
        table = descriptor_table(prefill, decode, with_views=False)
        self.descriptors = len(table.src_addr)
        size = np.full(self.descriptors, table.unit_bytes, dtype=np.uint64)
        devs = np.full(self.descriptors, dev, dtype=np.uint64)
        self._paged = self._read(
            np.stack([table.dst_addr, size, devs], axis=1),
            np.stack([table.src_addr, size, devs], axis=1),
            remote,
        )
        t3 = time.perf_counter()
        return {
            "agent_creation_s": t1 - t0,
            "registration_s": t2 - t1,
            "descriptor_prep_s": t3 - t2,
        }

    def _read(self, local: np.ndarray, remote_descs: np.ndarray, remote: str):
        agent = self.decode_agent
        local_h = agent.prep_xfer_dlist("NIXL_INIT_AGENT", local, self.mem_type)
        remote_h = agent.prep_xfer_dlist(remote, remote_descs, self.mem_type)
        idx = np.arange(len(local), dtype=np.int32)
        handle = agent.make_prepped_xfer("READ", local_h, idx, remote_h, idx)
        self._handles += [handle, local_h, remote_h]
        return handle

    def _transfer(self, handle) -> None:
        agent = self.decode_agent
        state = agent.transfer(handle)
        while state == "PROC":
            state = agent.check_xfer_state(handle)
        if state != "DONE":
            raise ResourceAbsentError(f"NIXL transfer ended in state {state}", hint=NIXL_HINT)

    def send(self) -> None:
        self._transfer(self._wire)

    def per_descriptor(self) -> None:
        self._transfer(self._paged)

    def close(self) -> None:
        for h in reversed(self._handles):
            h.release()
        self._handles = []
        for agent, reg in zip((self.prefill_agent, self.decode_agent), self._regs, strict=False):
            agent.deregister_memory(reg)
        self._regs = []


def nixl_usable() -> tuple[bool, str]:
    """Whether nixl imports and offers UCX, without creating an agent."""
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    try:
        from nixl._api import nixl_agent  # noqa: F401
    except Exception as exc:  # an ImportError, or a backend library that fails to load
        return False, f"nixl does not import: {exc}"
    return True, "nixl imports"


def _nixl_agents():
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    # UCX picks no network device on a host without RDMA unless told to use loopback.
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except Exception as exc:
        raise ResourceAbsentError(f"nixl is not usable here: {exc}", hint=NIXL_HINT) from None
    try:
        config = nixl_agent_config(backends=["UCX"])
        prefill = nixl_agent(f"kvprof-prefill-{os.getpid()}", config)
        decode = nixl_agent(f"kvprof-decode-{os.getpid()}", config)
    except Exception as exc:
        raise ResourceAbsentError(f"cannot create NIXL agents: {exc}", hint=NIXL_HINT) from None
    if "UCX" not in prefill.backends or "UCX" not in decode.backends:
        raise ResourceAbsentError("nixl has no UCX backend here", hint=NIXL_HINT)
    return prefill, decode


class InProcessSession:
    """Both sides in this process; the wire is a CopyWire or a NixlWire."""

    def __init__(
        self,
        layout: TransferLayout,
        engine: CpuEngine | CudaEngine,
        device: str,
        wire: CopyWire | NixlWire,
        seed: int = 0,
    ) -> None:
        self.layout = layout
        self.engine = engine
        self.wire = wire
        self.name = wire.name
        self.methods = wire.methods
        pattern = SourcePattern(layout, seed)
        self.prefill = PrefillSide(layout, engine, device, pattern)
        self.decode = DecodeSide(layout, engine, device, pattern)
        del pattern
        # The raw copy that gives each step's limit: staging -> receive buffer, same bytes,
        # contiguous; the receive buffers are poisoned before every transfer anyway.
        self._raw_jobs = [
            job
            for src, dst in zip(self.prefill.staging, self.decode.recv, strict=True)
            for job in engine.copy_jobs(dst.view(-1), src.view(-1))
        ]
        self.per_descriptor_note: dict | None = None

    def setup(self) -> dict[str, float]:
        """First contact: connect the wire, build the index and descriptor lists."""
        t0 = time.perf_counter()
        self.prefill.build_descriptors()
        self.decode.build_descriptors()
        t1 = time.perf_counter()
        parts = self.wire.connect(self.prefill, self.decode)
        t2 = time.perf_counter()
        parts = {"index_build_s": t1 - t0, **parts, "total_s": t2 - t0}
        self.descriptors = self.wire.descriptors
        return parts

    def run_transfer(self, step: str, run: int, corrupt: bool) -> dict[str, float]:
        """gather -> wire -> scatter once, verified; seconds per step."""
        self.decode.poison()
        t0 = time.perf_counter()
        self.prefill.gather()
        t1 = time.perf_counter()
        self.wire.send()
        t2 = time.perf_counter()
        self.decode.scatter()
        t3 = time.perf_counter()
        if corrupt:
            self.decode.corrupt_one_byte()
        self.decode.verify(step, run)
        return {"gather": t1 - t0, "wire": t2 - t1, "scatter": t3 - t2, "total": t3 - t0}

    def run_per_descriptor(self, step: str, run: int, corrupt: bool) -> float:
        """The same bytes, paged to paged, one copy per descriptor; verified."""
        self.decode.poison(receive_buffers=False)
        t0 = time.perf_counter()
        self.wire.per_descriptor()
        t1 = time.perf_counter()
        if corrupt:
            self.decode.corrupt_one_byte()
        self.decode.verify(step, run)
        return t1 - t0

    def raw_copy(self) -> float:
        """One raw contiguous copy of the same byte count: the path's limit, measured now."""
        t0 = time.perf_counter()
        self.engine.run(self._raw_jobs)
        return time.perf_counter() - t0

    def close(self) -> None:
        try:
            self.wire.close()
        finally:
            self.engine.close()
