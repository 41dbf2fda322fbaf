"""Real paged KV transfers at small sizes over every transport this machine has, verified."""

from __future__ import annotations

import json

import pytest

from kvprof.errors import VerificationError
from kvprof.microbench import inprocess
from kvprof.microbench.inprocess import nixl_usable
from kvprof.microbench.results import STEP_ORDER, write_json
from kvprof.microbench.runner import MicrobenchOptions, run_microbench

NIXL_OK, NIXL_WHY = nixl_usable()
TRANSPORTS = [
    "copy",
    "gloo",
    pytest.param("nixl", marks=pytest.mark.skipif(not NIXL_OK, reason=NIXL_WHY)),
]


def small(**kw) -> MicrobenchOptions:
    """qwen3-0.6b FP8, 40 tokens -> 3 blocks, 2.75 MB: real shapes, seconds per run."""
    base = dict(tokens=40, model="qwen3-0.6b", iters=3, warmup=1, transport="copy", device="cpu")
    base.update(kw)
    return MicrobenchOptions(**base)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_step_is_timed_and_priced(transport: str) -> None:
    result = run_microbench(small(transport=transport))
    assert result["transport"] == transport
    assert list(result["steps"]) == list(STEP_ORDER)
    g = result["geometry"]
    assert g["blocks"] == 3 and g["total_bytes"] == 3 * 16 * 2 * 28 * 8 * 128
    assert result["bytes_moved"] == g["total_bytes"]
    assert result["descriptors"] == 2 * 28 * 3 * 2  # TP1 -> TP2: (layer, K|V, block) x 2 ranks
    for name in ("gather", "wire", "scatter", "per_descriptor", "total"):
        s = result["steps"][name]
        assert s["samples"] == 3
        assert 0 < s["p10_ms"] <= s["median_ms"] <= s["p90_ms"]
        assert s["gbps"] > 0 and s["limit_gbps"] > 0
        assert s["pct_of_limit"] == pytest.approx(s["gbps"] / s["limit_gbps"] * 100)
    t = result["steps"]
    # total is timed end to end, so it covers its three parts (timer noise aside).
    assert t["total"]["median_ms"] >= 0.9 * (
        t["gather"]["p10_ms"] + t["wire"]["p10_ms"] + t["scatter"]["p10_ms"]
    )
    assert t["setup"]["samples"] == 1 and t["setup"]["median_ms"] > 0
    assert result["links"]["tokens"] == 4000
    env = result["environment"]
    assert env["transport"] == transport and env["cpu_count"] >= 1 and env["torch"]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("step", ["total", "per_descriptor"])
def test_one_corrupted_byte_fails_verification(transport: str, step: str) -> None:
    with pytest.raises(VerificationError) as info:
        run_microbench(small(transport=transport, iters=2, warmup=0, corrupt=(step, 1)))
    msg = info.value.message
    assert f"step {step!r}, timed run 1" in msg
    # The hook flips the last descriptor: last decode rank, last layer's V, last block.
    assert "decode rank 1, layer 27 V" in msg and "request block 2" in msg
    assert info.value.exit_code == 1 and info.value.hint


def test_a_wire_that_moves_nothing_cannot_verify(monkeypatch) -> None:
    monkeypatch.setattr(inprocess.CopyWire, "send", lambda self: None)
    with pytest.raises(VerificationError, match="timed run -1"):
        run_microbench(small())


def test_other_dtypes_and_tp_splits_verify() -> None:
    result = run_microbench(small(kv_dtype="bf16", prefill_tp=2, decode_tp=1, iters=2))
    plan = result["geometry"]["descriptor_plan"]
    assert plan["remote_ranks_per_decode_rank"] == 2
    assert result["descriptor_bytes"] == plan["descriptor_bytes"] == 4 * 16 * 128 * 2
    assert result["descriptors"] == plan["descriptors_per_decode_rank"]


def test_sweep_reports_growth_and_a_fit(tmp_path) -> None:
    result = run_microbench(small(sweep=[16, 64, 160], tokens=64, iters=2))
    points = result["sweep"]["points"]
    assert [p["tokens"] for p in points] == [16, 64, 160]
    assert [p["bytes"] for p in points] == sorted(p["bytes"] for p in points)
    assert all(p["total_ms"] > 0 for p in points)
    assert set(result["sweep"]["fit"]) == {"fixed_ms", "ms_per_mb", "r2"}
    assert result["geometry"]["tokens"] == 64  # the breakdown is the --tokens point
    out = tmp_path / "sub" / "mb.json"
    write_json(out, result)
    back = json.loads(out.read_text())
    assert back["sweep"]["points"] == points
    assert back["schema"] == "kvprof.microbench/1"
