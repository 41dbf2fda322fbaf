"""`kvprof microbench` through the real entry point: exit codes, Error/Hint lines, --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--tokens", "40", "--model", "qwen3-0.6b", "--iters", "2", "--warmup", "1"]


def kvprof(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvprof", "microbench", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def assert_error(proc: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Error: " in proc.stderr and "Hint: " in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in proc.stderr


@pytest.mark.parametrize(
    ("args", "code", "word"),
    [
        (["--transport", "carrier-pigeon"], 2, "--transport"),
        (["--sweep", "500,lots"], 2, "--sweep"),
        (["--decode-tp", "3"], 2, "TP 3"),
        (["--device", "cuda"], 4, "CUDA"),
        (["--transport", "nccl"], 4, "nccl"),
    ],
)
def test_exit_codes(args: list[str], code: int, word: str) -> None:
    assert_error(kvprof(*SMALL, *args), code, word)


def test_bad_model_configs_exit_3(tmp_path) -> None:
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    assert_error(kvprof(*SMALL, "--model-config", str(garbage)), 3, "not valid JSON")
    shapeless = tmp_path / "config.json"
    shapeless.write_text(json.dumps({"model_type": "qwen3", "vocab_size": 10}))
    assert_error(kvprof(*SMALL, "--model-config", str(shapeless)), 3, "num_hidden_layers")
    assert_error(kvprof(*SMALL, "--model", "gpt-5"), 3, "qwen3-32b")


def test_json_written_and_table_printed_in_a_pipe(tmp_path) -> None:
    config = tmp_path / "config.json"
    # A Hugging Face config shaped like Llama-3.2-1B: 16 layers, 8 KV heads, head_dim 64.
    config.write_text(
        json.dumps(
            {"num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
             "hidden_size": 2048, "_name_or_path": "llama-3.2-1b-like"}
        )
    )
    out = tmp_path / "out" / "microbench.json"
    proc = kvprof(*SMALL, "--model-config", str(config), "--transport", "copy",
                  "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" not in proc.stdout + proc.stderr  # no colour or bar codes in a pipe
    # The table's headers are two lines (it fits 80 columns): "% of" above "limit".
    for text in ("per_descriptor", "% of", "limit", "1,153 ms", "tcp-10gbe"):
        assert text in proc.stdout
    data = json.loads(out.read_text())
    assert data["geometry"]["model"]["name"] == "llama-3.2-1b-like"
    assert data["geometry"]["bytes_per_token"] == 2 * 16 * 8 * 64
    assert set(data["steps"]) == {"setup", "gather", "wire", "scatter", "per_descriptor", "total"}
    for key in ("median_ms", "p10_ms", "p90_ms", "gbps", "limit_gbps", "pct_of_limit"):
        assert isinstance(data["steps"]["wire"][key], float)
    assert {"links", "environment", "sweep"} <= set(data)
    assert data["environment"]["hostname"] and data["environment"]["timestamp"]


def test_sweep_prints_growth_table_and_fit() -> None:
    proc = kvprof(*SMALL, "--transport", "copy", "--sweep", "16,160", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "How the cost grows" in proc.stdout
    assert "least-squares fit" in proc.stdout and "ms per MB" in proc.stdout
    assert proc.stderr == ""  # --quiet: nothing but the results


def test_corrupted_byte_exits_1_with_error_line(tmp_path) -> None:
    proc = kvprof(*SMALL, "--transport", "copy",
                  env={"KVPROF_MICROBENCH_CORRUPT": "total:0"})
    assert_error(proc, 1, "differs at byte 7")


def test_failure_mid_sweep_keeps_the_points_already_measured(tmp_path, monkeypatch, capsys) -> None:
    from kvprof.cli import main
    from kvprof.errors import VerificationError
    from kvprof.microbench import runner

    real_measure = runner.measure

    def measure(geometry, *args, **kwargs):
        if geometry.tokens == 64:
            raise VerificationError("simulated mismatch at 64 tokens", hint="test")
        return real_measure(geometry, *args, **kwargs)

    monkeypatch.setattr(runner, "measure", measure)
    out = tmp_path / "mb.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["microbench", *SMALL, "--transport", "copy", "--sweep", "16,64",
              "--json", str(out), "-q"])
    assert exit_info.value.code == 1
    assert "Error: simulated mismatch at 64 tokens" in capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["error"] == "simulated mismatch at 64 tokens"
    assert [p["tokens"] for p in data["sweep"]["points"]] == [16]
