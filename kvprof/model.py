"""KV geometry: model shapes -> bytes per token, whole blocks, and vLLM's NIXL descriptor plan."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from kvprof.errors import BadInputError, UsageError


@dataclass(frozen=True)
class ModelShape:
    """The three numbers of a decoder model that size its KV cache."""

    name: str
    layers: int
    kv_heads: int
    head_dim: int


# Taken from each model's Hugging Face config.json (num_hidden_layers, num_key_value_heads,
# head_dim). Qwen3 sets head_dim explicitly (128), not hidden_size / num_attention_heads.
PRESETS: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape("qwen3-32b", layers=64, kv_heads=8, head_dim=128),
        ModelShape("qwen3-14b", layers=40, kv_heads=8, head_dim=128),
        ModelShape("qwen3-8b", layers=36, kv_heads=8, head_dim=128),
        ModelShape("qwen3-0.6b", layers=28, kv_heads=8, head_dim=128),
        ModelShape("llama-3.1-8b", layers=32, kv_heads=8, head_dim=128),
        ModelShape("llama-3.1-70b", layers=80, kv_heads=8, head_dim=128),
        ModelShape("llama-3.3-70b", layers=80, kv_heads=8, head_dim=128),
        ModelShape("deepseek-r1-distill-llama-70b", layers=80, kv_heads=8, head_dim=128),
    )
}

KV_DTYPE_BYTES: dict[str, int] = {"fp8": 1, "bf16": 2, "fp16": 2, "fp32": 4}

DEFAULT_BLOCK_SIZE = 16


def _preset_hint() -> str:
    return "Known presets: " + ", ".join(sorted(PRESETS)) + "; or pass --model-config config.json."


def get_preset(name: str) -> ModelShape:
    """Look up a preset by name (case-insensitive; '_' and '/' spellings accepted)."""
    key = name.strip().lower().replace("_", "-").split("/")[-1]
    if key not in PRESETS:
        raise BadInputError(f"unknown model preset {name!r}", hint=_preset_hint())
    return PRESETS[key]


# Far above any real model (Llama-3-405B: 126 layers, 128 heads, hidden 16384); a value
# beyond them is a broken config, not a model to size buffers for.
MAX_SHAPE = 100_000
MAX_HIDDEN = 10_000_000


def _shape_int(config: dict, key: str, name: str, maximum: int = MAX_SHAPE) -> int:
    """A positive whole number field of a config; a BadInputError naming the field otherwise."""
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or (
            isinstance(value, float) and not value.is_integer()):
        raise BadInputError(f"config {name!r} has a non-integer shape field: {key} is "
                            f"{json.dumps(value)[:40]}, expected a whole number",
                            hint=_preset_hint())
    if not 0 < value <= maximum:
        raise BadInputError(f"config {name!r}: {key} is {value:g}, expected 1 to {maximum:,}",
                            hint=_preset_hint())
    return int(value)


def shape_from_hf_config(config: dict, name: str = "custom") -> ModelShape:
    """Read layers, KV heads and head dim from a Hugging Face config.json mapping."""
    # Multimodal configs nest the language model under text_config / llm_config.
    for nested in ("text_config", "llm_config", "language_config"):
        if isinstance(config.get(nested), dict) and "num_hidden_layers" not in config:
            config = config[nested]
    missing = [k for k in ("num_hidden_layers", "num_attention_heads") if k not in config]
    if missing:
        raise BadInputError(
            f"config {name!r} has no {', '.join(missing)}",
            hint="Expected a decoder config.json with num_hidden_layers, num_key_value_heads and "
            "head_dim (or hidden_size). " + _preset_hint(),
        )
    try:
        layers = _shape_int(config, "num_hidden_layers", name)
        attn_heads = _shape_int(config, "num_attention_heads", name)
        # A config without num_key_value_heads is plain multi-head attention.
        kv_heads = (_shape_int(config, "num_key_value_heads", name)
                    if config.get("num_key_value_heads") is not None else attn_heads)
        if config.get("head_dim"):
            head_dim = _shape_int(config, "head_dim", name)
        elif config.get("hidden_size"):
            head_dim = _shape_int(config, "hidden_size", name, MAX_HIDDEN) // attn_heads
        else:
            raise BadInputError(
                f"config {name!r} has neither head_dim nor hidden_size",
                hint="Add head_dim to the config, or use a preset. " + _preset_hint(),
            )
    except (TypeError, ValueError) as exc:
        raise BadInputError(
            f"config {name!r} has a non-integer shape field: {exc}", hint=_preset_hint()
        ) from None
    if min(layers, kv_heads, head_dim) <= 0:
        raise BadInputError(
            f"config {name!r} has a zero or negative shape field", hint=_preset_hint()
        )
    return ModelShape(name=name, layers=layers, kv_heads=kv_heads, head_dim=head_dim)


def load_hf_config(path: str | Path) -> ModelShape:
    """Read a config.json file (or a model folder holding one) into a ModelShape."""
    from kvprof.inputs import load_json_file, path_problem

    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
        if path_problem(p) == "not found":
            raise BadInputError(f"--model-config {path} is a directory without a config.json",
                                hint="Pass the path of a Hugging Face config.json.")
    if path_problem(p) == "not found":
        raise BadInputError(
            f"model config not found: {p}", hint="Pass the path of a Hugging Face config.json."
        )
    config = load_json_file(p, "model config", "a Hugging Face config.json")
    if not isinstance(config, dict):
        raise BadInputError(
            f"{p} is JSON but not an object", hint="Pass a Hugging Face config.json."
        )
    name = config.get("_name_or_path") or p.parent.name or "custom"
    return shape_from_hf_config(config, name=str(name))


def dtype_bytes(kv_dtype: str) -> int:
    """Bytes per element of a KV cache dtype name."""
    key = kv_dtype.lower()
    if key not in KV_DTYPE_BYTES:
        raise UsageError(
            f"unknown KV dtype {kv_dtype!r}", hint="Use one of: " + ", ".join(KV_DTYPE_BYTES)
        )
    return KV_DTYPE_BYTES[key]


def heads_per_rank(kv_heads: int, tp: int) -> int:
    """KV heads each tensor-parallel rank holds (vLLM replicates heads when tp > kv_heads)."""
    if tp <= 0:
        raise UsageError(f"tensor-parallel size must be >= 1, got {tp}")
    if kv_heads % tp == 0:
        return kv_heads // tp
    if tp % kv_heads == 0:
        return 1
    raise UsageError(
        f"TP {tp} does not split {kv_heads} KV heads evenly",
        hint=f"Use a TP that divides {kv_heads} or is a multiple of it.",
    )


@dataclass(frozen=True)
class DescriptorPlan:
    """What one decode rank reads over vLLM's NIXL path: one descriptor per (layer, K|V, block)."""

    prefill_tp: int
    decode_tp: int
    prefill_heads_per_rank: int
    decode_heads_per_rank: int
    # Prefill ranks each decode rank reads from (>1 when the decode TP is smaller).
    remote_ranks_per_decode_rank: int
    descriptors_per_decode_rank: int
    descriptor_bytes: int
    bytes_per_decode_rank: int

    @property
    def total_descriptors(self) -> int:
        return self.descriptors_per_decode_rank * self.decode_tp


@dataclass(frozen=True)
class KvGeometry:
    """The KV cache of one request: its size in bytes, blocks and NIXL descriptors."""

    model: ModelShape
    kv_dtype: str
    block_size: int
    tokens: int

    @property
    def dtype_bytes(self) -> int:
        return dtype_bytes(self.kv_dtype)

    @property
    def bytes_per_token(self) -> int:
        m = self.model
        return 2 * m.layers * m.kv_heads * m.head_dim * self.dtype_bytes

    @property
    def blocks(self) -> int:
        return math.ceil(self.tokens / self.block_size)

    @property
    def padded_tokens(self) -> int:
        # A partial last block moves whole.
        return self.blocks * self.block_size

    @property
    def total_bytes(self) -> int:
        return self.padded_tokens * self.bytes_per_token

    @property
    def block_bytes_per_layer(self) -> int:
        """Bytes of one block of K (or of V) for one layer, all heads."""
        m = self.model
        return self.block_size * m.kv_heads * m.head_dim * self.dtype_bytes

    def descriptor_plan(self, prefill_tp: int = 1, decode_tp: int = 1) -> DescriptorPlan:
        """How many descriptors of which size each decode rank reads for this request."""
        kv_heads = self.model.kv_heads
        p_heads = heads_per_rank(kv_heads, prefill_tp)
        d_heads = heads_per_rank(kv_heads, decode_tp)
        if not (decode_tp % prefill_tp == 0 or prefill_tp % decode_tp == 0):
            raise UsageError(
                f"decode TP {decode_tp} neither divides nor is a multiple of "
                f"prefill TP {prefill_tp}",
                hint="vLLM's NIXL connector needs one TP to be a multiple of the other "
                "(e.g. prefill TP1 -> decode TP2).",
            )
        per_layer_kv = 2 * self.model.layers * self.blocks
        unit = self.block_size * self.model.head_dim * self.dtype_bytes  # one head of one block
        if decode_tp >= prefill_tp:
            # Each decode rank reads its (smaller or equal) slice of heads from one prefill rank.
            remote = 1
            desc_bytes = unit * d_heads
        else:
            # Each decode rank gathers the slices of several prefill ranks.
            remote = prefill_tp // decode_tp
            desc_bytes = unit * p_heads
        count = per_layer_kv * remote
        return DescriptorPlan(
            prefill_tp=prefill_tp,
            decode_tp=decode_tp,
            prefill_heads_per_rank=p_heads,
            decode_heads_per_rank=d_heads,
            remote_ranks_per_decode_rank=remote,
            descriptors_per_decode_rank=count,
            descriptor_bytes=desc_bytes,
            bytes_per_decode_rank=count * desc_bytes,
        )

    def to_dict(self, prefill_tp: int = 1, decode_tp: int = 1) -> dict:
        """Everything about this geometry, as plain JSON-able values."""
        plan = self.descriptor_plan(prefill_tp, decode_tp)
        return {
            "model": asdict(self.model),
            "kv_dtype": self.kv_dtype,
            "dtype_bytes": self.dtype_bytes,
            "block_size": self.block_size,
            "tokens": self.tokens,
            "padded_tokens": self.padded_tokens,
            "bytes_per_token": self.bytes_per_token,
            "blocks": self.blocks,
            "total_bytes": self.total_bytes,
            "descriptor_plan": {**asdict(plan), "total_descriptors": plan.total_descriptors},
        }


MAX_TOKENS = 1_000_000_000  # a thousand times the longest context windows of today; a
# larger count is a typo, while 100M is a real question the memory check answers (exit 4)


def resolve_geometry(
    tokens: int,
    model: str | None = "qwen3-32b",
    model_config: str | Path | None = None,
    kv_dtype: str = "fp8",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> KvGeometry:
    """Build a KvGeometry from CLI-style options (a config file wins over a preset name)."""
    if not 0 < tokens <= MAX_TOKENS:
        raise UsageError(f"--tokens must be 1 to {MAX_TOKENS:,}, got {tokens}",
                         hint="The prompt tokens of one request, e.g. --tokens 4000.")
    if not 0 < block_size <= 65_536:
        raise UsageError(f"--block-size must be 1 to 65536, got {block_size}",
                         hint="vLLM's default is 16 tokens per block.")
    dtype_bytes(kv_dtype)  # validate early
    shape = load_hf_config(model_config) if model_config else get_preset(model or "qwen3-32b")
    return KvGeometry(model=shape, kv_dtype=kv_dtype.lower(), block_size=block_size, tokens=tokens)


# Nominal one-direction bandwidths in bytes/s of the paths a KV cache can take. Measured
# figures beat these; they exist to say "what this would cost" where nothing can be measured.
NOMINAL_LINKS: dict[str, float] = {
    "nvlink-h100/h200 (450 GB/s)": 450e9,
    "pcie-gen5-x16 (63 GB/s)": 63e9,
    "ib-ndr-400 (50 GB/s)": 50e9,
    "ib-hdr-200 (25 GB/s)": 25e9,
    "tcp-100gbe (12.5 GB/s)": 12.5e9,
    "tcp-25gbe (3.1 GB/s)": 3.125e9,
    "tcp-10gbe (1.25 GB/s)": 1.25e9,
}


def link_cost_ms(total_bytes: int, bytes_per_second: float) -> float:
    """Milliseconds the bytes alone need on a link, ignoring every fixed cost."""
    return total_bytes / bytes_per_second * 1e3
