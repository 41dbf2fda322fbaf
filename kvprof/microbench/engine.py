"""Copy engines: block gathers, scatters, raw copies and byte checks on the CPU or a CUDA device."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch

Job = Callable[[], None]


class DescriptorTable(Protocol):
    """One row per descriptor: where its bytes are read from and written to."""

    src_addr: np.ndarray  # uint64 addresses
    dst_addr: np.ndarray
    unit_bytes: int

    def views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(destination row, source row) tensors, for engines that copy through torch."""
        ...


# (row inside the chunk, byte inside the row) of the first differing byte.
Mismatch = tuple[int, int]

# Big flat copies are cut into pieces of this size so every worker thread gets a share.
_RAW_PIECE_BYTES = 8 << 20


def _memcmp() -> Callable[[int, int, int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    fn = ctypes.CDLL(name).memcmp
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


class CpuEngine:
    """NumPy row copies spread over a few threads (NumPy drops the GIL while copying).

    torch.index_select / index_copy_ on uint8 rows of 8-16 KiB run at a fraction of memcpy
    speed on the CPU (they go element by element); np.take(mode="clip") and fancy-index
    assignment copy whole rows with memcpy, which is what a paged KV copy is.
    """

    device = "cpu"

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._memcmp = _memcmp()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def run(self, jobs: Sequence[Job]) -> None:
        """Run jobs dealt round-robin to the threads; returns when all are done."""
        if self._pool is None or len(jobs) == 1:
            for job in jobs:
                job()
            return
        shares = [jobs[i :: self.threads] for i in range(self.threads)]
        futures = [self._pool.submit(_run_all, share) for share in shares if share]
        for f in futures:
            f.result()

    def sync(self) -> None:
        """CPU copies are complete when run() returns."""

    def take_job(self, src: torch.Tensor, idx: np.ndarray, out: torch.Tensor) -> Job:
        """out[i] = src[idx[i]] (paged rows -> contiguous chunk)."""
        s, o, i = src.numpy(), out.numpy(), np.ascontiguousarray(idx, dtype=np.intp)
        # mode="clip" skips np.take's buffered out= path; ids were validated when laid out.
        return lambda: np.take(s, i, axis=0, out=o, mode="clip")

    def put_job(self, src: torch.Tensor, dst: torch.Tensor, idx: np.ndarray) -> Job:
        """dst[idx[i]] = src[i] (contiguous chunk -> paged rows)."""
        s, d, i = src.numpy(), dst.numpy(), np.ascontiguousarray(idx, dtype=np.intp)

        def put() -> None:
            d[i] = s

        return put

    def copy_jobs(self, dst: torch.Tensor, src: torch.Tensor) -> list[Job]:
        """A raw contiguous copy of src into dst, cut into pieces for the threads."""
        d, s = dst.numpy().reshape(-1), src.numpy().reshape(-1)
        jobs: list[Job] = []
        for start in range(0, s.size, _RAW_PIECE_BYTES):
            stop = min(start + _RAW_PIECE_BYTES, s.size)
            jobs.append(lambda a=start, b=stop: np.copyto(d[a:b], s[a:b]))
        return jobs

    def descriptor_copier(self, table: DescriptorTable) -> Job:
        """One memcpy per descriptor, as a NIXL/UCX backend issues them."""
        dst_addr = table.dst_addr.tolist()
        src_addr = table.src_addr.tolist()
        size = table.unit_bytes
        memmove = ctypes.memmove

        def copy_each() -> None:
            for d, s in zip(dst_addr, src_addr, strict=True):
                memmove(d, s, size)

        return copy_each

    def first_mismatch(
        self, dst_rows: torch.Tensor, idx: np.ndarray, expected: torch.Tensor
    ) -> Mismatch | None:
        """Compare dst_rows[idx] with expected byte for byte."""
        want = expected.numpy()
        rows = dst_rows.numpy()
        idx = np.asarray(idx, dtype=np.intp)
        if self._memcmp is None or not want.flags.c_contiguous:
            got = np.take(rows, idx, axis=0)
            if np.array_equal(got, want):
                return None
            row, byte = np.argwhere(got != want)[0]
            return int(row), int(byte)
        # memcmp each row where it lies: reads both sides once and writes nothing, where a
        # gather-then-compare would copy half a GB per check. ctypes drops the GIL per call.
        unit = want.shape[-1]
        dst_addr = (rows.ctypes.data + idx * unit).tolist()
        ref_base = want.ctypes.data
        memcmp = self._memcmp
        for i, addr in enumerate(dst_addr):
            if memcmp(addr, ref_base + i * unit, unit) != 0:
                byte = int(np.flatnonzero(rows[idx[i]] != want[i])[0])
                return i, byte
        return None


class CudaEngine:
    """torch index ops on one CUDA device; host-staged chunks cross PCIe inside the job."""

    def __init__(self, device: str) -> None:
        self.device = device

    def close(self) -> None:
        """Nothing to release: the caching allocator keeps the memory."""

    def run(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            job()
        self.sync()

    def sync(self) -> None:
        import torch

        torch.cuda.synchronize(self.device)

    def _index(self, idx: np.ndarray) -> torch.Tensor:
        import torch

        return torch.as_tensor(np.asarray(idx, dtype=np.int64), device=self.device)

    def take_job(self, src: torch.Tensor, idx: np.ndarray, out: torch.Tensor) -> Job:
        import torch

        i = self._index(idx)
        if out.device == src.device:
            return lambda: torch.index_select(src, 0, i, out=out)
        # Host-staged: gather on the GPU, then device -> pinned host.
        return lambda: out.copy_(torch.index_select(src, 0, i), non_blocking=True)

    def put_job(self, src: torch.Tensor, dst: torch.Tensor, idx: np.ndarray) -> Job:
        i = self._index(idx)
        if src.device == dst.device:
            return lambda: dst.index_copy_(0, i, src)
        return lambda: dst.index_copy_(0, i, src.to(dst.device, non_blocking=True))

    def copy_jobs(self, dst: torch.Tensor, src: torch.Tensor) -> list[Job]:
        return [lambda: dst.copy_(src, non_blocking=True)]

    def descriptor_copier(self, table: DescriptorTable) -> Job:
        """One cudaMemcpyAsync per descriptor (through torch row views)."""
        pairs = table.views()

        def copy_each() -> None:
            for d, s in pairs:
                d.copy_(s, non_blocking=True)

        return copy_each

    def first_mismatch(
        self, dst_rows: torch.Tensor, idx: np.ndarray, expected: torch.Tensor
    ) -> Mismatch | None:
        import torch

        got = torch.index_select(dst_rows, 0, self._index(idx))
        want = expected.to(got.device)
        if torch.equal(got, want):
            return None
        row, byte = (got != want).nonzero()[0].tolist()
        return int(row), int(byte)


def _run_all(jobs: Sequence[Job]) -> None:
    for job in jobs:
        job()


def make_engine(device: str, threads: int) -> CpuEngine | CudaEngine:
    """The copy engine for a device string ('cpu' or 'cuda[:N]')."""
    if device.startswith("cuda"):
        return CudaEngine(device)
    return CpuEngine(threads)
