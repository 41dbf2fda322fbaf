"""KV geometry: the seed's Qwen3-32B numbers, TP splits, partial blocks and config.json parsing."""

from __future__ import annotations

import json

import pytest

from kvprof.errors import BadInputError, UsageError
from kvprof.model import (
    NOMINAL_LINKS,
    PRESETS,
    KvGeometry,
    get_preset,
    link_cost_ms,
    load_hf_config,
    resolve_geometry,
    shape_from_hf_config,
)


def test_qwen3_32b_fp8_4000_tokens_matches_the_seed() -> None:
    g = resolve_geometry(4000, model="qwen3-32b", kv_dtype="fp8")
    assert g.bytes_per_token == 131_072
    assert g.total_bytes == 524_288_000
    assert g.blocks == 250
    plan = g.descriptor_plan(prefill_tp=1, decode_tp=2)
    assert plan.descriptors_per_decode_rank == 32_000
    assert plan.descriptor_bytes == 8_192
    assert plan.bytes_per_decode_rank * 2 == g.total_bytes
    assert plan.total_descriptors == 64_000


def test_matching_tp_moves_whole_head_blocks() -> None:
    g = resolve_geometry(4000, model="qwen3-32b")
    plan = g.descriptor_plan(prefill_tp=1, decode_tp=1)
    assert (plan.descriptors_per_decode_rank, plan.descriptor_bytes) == (32_000, 16_384)
    assert plan.bytes_per_decode_rank == g.total_bytes
    plan2 = g.descriptor_plan(prefill_tp=2, decode_tp=2)
    assert (plan2.descriptors_per_decode_rank, plan2.descriptor_bytes) == (32_000, 8_192)


def test_smaller_decode_tp_reads_from_several_prefill_ranks() -> None:
    g = resolve_geometry(4000, model="qwen3-32b")
    plan = g.descriptor_plan(prefill_tp=4, decode_tp=2)
    assert plan.remote_ranks_per_decode_rank == 2
    assert plan.descriptor_bytes == 16 * 2 * 128  # 2 heads per prefill rank
    assert plan.descriptors_per_decode_rank == 64_000
    assert plan.bytes_per_decode_rank * 2 == g.total_bytes


def test_partial_last_block_moves_whole() -> None:
    g = resolve_geometry(4001, model="qwen3-32b")
    assert g.blocks == 251
    assert g.padded_tokens == 251 * 16
    assert g.total_bytes == 251 * 16 * 131_072
    one = resolve_geometry(1, model="qwen3-32b")
    assert one.blocks == 1 and one.total_bytes == 16 * 131_072


@pytest.mark.parametrize(
    ("dtype", "bpt"), [("fp8", 131_072), ("bf16", 262_144), ("fp16", 262_144), ("fp32", 524_288)]
)
def test_dtypes(dtype: str, bpt: int) -> None:
    assert resolve_geometry(16, kv_dtype=dtype).bytes_per_token == bpt


def test_other_presets() -> None:
    assert resolve_geometry(1, model="llama-3.1-70b", kv_dtype="bf16").bytes_per_token == (
        2 * 80 * 8 * 128 * 2
    )
    assert get_preset("Qwen/Qwen3-8B").layers == 36
    assert {"qwen3-32b", "qwen3-8b", "llama-3.1-8b", "llama-3.1-70b",
            "deepseek-r1-distill-llama-70b"} <= set(PRESETS)


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(BadInputError) as exc:
        get_preset("gpt-5")
    assert exc.value.exit_code == 3
    assert "qwen3-32b" in exc.value.hint


def test_tp_that_does_not_split_is_rejected() -> None:
    twelve_heads = shape_from_hf_config(
        {"num_hidden_layers": 2, "num_attention_heads": 12, "num_key_value_heads": 12,
         "head_dim": 64}
    )
    with pytest.raises(UsageError, match="neither divides nor is a multiple"):
        KvGeometry(twelve_heads, "fp8", 16, 64).descriptor_plan(prefill_tp=2, decode_tp=3)
    g = resolve_geometry(16, model="qwen3-32b")
    with pytest.raises(UsageError, match="KV heads evenly"):
        g.descriptor_plan(prefill_tp=1, decode_tp=3)


def test_tp_beyond_kv_heads_replicates() -> None:
    shape = shape_from_hf_config(
        {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
         "head_dim": 32}
    )
    g = KvGeometry(shape, "bf16", 32, 64)
    plan = g.descriptor_plan(prefill_tp=1, decode_tp=2)
    assert plan.decode_heads_per_rank == 1
    assert plan.descriptor_bytes == 32 * 32 * 2


def test_hf_config_with_head_dim(tmp_path) -> None:
    cfg = {"_name_or_path": "Qwen/Qwen3-32B", "num_hidden_layers": 64, "num_attention_heads": 64,
           "num_key_value_heads": 8, "head_dim": 128, "hidden_size": 5120}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    shape = load_hf_config(p)
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (64, 8, 128)
    # A folder holding config.json works too.
    assert load_hf_config(tmp_path) == shape


def test_hf_config_head_dim_from_hidden_size_and_mha_fallback() -> None:
    s = shape_from_hf_config({"num_hidden_layers": 32, "num_attention_heads": 32,
                              "hidden_size": 4096})
    assert (s.kv_heads, s.head_dim) == (32, 128)


def test_hf_config_nested_text_config() -> None:
    s = shape_from_hf_config({"text_config": {"num_hidden_layers": 4, "num_attention_heads": 8,
                                              "num_key_value_heads": 2, "head_dim": 64}})
    assert (s.layers, s.kv_heads, s.head_dim) == (4, 2, 64)


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not an object"),
        ('{"num_attention_heads": 8}', "num_hidden_layers"),
        ('{"num_hidden_layers": 2, "num_attention_heads": 8}', "head_dim nor hidden_size"),
        ('{"num_hidden_layers": "x", "num_attention_heads": 8, "head_dim": 4}', "non-integer"),
    ],
)
def test_bad_configs(tmp_path, content: str, needle: str) -> None:
    p = tmp_path / "config.json"
    p.write_text(content)
    with pytest.raises(BadInputError, match=needle) as exc:
        load_hf_config(p)
    assert exc.value.exit_code == 3


def test_missing_config() -> None:
    with pytest.raises(BadInputError, match="not found"):
        load_hf_config("/nonexistent/config.json")


def test_link_costs_for_the_seed() -> None:
    total = resolve_geometry(4000).total_bytes
    nvlink = link_cost_ms(total, NOMINAL_LINKS["nvlink-h100/h200 (450 GB/s)"])
    ndr = link_cost_ms(total, NOMINAL_LINKS["ib-ndr-400 (50 GB/s)"])
    assert nvlink == pytest.approx(1.165, abs=0.01)
    assert ndr == pytest.approx(10.49, abs=0.01)


def test_bad_options() -> None:
    with pytest.raises(UsageError):
        resolve_geometry(0)
    with pytest.raises(UsageError):
        resolve_geometry(10, block_size=0)
    with pytest.raises(UsageError, match="unknown KV dtype"):
        resolve_geometry(10, kv_dtype="int3")
