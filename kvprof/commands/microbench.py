"""`kvprof microbench`: time moving one request's FP8 KV blocks, step by step."""

from __future__ import annotations

from pathlib import Path

import typer


def microbench(
    tokens: int = typer.Option(4000, "--tokens", help="Prompt tokens whose KV is moved."),
    model: str = typer.Option(
        "qwen3-32b", "--model", help="Model preset (see 'Known presets' in errors)."
    ),
    model_config: Path | None = typer.Option(
        None, "--model-config", help="A Hugging Face config.json; overrides --model."
    ),
    kv_dtype: str = typer.Option("fp8", "--kv-dtype", help="fp8, bf16, fp16 or fp32."),
    block_size: int = typer.Option(16, "--block-size", help="Tokens per KV block."),
    prefill_tp: int = typer.Option(1, "--prefill-tp", help="Tensor-parallel size of prefill."),
    decode_tp: int = typer.Option(2, "--decode-tp", help="Tensor-parallel size of decode."),
    transport: str = typer.Option(
        "auto", "--transport", help="auto, copy (one process), gloo (two processes), nccl, nixl."
    ),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda."),
    iters: int = typer.Option(20, "--iters", help="Timed runs per step."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed runs before timing."),
    sweep: str | None = typer.Option(
        None, "--sweep", help="Comma-separated token counts, e.g. 500,1000,2000,4000,8000."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Write all results to this file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Time FP8 KV block transfers step by step (setup, gather, wire, scatter) against the
    hardware limit, and show what the seed's 4,000-token request costs on each link."""
    from kvprof.microbench.runner import run_microbench_command

    run_microbench_command(
        tokens=tokens, model=model, model_config=model_config, kv_dtype=kv_dtype,
        block_size=block_size, prefill_tp=prefill_tp, decode_tp=decode_tp, transport=transport,
        device=device, iters=iters, warmup=warmup, sweep=sweep, json_out=json_out, quiet=quiet,
    )
