"""Paged KV caches shaped like vLLM's, and the deterministic bytes a source cache is filled with."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kvprof.microbench.layout import TransferLayout

if TYPE_CHECKING:
    import torch

_TORCH_DTYPE_NAMES = {
    "fp8": "float8_e4m3fn",
    "bf16": "bfloat16",
    "fp16": "float16",
    "fp32": "float32",
}

# Each source tensor reads the random pool at its own offset; a prime stride keeps every
# tensor's rows distinct from every other tensor's rows for power-of-two descriptor sizes,
# so a block landing in the wrong layer or rank cannot verify by accident.
_POOL_STRIDE = 4099


def torch_dtype(kv_dtype: str) -> torch.dtype:
    """The torch dtype vLLM uses for a KV dtype name (FP8 falls back to uint8 of one byte)."""
    import torch

    name = _TORCH_DTYPE_NAMES[kv_dtype]
    return getattr(torch, name, torch.uint8)


class PagedKvCache:
    """One rank's KV cache: per layer a K and a V tensor [blocks, heads, block_size, head_dim]."""

    def __init__(self, layout: TransferLayout, heads: int, device: str) -> None:
        import torch

        g = layout.geometry
        self.layout = layout
        self.heads = heads
        self.units_per_block = heads // layout.unit_heads
        dtype = torch_dtype(g.kv_dtype)
        shape = (layout.num_blocks, heads, g.block_size, g.model.head_dim)
        # Index layer * 2 + (0 for K, 1 for V), the order vLLM's NIXL connector walks them.
        self.tensors = [
            torch.empty(shape, dtype=dtype, device=device) for _ in range(layout.layer_kv)
        ]
        # Copies go through uint8 views: byte-exact, and FP8 has no arithmetic on CPU anyway.
        self._rows = [t.view(torch.uint8).view(-1, layout.unit_bytes) for t in self.tensors]

    def rows(self, layer_kv: int) -> torch.Tensor:
        """Tensor `layer_kv` as uint8 rows of one descriptor each: [blocks * units, unit_bytes]."""
        return self._rows[layer_kv]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def zero_(self) -> None:
        for t in self._rows:
            t.zero_()


class SourcePattern:
    """Random but reproducible source bytes: any process can rebuild what a rank holds."""

    def __init__(self, layout: TransferLayout, seed: int = 0) -> None:
        import torch

        self.layout = layout
        self.rows_per_tensor = layout.num_blocks * layout.src_units_per_block
        tensor_bytes = self.rows_per_tensor * layout.unit_bytes
        count = layout.prefill_tp * layout.layer_kv
        size = tensor_bytes + (count + 1) * _POOL_STRIDE
        rng = np.random.default_rng(seed)
        self.pool = torch.from_numpy(rng.integers(0, 256, size, dtype=np.uint8))

    def rows(self, src_rank: int, layer_kv: int) -> torch.Tensor:
        """What source tensor (src_rank, layer_kv) holds, as rows of one descriptor."""
        offset = (src_rank * self.layout.layer_kv + layer_kv + 1) * _POOL_STRIDE
        unit = self.layout.unit_bytes
        return self.pool.as_strided((self.rows_per_tensor, unit), (unit, 1), offset)

    def fill(self, cache: PagedKvCache, src_rank: int) -> None:
        """Write the pattern of `src_rank` into every block of a source cache."""
        for lk in range(self.layout.layer_kv):
            cache.rows(lk).copy_(self.rows(src_rank, lk))
