"""`kvprof microbench` checks memory before allocating: exit 4 naming the largest that fits."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kvprof.cli import main
from kvprof.errors import ResourceAbsentError
from kvprof.microbench import memory
from kvprof.microbench.engine import CpuEngine
from kvprof.microbench.layout import build_layout
from kvprof.microbench.memory import (
    HEADROOM,
    HOST,
    _sizes,
    check_memory,
    largest_fitting_tokens,
    memory_needs,
)
from kvprof.microbench.paged import SourcePattern
from kvprof.microbench.sides import DecodeSide, PrefillSide
from kvprof.model import resolve_geometry

REPO = Path(__file__).resolve().parents[1]
GEOMETRY = {"model": "qwen3-0.6b", "model_config": None, "kv_dtype": "fp8", "block_size": 16}
ERROR_LINE = re.compile(
    r"^Error: --tokens ([\d,]+) needs ([\d.]+ [KMGTP]?i?B) of host memory \((\w+) transport on "
    r"cpu: .+\), but only ([\d.]+) ([KMGTP]i?B) is available$")
HINT_LINE = re.compile(
    r"^Hint: The largest --tokens that fits on this machine is ([\d,]+) \(keeping 10% of the "
    r"available memory free as headroom\); use --tokens \d+ or less, or a machine with more "
    r"memory\.$")


def _need(tokens: int, transport: str = "copy", device: str = "cpu", tp=(1, 2)) -> int:
    g = resolve_geometry(tokens, **GEOMETRY)
    return sum(sum(p.values()) for p in memory_needs(g, *tp, transport, device).values())


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(1, 1), (1, 2), (2, 1), (2, 2), (1, 8)])
@pytest.mark.parametrize("tokens", [1, 100, 1000])
def test_buffer_sizes_equal_what_the_sides_allocate(prefill_tp, decode_tp, tokens) -> None:
    """The estimate's big buffers, byte for byte, against the real objects on the CPU."""
    g = resolve_geometry(tokens, **GEOMETRY)
    layout = build_layout(g, prefill_tp, decode_tp)
    pattern = SourcePattern(layout)
    engine = CpuEngine(1)
    prefill = PrefillSide(layout, engine, "cpu", pattern)
    decode = DecodeSide(layout, engine, "cpu", pattern)
    s = _sizes(g, prefill_tp, decode_tp)
    assert sum(c.nbytes for c in prefill.caches) == prefill_tp * s.src_cache
    assert sum(c.nbytes for c in decode.caches) == decode_tp * s.dst_cache
    for buffers in (prefill.staging, decode.recv, decode.reference):
        assert sum(b.numel() for b in buffers) == s.moved == layout.bytes_moved
    assert max(b.numel() for b in prefill.staging) == s.rank_moved
    assert pattern.pool.numel() == s.pattern
    assert s.descriptors == layout.descriptors_total
    assert s.chunk == layout.blocks * layout.unit_bytes
    needs = memory_needs(g, prefill_tp, decode_tp, "copy", "cpu")
    assert list(needs) == [HOST]
    assert needs[HOST]["paged caches"] == prefill_tp * s.src_cache + decode_tp * s.dst_cache
    assert needs[HOST]["staging, receive and reference buffers"] == 3 * s.moved


def test_places_follow_the_transport_and_device() -> None:
    g = resolve_geometry(4000, model="qwen3-32b")
    s = _sizes(g, 1, 2)
    cuda = memory_needs(g, 1, 2, "copy", "cuda:0")
    assert set(cuda) == {"cuda:0", HOST}
    assert cuda["cuda:0"]["staging, receive and reference buffers"] == 3 * s.moved
    assert cuda[HOST]["source pattern"] == s.pattern
    nccl = memory_needs(g, 1, 2, "nccl", "cuda:0")
    assert set(nccl) == {"cuda:0", "cuda:1", HOST}
    assert nccl["cuda:0"]["paged caches"] == s.src_cache
    assert nccl["cuda:1"]["paged caches"] == 2 * s.dst_cache
    gloo_gpu = memory_needs(g, 1, 2, "gloo", "cuda:0")
    # gloo stages through pinned host memory, handed out in powers of two.
    assert gloo_gpu[HOST]["staging, receive and reference buffers"] >= 2 * s.moved + s.rank_moved
    gloo_cpu = memory_needs(g, 1, 2, "gloo", "cpu")
    assert list(gloo_cpu) == [HOST]
    assert gloo_cpu[HOST]["decode process (estimate)"] > 0
    # Seed numbers: 4,000 tokens of Qwen3-32B FP8 move 524,288,000 bytes.
    assert s.moved == 524_288_000


def _fake_host(monkeypatch, available: int) -> None:
    import psutil

    class Mem:
        pass

    mem = Mem()
    mem.available = available
    monkeypatch.setattr(psutil, "virtual_memory", lambda: mem)
    monkeypatch.setattr(memory, "cgroup_limit_bytes", lambda root=None: None)


@pytest.mark.parametrize("transport", ["copy", "gloo", "nixl"])
def test_largest_fitting_tokens_is_the_exact_boundary(monkeypatch, transport) -> None:
    avail = 3 << 30
    _fake_host(monkeypatch, avail)
    with pytest.raises(ResourceAbsentError) as err:
        check_memory(GEOMETRY, 1_000_000, 1, 2, transport, "cpu")
    assert err.value.exit_code == 4
    best = int(re.search(r"is ([\d,]+) \(", err.value.hint).group(1).replace(",", ""))
    budget = avail * (1 - HEADROOM)
    assert _need(best, transport) <= budget < _need(best + 1, transport)
    assert "3 GiB is available" in err.value.message
    check_memory(GEOMETRY, best, 1, 2, transport, "cpu")  # fits: returns quietly


def test_nothing_fits_says_so(monkeypatch) -> None:
    _fake_host(monkeypatch, 1 << 20)
    with pytest.raises(ResourceAbsentError) as err:
        check_memory(GEOMETRY, 4000, 1, 2, "copy", "cpu")
    assert err.value.hint.startswith("Not even 1 token fits")


def test_cuda_device_is_checked_against_free_gpu_memory(monkeypatch) -> None:
    import torch

    # No GPU on this machine: torch.cuda.mem_get_info is what a CUDA host would answer.
    _fake_host(monkeypatch, 1 << 40)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 30, 80 << 30))
    with pytest.raises(ResourceAbsentError) as err:
        check_memory(GEOMETRY, 10_000_000, 1, 2, "copy", "cuda:0")
    assert "of memory on cuda:0" in err.value.message and "8 GiB is available" in err.value.message
    best = int(re.search(r"is ([\d,]+) \(", err.value.hint).group(1).replace(",", ""))
    g = resolve_geometry(best, **GEOMETRY)
    assert sum(memory_needs(g, 1, 2, "copy", "cuda:0")["cuda:0"].values()) <= \
        (8 << 30) * (1 - HEADROOM)
    assert best == largest_fitting_tokens(GEOMETRY, 1, 2, "copy", "cuda:0",
                                          {HOST: 1 << 40, "cuda:0": 8 << 30}, 10_000_000)


def test_cgroup_limit_caps_the_host(tmp_path) -> None:
    assert memory.cgroup_limit_bytes(tmp_path) is None  # no cgroup files
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("100\n")
    assert memory.cgroup_limit_bytes(tmp_path) is None
    (tmp_path / "memory.max").write_text(f"{4 << 30}\n")
    (tmp_path / "memory.current").write_text(f"{1 << 30}\n")
    assert memory.cgroup_limit_bytes(tmp_path) == 3 << 30
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1: no limit
    (v1 / "memory.usage_in_bytes").write_text("5\n")
    assert memory.cgroup_limit_bytes(tmp_path / "v1") is None


def test_cli_with_a_small_host_exits_4_with_the_computed_largest(monkeypatch, capsys) -> None:
    _fake_host(monkeypatch, 2 << 30)
    with pytest.raises(SystemExit) as exit_:
        main(["microbench", "--tokens", "1000000", "--model", "qwen3-0.6b",
              "--transport", "copy", "--device", "cpu", "--quiet"])
    assert exit_.value.code == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "Traceback" not in "\n".join(err)
    m, h = ERROR_LINE.match(err[0]), HINT_LINE.match(err[1])
    assert m and h, err
    assert m.group(1) == "1,000,000" and m.group(3) == "copy" and m.group(4) == "2"
    best = int(h.group(1).replace(",", ""))
    assert _need(best) <= (2 << 30) * (1 - HEADROOM) < _need(best + 1)


def test_cli_sweep_checks_its_largest_point(monkeypatch, capsys) -> None:
    _fake_host(monkeypatch, 2 << 30)
    with pytest.raises(SystemExit) as exit_:
        main(["microbench", "--tokens", "40", "--sweep", "500,2000000", "--model", "qwen3-0.6b",
              "--transport", "copy", "--device", "cpu", "--quiet"])
    assert exit_.value.code == 4
    err = capsys.readouterr().err
    assert err.startswith("Error: the largest --sweep point (2,000,000 tokens) needs ")
    assert "\nHint: The largest --sweep point that fits on this machine is " in err


# The child's own peak RSS, written at its exit. Not ru_maxrss: Linux carries the memory
# high-water mark of the pre-exec image into it, and a child spawned by this (vfork) or any
# forked process starts with the pytest process's peak, over 1 GiB once vLLM tests ran here.
_HWM_MAIN = """
import atexit, os, runpy, sys

def _hwm():
    with open("/proc/self/status") as status, open(os.environ["KVPROF_TEST_HWM"], "w") as out:
        out.write(next(line for line in status if line.startswith("VmHWM:")))

atexit.register(_hwm)
sys.argv[0] = "kvprof"
runpy.run_module("kvprof", run_name="__main__", alter_sys=True)
"""


def _run_measured(*args: str) -> tuple[int, str, float, int]:
    """The real entry point in a child process: (exit code, stderr, seconds, peak RSS bytes)."""
    with tempfile.TemporaryFile() as err, tempfile.TemporaryDirectory() as tmp:
        hwm = Path(tmp) / "hwm"
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", _HWM_MAIN, "microbench", *args],
                              stdout=subprocess.DEVNULL, stderr=err, cwd=REPO,
                              env={**os.environ, "KVPROF_DEBUG": "", "KVPROF_TEST_HWM": str(hwm)})
        took = time.monotonic() - t0
        err.seek(0)
        kib = int(hwm.read_text().split()[1])  # "VmHWM:  258912 kB"
        return proc.returncode, err.read().decode(), took, kib * 1024


@pytest.mark.parametrize("args", [
    ["--tokens", "100000000"],
    ["--tokens", "100000000", "--transport", "copy", "--device", "cpu"],
    ["--tokens", "100000000", "--transport", "gloo", "--device", "cpu"],
])
def test_cli_100m_tokens_exits_4_quickly_without_allocating(args) -> None:
    rc, err, took, peak_rss = _run_measured(*args, "--quiet")
    assert rc == 4, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and "MemoryError" not in err and len(lines) == 2, err
    m, h = ERROR_LINE.match(lines[0]), HINT_LINE.match(lines[1])
    assert m and h, lines
    assert m.group(1) == "100,000,000" and m.group(2).endswith("TiB")
    best = int(h.group(1).replace(",", ""))
    assert 0 < best < 100_000_000
    # The hint's number fits what the message says is available (3 significant digits).
    stated = float(m.group(4)) * 1024 ** ("KMGTP".index(m.group(5)[0]) + 1)
    g = resolve_geometry(best, model="qwen3-32b")
    need = sum(memory_needs(g, 1, 2, m.group(3), "cpu")[HOST].values())
    assert need <= stated * 1.005 * (1 - HEADROOM)
    # Decided before allocating: torch's import is most of the time, and RSS stays small.
    assert took < 10, took
    assert peak_rss < 1 << 30, peak_rss
