"""The CLI through its real entry point: help, version, exit codes, Error:/Hint: lines."""

from __future__ import annotations

import subprocess
import sys

import kvprof


def run_kvprof(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvprof", *args], capture_output=True, text=True, timeout=timeout
    )


def test_version() -> None:
    r = run_kvprof("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"kvprof {kvprof.__version__}"


def test_help_lists_every_command() -> None:
    r = run_kvprof("--help")
    assert r.returncode == 0
    for cmd in ("microbench", "attach", "collect", "report", "audit", "compare", "traces"):
        assert cmd in r.stdout


def test_help_does_not_import_heavy_modules() -> None:
    code = (
        "import sys\n"
        "from kvprof.cli import app\n"
        "heavy = [m for m in ('torch', 'pandas', 'kubernetes', 'matplotlib', 'vllm', "
        "'pyarrow', 'opentelemetry.sdk') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


def test_unknown_option_is_usage_error() -> None:
    r = run_kvprof("microbench", "--no-such-option")
    assert r.returncode == 2
    assert "No such option" in r.stderr
    assert "Hint:" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_command_is_usage_error() -> None:
    r = run_kvprof("frobnicate")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


def test_bad_input_prints_error_and_hint(tmp_path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text("{garbage")
    r = run_kvprof("microbench", "--tokens", "16", "--model-config", str(cfg))
    assert r.returncode == 3
    lines = r.stderr.strip().splitlines()
    assert any(line.startswith("Error: ") and "not valid JSON" in line for line in lines)
    assert any(line.startswith("Hint: ") for line in lines)
    assert "Traceback" not in r.stderr


def test_unknown_preset_exit_3() -> None:
    r = run_kvprof("microbench", "--tokens", "16", "--model", "gpt-5")
    assert r.returncode == 3
    assert "Error: unknown model preset 'gpt-5'" in r.stderr
    assert "qwen3-32b" in r.stderr
