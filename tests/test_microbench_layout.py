"""The microbench's request layout agrees with model.py's descriptor plan and vLLM's head split."""

from __future__ import annotations

import numpy as np
import pytest

from kvprof.microbench.layout import build_layout, rank_heads
from kvprof.microbench.results import Stats, fit_growth, gbps, link_table
from kvprof.model import resolve_geometry


def test_qwen3_32b_fp8_tp1_to_tp2_matches_the_seed_numbers() -> None:
    g = resolve_geometry(4000, "qwen3-32b", kv_dtype="fp8")
    lay = build_layout(g, prefill_tp=1, decode_tp=2)
    assert lay.unit_bytes == 8192
    assert [lay.descriptors_for_rank(d) for d in range(2)] == [32_000, 32_000]
    assert lay.bytes_moved == 524_288_000
    # Caches are the request plus a few spare blocks, not a serving-size pool.
    assert 250 < lay.num_blocks <= 260


def test_block_ids_differ_on_both_sides_and_are_distinct() -> None:
    g = resolve_geometry(4000, "qwen3-32b")
    lay = build_layout(g, 1, 2)
    assert len(set(lay.src_ids.tolist())) == lay.blocks
    assert len(set(lay.dst_ids.tolist())) == lay.blocks
    assert np.all(lay.src_ids != lay.dst_ids)
    assert lay.src_ids.max() < lay.num_blocks and lay.dst_ids.max() < lay.num_blocks


def test_single_block_request_still_moves_to_another_id() -> None:
    lay = build_layout(resolve_geometry(1, "qwen3-0.6b"), 1, 1)
    assert lay.blocks == 1 and lay.src_ids[0] != lay.dst_ids[0]


@pytest.mark.parametrize(
    ("prefill_tp", "decode_tp"), [(1, 1), (1, 2), (1, 8), (2, 1), (4, 2), (2, 4), (1, 16)]
)
def test_layout_agrees_with_model_descriptor_plan(prefill_tp: int, decode_tp: int) -> None:
    g = resolve_geometry(1000, "llama-3.1-8b", kv_dtype="bf16")
    plan = g.descriptor_plan(prefill_tp, decode_tp)
    lay = build_layout(g, prefill_tp, decode_tp)
    assert lay.unit_bytes == plan.descriptor_bytes
    for d in range(decode_tp):
        assert lay.descriptors_for_rank(d) == plan.descriptors_per_decode_rank
        assert lay.bytes_for_rank(d) == plan.bytes_per_decode_rank


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(1, 2), (2, 1), (4, 2), (2, 8)])
def test_each_decode_rank_reads_exactly_its_heads(prefill_tp: int, decode_tp: int) -> None:
    g = resolve_geometry(64, "qwen3-8b")
    lay = build_layout(g, prefill_tp, decode_tp)
    for d, streams in enumerate(lay.streams):
        got = []
        for st in streams:
            first = rank_heads(8, prefill_tp, st.src_rank)[0] + st.src_unit * lay.unit_heads
            got += list(range(first, first + lay.unit_heads))
        assert got == rank_heads(8, decode_tp, d)


def test_stats_percentiles_and_rates() -> None:
    s = Stats.of_seconds([0.001 * i for i in range(1, 11)])
    assert s.median_ms == pytest.approx(5.5)
    assert s.p10_ms == pytest.approx(1.9)
    assert s.p90_ms == pytest.approx(9.1)
    assert gbps(1_000_000_000, 500.0) == pytest.approx(2.0)
    assert gbps(0, 1.0) is None


def test_growth_fit_separates_fixed_and_per_byte_cost() -> None:
    points = [{"bytes": mb * 1e6, "total_ms": 12.0 + 0.25 * mb} for mb in (10, 20, 40, 80)]
    fit = fit_growth(points)
    assert fit["fixed_ms"] == pytest.approx(12.0)
    assert fit["ms_per_mb"] == pytest.approx(0.25)
    assert fit["r2"] == pytest.approx(1.0)
    assert fit_growth(points[:1]) is None


def test_link_table_prices_the_seed_request() -> None:
    links = link_table({"model": "qwen3-32b", "kv_dtype": "fp8"}, 2.0, "copy")
    assert links["bytes"] == 524_288_000 and links["seed_overhead_ms"] == 1153.0
    by_name = {r["link"]: r for r in links["rows"]}
    assert by_name["tcp-10gbe (1.25 GB/s)"]["ms"] == pytest.approx(419.4304)
    assert links["measured"]["ms"] == pytest.approx(262.144)
