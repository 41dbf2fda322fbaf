"""Memory a microbench run needs, per place (host, each GPU), from the geometry alone.

Checked before anything is allocated, so `--tokens 100000000` is a clear exit 4 with the
largest --tokens that fits, not a MemoryError half-way through building the caches.

The sum follows what the sessions allocate (kvprof.microbench.sides, paged, inprocess,
twoproc, engine), buffer by buffer:

- each prefill rank's paged cache and each decode rank's, ``2 * layers`` tensors of
  ``blocks + spare`` blocks (kvprof.microbench.layout);
- the contiguous staging buffers (prefill side), receive buffers and reference copy (decode
  side), each the bytes moved; the two-process raw copy's destination (one rank's bytes);
- the random source pattern (about one source tensor; every process builds its own);
- bookkeeping per descriptor: index arrays, address tables, the per-descriptor copy lists
  (a NIXL run: its prepared descriptor lists; a CUDA copy run: one pair of tensor views per
  descriptor), measured on this code and rounded up;
- fixed costs that do not scale with tokens: the decode process of gloo/nccl runs (a second
  interpreter with torch), the NIXL agents, a CUDA context and NCCL's buffers; these are
  estimates, which the headroom covers.

Available memory: the host's (psutil, capped by a cgroup memory limit when there is one) and,
only for a CUDA device, each GPU's free memory (torch.cuda.mem_get_info). A run fits when
every place needs at most ``1 - HEADROOM`` of what it has available.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvprof.errors import ResourceAbsentError
from kvprof.microbench.layout import MIN_SPARE_BLOCKS
from kvprof.model import KvGeometry, resolve_geometry

HOST = "host"
# Share of the available memory left free: the allocator's rounding, the estimated fixed
# costs, whatever else the machine starts meanwhile.
HEADROOM = 0.10

# Host bytes per descriptor, measured on this code (peak RSS of runs with 512-byte descriptors,
# minus the buffers above) and rounded up: gather+scatter index arrays (16 B), the address
# tables (32 B), the CPU per-descriptor copier's two lists of Python ints (~80 B).
_DESCRIPTOR_HOST_BYTES = {"copy": 224, "nixl": 320, "gloo": 64, "nccl": 64}
# A CUDA copy run keeps one (destination, source) pair of torch row views per descriptor.
_CUDA_VIEW_PAIR_BYTES = 512
# Fixed costs (estimates; the headroom covers their error).
_WORKER_PROCESS_BYTES = 256 << 20  # the gloo/nccl decode process: an interpreter with torch
_NIXL_AGENTS_BYTES = 128 << 20  # two NIXL agents with UCX
_CUDA_CONTEXT_BYTES = 512 << 20  # a second process's CUDA context (and NCCL buffers)
_POOL_STRIDE = 4099  # kvprof.microbench.paged._POOL_STRIDE


@dataclass(frozen=True)
class _Sizes:
    """Buffer sizes of one request's layout, without building it."""

    src_cache: int  # one prefill rank's paged cache
    dst_cache: int  # one decode rank's paged cache
    moved: int  # bytes moved, all decode ranks (= staging = receive = reference)
    rank_moved: int  # one decode rank's share
    chunk: int  # one (rank, layer, K|V, head slice) run of blocks: the largest temporary
    pattern: int  # the random source pattern
    layout: int  # block-id arrays of the layout
    descriptors: int


def _sizes(geometry: KvGeometry, prefill_tp: int, decode_tp: int) -> _Sizes:
    plan = geometry.descriptor_plan(prefill_tp, decode_tp)
    src_heads, dst_heads = plan.prefill_heads_per_rank, plan.decode_heads_per_rank
    unit_heads = min(src_heads, dst_heads)
    layer_kv = 2 * geometry.model.layers
    blocks = geometry.blocks
    # Same spare-block rule as kvprof.microbench.layout.build_layout.
    num_blocks = blocks + max(MIN_SPARE_BLOCKS, -(-blocks // 32))
    head_block = geometry.block_size * geometry.model.head_dim * geometry.dtype_bytes
    unit_bytes = unit_heads * head_block
    streams = dst_heads // unit_heads
    descriptors = decode_tp * layer_kv * streams * blocks
    rank_moved = layer_kv * streams * blocks * unit_bytes
    return _Sizes(
        src_cache=layer_kv * num_blocks * src_heads * head_block,
        dst_cache=layer_kv * num_blocks * dst_heads * head_block,
        moved=decode_tp * rank_moved,
        rank_moved=rank_moved,
        chunk=blocks * unit_bytes,
        pattern=num_blocks * src_heads * head_block + (prefill_tp * layer_kv + 1) * _POOL_STRIDE,
        layout=5 * 8 * num_blocks,
        descriptors=descriptors,
    )


def memory_needs(geometry: KvGeometry, prefill_tp: int, decode_tp: int, transport: str,
                 device: str) -> dict[str, dict[str, int]]:
    """Bytes per place ('host', 'cuda:0', ...) and per buffer of one measured token count."""
    s = _sizes(geometry, prefill_tp, decode_tp)
    gpu = device.startswith("cuda")
    needs: dict[str, dict[str, int]] = {}

    def add(place: str, what: str, nbytes: int) -> None:
        where = needs.setdefault(HOST if place == "cpu" else place, {})
        where[what] = where.get(what, 0) + nbytes

    book = s.descriptors * _DESCRIPTOR_HOST_BYTES.get(transport, 320)
    if transport in ("copy", "nixl"):
        # Both sides in this process, every buffer on the device.
        add(device, "paged caches", prefill_tp * s.src_cache + decode_tp * s.dst_cache)
        add(device, "staging, receive and reference buffers", 3 * s.moved)
        add(HOST, "source pattern", s.pattern)
        add(HOST, "block ids and descriptor tables", s.layout + book + s.chunk)
        if gpu:
            add(device, "index tensors and scratch", 16 * s.descriptors + s.chunk)
            if transport == "copy":
                add(HOST, "block ids and descriptor tables",
                    s.descriptors * _CUDA_VIEW_PAIR_BYTES)
        if transport == "nixl":
            add(HOST, "NIXL agents (estimate)", _NIXL_AGENTS_BYTES)
        return needs
    if transport == "nccl":
        prefill_dev, decode_dev, staging = "cuda:0", "cuda:1", "cuda:0"
    else:  # gloo moves host memory: staging and receive buffers live on the host
        prefill_dev = decode_dev = device
        staging = HOST
    add(prefill_dev, "paged caches", prefill_tp * s.src_cache)
    add(decode_dev, "paged caches", decode_tp * s.dst_cache)
    # A CUDA run over gloo stages through pinned host memory, which torch's host allocator
    # hands out in powers of two.
    pinned = decode_tp * _next_pow2(s.rank_moved) if gpu and staging == HOST else s.moved
    add(staging, "staging, receive and reference buffers", pinned + s.rank_moved)
    add(HOST if transport == "gloo" else decode_dev, "staging, receive and reference buffers",
        pinned)
    add(decode_dev, "staging, receive and reference buffers", s.moved)
    add(HOST, "source pattern", 2 * s.pattern)  # one per process
    add(HOST, "block ids and descriptor tables", 2 * s.layout + book + s.chunk)
    add(HOST, "decode process (estimate)", _WORKER_PROCESS_BYTES)
    if gpu:
        add(prefill_dev, "index tensors and scratch", 8 * s.descriptors + s.chunk)
        add(decode_dev, "index tensors and scratch", 8 * s.descriptors + 2 * s.chunk)
        add(decode_dev, "decode process CUDA context (estimate)", _CUDA_CONTEXT_BYTES)
    return needs


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def cgroup_limit_bytes(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What this container's memory cgroup still allows (v2 or v1), None without a limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes",
                                    "memory/memory.usage_in_bytes")):
        try:
            limit = (root / limit_file).read_text().strip()
            usage = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if not limit.isdigit() or int(limit) >= 1 << 60:  # "max", or v1's "no limit"
            return None
        return max(0, int(limit) - usage)
    return None


def available_bytes(places: list[str]) -> dict[str, int]:
    """Memory available now per place: host from psutil (and the cgroup), GPUs from CUDA."""
    out: dict[str, int] = {}
    for place in places:
        if place == HOST:
            import psutil

            avail = int(psutil.virtual_memory().available)
            limit = cgroup_limit_bytes()
            out[place] = avail if limit is None else min(avail, limit)
        else:
            import torch

            free, _total = torch.cuda.mem_get_info(torch.device(place))
            out[place] = int(free)
    return out


def _fits(needs: dict[str, dict[str, int]], avail: dict[str, int]) -> bool:
    return all(sum(parts.values()) <= avail[p] * (1 - HEADROOM) for p, parts in needs.items())


def largest_fitting_tokens(geometry_args: dict, prefill_tp: int, decode_tp: int,
                           transport: str, device: str, avail: dict[str, int],
                           upper: int) -> int:
    """The largest token count <= upper whose run fits `avail` with the headroom (0: none).

    The need only grows with tokens, so a binary search over the same estimate finds it.
    """
    def fits(tokens: int) -> bool:
        g = resolve_geometry(tokens, **geometry_args)
        return _fits(memory_needs(g, prefill_tp, decode_tp, transport, device), avail)

    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def fmt_bytes(n: float) -> str:
    """Bytes in binary units, three significant digits (98.3 GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PiB"  # unreachable


def check_memory(geometry_args: dict, tokens: int, prefill_tp: int, decode_tp: int,
                 transport: str, device: str, sweep: bool = False,
                 avail: dict[str, int] | None = None) -> dict[str, dict[str, int]]:
    """Raise ResourceAbsentError when `tokens` does not fit here; return the needs otherwise."""
    geometry = resolve_geometry(tokens, **geometry_args)
    needs = memory_needs(geometry, prefill_tp, decode_tp, transport, device)
    avail = avail if avail is not None else available_bytes(list(needs))
    if _fits(needs, avail):
        return needs
    place = next(p for p, parts in needs.items()
                 if sum(parts.values()) > avail[p] * (1 - HEADROOM))
    parts = needs[place]
    total = sum(parts.values())
    detail = ", ".join(f"{what} {fmt_bytes(n)}" for what, n in
                       sorted(parts.items(), key=lambda kv: -kv[1]) if n)
    best = largest_fitting_tokens(geometry_args, prefill_tp, decode_tp, transport, device,
                                  avail, tokens - 1)
    memory = "host memory" if place == HOST else f"memory on {place}"
    keep = f"keeping {HEADROOM:.0%} of the available memory free as headroom"
    what = (f"the largest --sweep point ({tokens:,} tokens)" if sweep
            else f"--tokens {tokens:,}")
    if not best:
        # Nothing fits whatever --tokens says: the per-rank buffers of the TP sizes do not.
        what = (f"--prefill-tp {prefill_tp} --decode-tp {decode_tp} (with --tokens {tokens:,})"
                if max(prefill_tp, decode_tp) > 1 else what)
        advice = (f"Not even 1 token fits ({keep}): lower --decode-tp / --prefill-tp (each "
                  "rank has its own buffers), free some memory or use another machine."
                  if max(prefill_tp, decode_tp) > 1 else
                  f"Not even 1 token fits ({keep}): free some memory or use another machine.")
    elif sweep:
        advice = (f"The largest --sweep point that fits on this machine is {best:,} ({keep}); "
                  "drop the larger points, or use a machine with more memory.")
    else:
        advice = (f"The largest --tokens that fits on this machine is {best:,} ({keep}); use "
                  f"--tokens {best} or less, or a machine with more memory.")
    raise ResourceAbsentError(
        f"{what} needs {fmt_bytes(total)} of {memory} ({transport} transport on {device}: "
        f"{detail}), but only {fmt_bytes(avail[place])} is available",
        hint=advice,
    )
