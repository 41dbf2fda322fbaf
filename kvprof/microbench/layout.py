"""Which bytes one request moves: block ids on each side and the head slices per decode rank."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvprof.model import KvGeometry, heads_per_rank

# vLLM's free-block list hands a request scattered block ids; a few spare blocks let the
# source and destination use different ids without allocating a whole serving-size cache.
MIN_SPARE_BLOCKS = 2


@dataclass(frozen=True)
class Stream:
    """A run of `unit_heads` heads that one decode rank reads from one prefill rank."""

    src_rank: int
    src_unit: int  # offset, in descriptor units, inside a source block
    dst_unit: int  # offset, in descriptor units, inside a destination block


@dataclass(frozen=True)
class TransferLayout:
    """Block ids, per-rank head slices and descriptor sizes of one request's KV hand-off."""

    geometry: KvGeometry
    prefill_tp: int
    decode_tp: int
    src_heads: int  # KV heads held by each prefill rank
    dst_heads: int  # KV heads held by each decode rank
    unit_heads: int  # heads moved by one descriptor
    streams: tuple[tuple[Stream, ...], ...]  # per decode rank
    src_ids: np.ndarray  # source block id of request block i
    dst_ids: np.ndarray  # destination block id of request block i (never equal to src_ids[i])
    num_blocks: int  # blocks allocated per cache (request + spare)

    @property
    def layer_kv(self) -> int:
        """Number of per-layer K and V tensors in one cache."""
        return 2 * self.geometry.model.layers

    @property
    def blocks(self) -> int:
        return self.geometry.blocks

    @property
    def unit_bytes(self) -> int:
        g = self.geometry
        return self.unit_heads * g.block_size * g.model.head_dim * g.dtype_bytes

    @property
    def src_units_per_block(self) -> int:
        return self.src_heads // self.unit_heads

    @property
    def dst_units_per_block(self) -> int:
        return self.dst_heads // self.unit_heads

    def descriptors_for_rank(self, rank: int) -> int:
        return self.layer_kv * len(self.streams[rank]) * self.blocks

    @property
    def descriptors_total(self) -> int:
        return sum(self.descriptors_for_rank(d) for d in range(self.decode_tp))

    def bytes_for_rank(self, rank: int) -> int:
        return self.descriptors_for_rank(rank) * self.unit_bytes

    @property
    def bytes_moved(self) -> int:
        return self.descriptors_total * self.unit_bytes

    def src_rows(self, stream: Stream) -> np.ndarray:
        """Row numbers, in a source tensor viewed as [blocks * units, unit_bytes], of a stream."""
        return self.src_ids * self.src_units_per_block + stream.src_unit

    def dst_rows(self, stream: Stream) -> np.ndarray:
        """Row numbers, in a destination tensor viewed as rows of one descriptor, of a stream."""
        return self.dst_ids * self.dst_units_per_block + stream.dst_unit


def rank_heads(kv_heads: int, tp: int, rank: int) -> list[int]:
    """Global KV-head indices rank `rank` holds; vLLM replicates heads when tp > kv_heads."""
    per = heads_per_rank(kv_heads, tp)
    if tp <= kv_heads:
        return list(range(rank * per, rank * per + per))
    return [rank * kv_heads // tp]


def _streams(kv_heads: int, prefill_tp: int, decode_tp: int, unit: int) -> tuple:
    src_heads = [rank_heads(kv_heads, prefill_tp, r) for r in range(prefill_tp)]
    out = []
    for d in range(decode_tp):
        wanted = rank_heads(kv_heads, decode_tp, d)
        rank_streams = []
        for c in range(len(wanted) // unit):
            head = wanted[c * unit]
            # The first prefill rank holding the head serves it (vLLM reads one replica).
            r = next(r for r, heads in enumerate(src_heads) if head in heads)
            rank_streams.append(Stream(r, (head - src_heads[r][0]) // unit, c))
        out.append(tuple(rank_streams))
    return tuple(out)


def _block_ids(blocks: int, spare: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    total = blocks + spare
    rng = np.random.default_rng(seed)
    src_ids = rng.permutation(total)[:blocks]
    # A derangement (one cycle through a random order) maps every source id to another id.
    order = rng.permutation(total)
    successor = np.empty(total, dtype=np.int64)
    successor[order] = np.roll(order, -1)
    return src_ids.astype(np.int64), successor[src_ids]


def build_layout(
    geometry: KvGeometry, prefill_tp: int = 1, decode_tp: int = 1, seed: int = 0
) -> TransferLayout:
    """Lay out one request: scattered block ids on both sides and each decode rank's heads."""
    plan = geometry.descriptor_plan(prefill_tp, decode_tp)  # validates the TP pair
    kv_heads = geometry.model.kv_heads
    unit = min(plan.prefill_heads_per_rank, plan.decode_heads_per_rank)
    spare = max(MIN_SPARE_BLOCKS, -(-geometry.blocks // 32))
    src_ids, dst_ids = _block_ids(geometry.blocks, spare, seed)
    return TransferLayout(
        geometry=geometry,
        prefill_tp=prefill_tp,
        decode_tp=decode_tp,
        src_heads=plan.prefill_heads_per_rank,
        dst_heads=plan.decode_heads_per_rank,
        unit_heads=unit,
        streams=_streams(kv_heads, prefill_tp, decode_tp, unit),
        src_ids=src_ids,
        dst_ids=dst_ids,
        num_blocks=geometry.blocks + spare,
    )
