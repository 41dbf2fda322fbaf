"""The two ends of a hand-off: the prefill side's paged cache and staging, the decode side's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from kvprof.errors import VerificationError
from kvprof.microbench.engine import CpuEngine, CudaEngine
from kvprof.microbench.layout import TransferLayout
from kvprof.microbench.paged import PagedKvCache, SourcePattern

if TYPE_CHECKING:
    import torch

Engine = CpuEngine | CudaEngine
# One cache line at each end of every descriptor is zeroed before each run.
POISON_BYTES = 64


def _staging(layout: TransferLayout, rank: int, device: str, pinned: bool) -> torch.Tensor:
    """A contiguous buffer holding decode rank `rank`'s bytes: [layer_kv, streams, blocks, unit]."""
    import torch

    shape = (layout.layer_kv, len(layout.streams[rank]), layout.blocks, layout.unit_bytes)
    return torch.empty(shape, dtype=torch.uint8, device=device, pin_memory=pinned)


class PrefillSide:
    """Filled source paged caches (one per prefill rank) and a staging buffer per decode rank."""

    def __init__(
        self,
        layout: TransferLayout,
        engine: Engine,
        device: str,
        pattern: SourcePattern,
        staging_device: str | None = None,
    ) -> None:
        self.layout = layout
        self.engine = engine
        self.caches = [
            PagedKvCache(layout, layout.src_heads, device) for _ in range(layout.prefill_tp)
        ]
        for rank, cache in enumerate(self.caches):
            pattern.fill(cache, rank)
        staging_device = staging_device or device
        pinned = staging_device == "cpu" and device.startswith("cuda")
        self.staging = [
            _staging(layout, d, staging_device, pinned) for d in range(layout.decode_tp)
        ]
        self._gather_jobs: list = []

    def build_descriptors(self) -> None:
        """Index lists of the gather (the 'descriptor list build' part of setup)."""
        lay = self.layout
        jobs = []
        for d, streams in enumerate(lay.streams):
            for lk in range(lay.layer_kv):
                for s, stream in enumerate(streams):
                    src = self.caches[stream.src_rank].rows(lk)
                    jobs.append(
                        self.engine.take_job(src, lay.src_rows(stream), self.staging[d][lk, s])
                    )
        self._gather_jobs = jobs

    def gather(self) -> None:
        """Paged blocks -> contiguous staging (host-staged: also device -> host)."""
        self.engine.run(self._gather_jobs)

    def row(self, rank: int, layer_kv: int, stream: int, block: int) -> torch.Tensor:
        """The source bytes of one descriptor."""
        st = self.layout.streams[rank][stream]
        return self.caches[st.src_rank].rows(layer_kv)[int(self.layout.src_rows(st)[block])]


class DecodeSide:
    """Destination paged caches (one per decode rank), receive buffers and the reference bytes."""

    def __init__(
        self,
        layout: TransferLayout,
        engine: Engine,
        device: str,
        pattern: SourcePattern,
        staging_device: str | None = None,
    ) -> None:
        import torch

        self.layout = layout
        self.engine = engine
        self.caches = [
            PagedKvCache(layout, layout.dst_heads, device) for _ in range(layout.decode_tp)
        ]
        staging_device = staging_device or device
        pinned = staging_device == "cpu" and device.startswith("cuda")
        self.recv = [_staging(layout, d, staging_device, pinned) for d in range(layout.decode_tp)]
        # What must arrive, built by torch advanced indexing straight from the source pattern:
        # a different code path from the gather under test, so a wrong id cannot agree with it.
        self.reference = []
        for streams in layout.streams:
            ref = torch.empty(
                (layout.layer_kv, len(streams), layout.blocks, layout.unit_bytes),
                dtype=torch.uint8,
                device=device,
            )
            for lk in range(layout.layer_kv):
                for s, st in enumerate(streams):
                    rows = torch.from_numpy(layout.src_rows(st))
                    ref[lk, s].copy_(pattern.rows(st.src_rank, lk)[rows])
            self.reference.append(ref)
        self._scatter_jobs: list = []

    def build_descriptors(self) -> None:
        """Index lists of the scatter."""
        lay = self.layout
        jobs = []
        for d, streams in enumerate(lay.streams):
            for lk in range(lay.layer_kv):
                for s, stream in enumerate(streams):
                    dst = self.caches[d].rows(lk)
                    jobs.append(self.engine.put_job(self.recv[d][lk, s], dst, lay.dst_rows(stream)))
        self._scatter_jobs = jobs

    def scatter(self) -> None:
        """Contiguous received bytes -> paged blocks at the destination ids."""
        self.engine.run(self._scatter_jobs)

    def poison(self, receive_buffers: bool = True) -> None:
        """Zero the first and last cache line of every descriptor a run must write.

        A run that moves nothing, or cuts a descriptor short at either end, then cannot
        verify; zeroing whole caches would cost as much as the copies being timed.
        """
        rows = [cache.rows(lk) for cache in self.caches for lk in range(self.layout.layer_kv)]
        if receive_buffers:
            rows += [buf.view(-1, self.layout.unit_bytes) for buf in self.recv]
        edge = min(POISON_BYTES, self.layout.unit_bytes)
        for r in rows:
            r[:, :edge].zero_()
            r[:, -edge:].zero_()
        self.engine.sync()

    def row(self, rank: int, layer_kv: int, stream: int, block: int) -> torch.Tensor:
        """The destination bytes of one descriptor."""
        st = self.layout.streams[rank][stream]
        return self.caches[rank].rows(layer_kv)[int(self.layout.dst_rows(st)[block])]

    def corrupt_one_byte(self) -> None:
        """Test hook: flip one byte of the very last descriptor (last rank, layer, V, block)."""
        lay = self.layout
        last = lay.decode_tp - 1
        row = self.row(last, lay.layer_kv - 1, len(lay.streams[last]) - 1, lay.blocks - 1)
        row[7:8].bitwise_xor_(0xFF)
        self.engine.sync()

    def verify(self, step: str, run: int) -> None:
        """Every descriptor of every decode rank byte-exact, or VerificationError."""
        lay = self.layout
        chunks = [
            (d, lk, s, st)
            for d, streams in enumerate(lay.streams)
            for lk in range(lay.layer_kv)
            for s, st in enumerate(streams)
        ]
        found: list = [None] * len(chunks)

        def check(i: int, d: int, lk: int, s: int, st) -> None:
            found[i] = self.engine.first_mismatch(
                self.caches[d].rows(lk), lay.dst_rows(st), self.reference[d][lk, s]
            )

        self.engine.run([lambda i=i, c=c: check(i, *c) for i, c in enumerate(chunks)])
        for (d, lk, s, _), bad in zip(chunks, found, strict=True):
            if bad is not None:
                raise mismatch_error(lay, step, run, d, lk, s, bad)

    def verify_descriptors(self, step: str, run: int, picks: list[DescriptorRef]) -> None:
        """Check only the listed descriptors (runs that move a labelled subset)."""
        import torch

        for p in picks:
            got = self.row(p.rank, p.layer_kv, p.stream, p.block)
            want = self.reference[p.rank][p.layer_kv, p.stream, p.block]
            if not torch.equal(got, want.to(got.device)):
                byte = int((got != want.to(got.device)).nonzero()[0])
                raise mismatch_error(
                    self.layout, step, run, p.rank, p.layer_kv, p.stream, (p.block, byte)
                )


@dataclass(frozen=True)
class DescriptorRef:
    """One descriptor: decode rank, layer*2+K|V, head stream, request block."""

    rank: int
    layer_kv: int
    stream: int
    block: int


def pick_descriptors(layout: TransferLayout, count: int) -> list[DescriptorRef]:
    """`count` descriptors spread evenly over all ranks, layers, heads and blocks."""
    everything = [
        (d, lk, s)
        for d, streams in enumerate(layout.streams)
        for lk in range(layout.layer_kv)
        for s in range(len(streams))
    ]
    total = len(everything) * layout.blocks
    picks = np.unique(np.linspace(0, total - 1, num=min(count, total)).astype(np.int64))
    out = []
    for flat in picks.tolist():
        d, lk, s = everything[flat // layout.blocks]
        out.append(DescriptorRef(d, lk, s, flat % layout.blocks))
    return out


@dataclass
class PairedDescriptors:
    """Source and destination of every descriptor (vLLM's NIXL pattern), in one table."""

    src_addr: np.ndarray
    dst_addr: np.ndarray
    unit_bytes: int
    _views: list = field(default_factory=list)

    def views(self) -> list:
        return self._views


def descriptor_table(
    prefill: PrefillSide, decode: DecodeSide, with_views: bool
) -> PairedDescriptors:
    """Addresses of every (rank, layer, K|V, head slice, block) descriptor on both sides."""
    lay = prefill.layout
    unit = lay.unit_bytes
    src_parts, dst_parts, views = [], [], []
    for d, streams in enumerate(lay.streams):
        for lk in range(lay.layer_kv):
            dst_rows_t = decode.caches[d].rows(lk)
            for st in streams:
                src_rows_t = prefill.caches[st.src_rank].rows(lk)
                src_rows, dst_rows = lay.src_rows(st), lay.dst_rows(st)
                src_parts.append(
                    np.uint64(src_rows_t.data_ptr()) + src_rows.astype(np.uint64) * np.uint64(unit)
                )
                dst_parts.append(
                    np.uint64(dst_rows_t.data_ptr()) + dst_rows.astype(np.uint64) * np.uint64(unit)
                )
                if with_views:
                    views.extend(
                        (dst_rows_t[int(b)], src_rows_t[int(a)])
                        for a, b in zip(src_rows, dst_rows, strict=True)
                    )
    return PairedDescriptors(np.concatenate(src_parts), np.concatenate(dst_parts), unit, views)


def mismatch_error(
    lay: TransferLayout, step: str, run: int, rank: int, lk: int, stream: int, bad: tuple
) -> VerificationError:
    block, byte = bad
    st = lay.streams[rank][stream]
    heads = f"heads {st.dst_unit * lay.unit_heads}..{(st.dst_unit + 1) * lay.unit_heads - 1}"
    err = VerificationError(
        f"step {step!r}, timed run {run}: decode rank {rank}, layer {lk // 2} "
        f"{'KV'[lk % 2]}, {heads}, request block {block} (source id {int(lay.src_ids[block])} "
        f"-> destination id {int(lay.dst_ids[block])}) differs at byte {byte}",
        hint="The transfer did not arrive byte-exact, so its timing is not a result; "
        "rerun with KVPROF_DEBUG=1, and check the transport (e.g. UCX or gloo settings).",
    )
    # Lets the decode process ship the place of the mismatch to the parent as numbers.
    err.location = (rank, lk, stream, block, byte)
    return err
