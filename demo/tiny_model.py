"""Build a tiny random Qwen3 model and a byte-level BPE tokenizer that vLLM serves on a CPU."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Enough text for a few hundred merges, so prompts tokenize into realistic token counts.
_CORPUS = [
    "The prefill engine computes the KV cache of the prompt and hands it to the decode engine.",
    "Disaggregated serving splits prefill and decode across GPUs connected by NVLink or RDMA.",
    "A KV cache block holds the keys and values of sixteen or thirty-two tokens per layer.",
    "Time to first token grows when the handshake between engines happens on first contact.",
    "The quick brown fox jumps over the lazy dog while the scheduler batches requests.",
    "Kubernetes places pods on nodes; the placement decides which links the KV cache crosses.",
    "Hello world, this is a tiny model used only for tests and demos of kvprof.",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Shape constraints on CPU (shared/context/vllm-on-cpu.md): head_dim >= 32; a large
# initializer_range keeps greedy output from collapsing into one repeated token.
TINY_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=32, max_position_embeddings=2048, initializer_range=0.5,
    tie_word_embeddings=True, rope_theta=10000.0,
)


def build_tiny_model(path: str | Path, seed: int = 0, vocab_size: int = 512) -> Path:
    """Write config.json, bf16 safetensors weights and a tokenizer into ``path``; return it.

    Reuses an existing build (config.json and tokenizer.json present) so callers can cache.
    """
    out = Path(path)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    vocab = len(fast)

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab, bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id,
        torch_dtype="bfloat16", **TINY_CONFIG,
    )
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    gen = {"bos_token_id": fast.eos_token_id, "eos_token_id": fast.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", help="directory to write the model into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_tiny_model(args.path, seed=args.seed))


if __name__ == "__main__":
    main()
