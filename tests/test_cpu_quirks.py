"""The AMX + bf16 + NIXL warning (kvprof/cpu_quirks.py) where users meet it: `kvprof check`,
`kvprof attach` and the demo's set-up check, on a CPU with AMX and on one without.

This machine may lack AMX; the AMX CPU is its own /proc/cpuinfo with the flags a Sapphire
Rapids core adds (amx_bf16 amx_tile amx_int8), read through kvprof's --proc / KVPROF_PROC.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvprof.cpu_quirks import ENV_PROC, has_amx, parse_serve_argv, warning_for_command
from kvprof.errors import ResourceAbsentError

REPO = Path(__file__).resolve().parents[1]
NIXL = '{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_buffer_device":"cpu"}'
WARNING = "this CPU has AMX"


def _proc_with(tmp_path: Path, amx: bool) -> Path:
    """A /proc holding this machine's cpuinfo, with AMX tiles added or taken away."""
    amx_flags = ("amx_bf16", "amx_tile", "amx_int8")
    lines = []
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            key, flags = line.split(":", 1)
            kept = [f for f in flags.split() if f not in amx_flags]
            line = f"{key}: " + " ".join(kept + (list(amx_flags) if amx else []))
        lines.append(line)
    root = tmp_path / ("proc-amx" if amx else "proc-no-amx")
    root.mkdir()
    (root / "cpuinfo").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def amx_proc(tmp_path):
    return _proc_with(tmp_path, amx=True)


@pytest.fixture
def plain_proc(tmp_path):
    return _proc_with(tmp_path, amx=False)


def kvprof(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvprof", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def serve(dtype: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "M",
            "--dtype", dtype, "--block-size", "32", *extra]


def test_kvprof_check_warns_on_an_amx_cpu_only(amx_proc, plain_proc):
    on_amx = kvprof("check", "--proc", str(amx_proc), "--json")
    assert on_amx.returncode == 0, on_amx.stderr
    doc = json.loads(on_amx.stdout)
    assert doc["facts"]["cpu AMX tiles"] == "yes (amx_tile)"
    assert any(WARNING in w and "--dtype float16" in w for w in doc["warnings"])
    plain = json.loads(kvprof("check", "--proc", str(plain_proc), "--json").stdout)
    assert plain["facts"]["cpu AMX tiles"] == "no"
    assert not any(WARNING in w for w in plain["warnings"])


def test_kvprof_check_judges_a_command_line(amx_proc):
    bf16 = kvprof("check", "--proc", str(amx_proc), "--", *serve(
        "bfloat16", "--kv-transfer-config", NIXL))
    assert bf16.returncode == 0 and f"! {WARNING}" in bf16.stdout, bf16.stdout
    fp16 = kvprof("check", "--proc", str(amx_proc), "--", *serve(
        "float16", "--kv-transfer-config", NIXL))
    assert fp16.returncode == 0 and WARNING not in fp16.stdout
    no_connector = kvprof("check", "--proc", str(amx_proc), "--", *serve("bfloat16"))
    assert WARNING not in no_connector.stdout


def test_kvprof_attach_warns_before_it_runs_the_command(amx_proc, plain_proc, tmp_path):
    # The command is a Python that exits at once; its argument list is a NIXL bf16 engine's.
    cmd = [sys.executable, "-c", "import sys", "--dtype", "bfloat16", "--block-size", "32",
           "--kv-transfer-config", NIXL]
    out = tmp_path / "traces"
    warned = kvprof("attach", "--exporter", "none", "--output", str(out), "--", *cmd,
                    env={ENV_PROC: str(amx_proc)})
    assert warned.returncode == 0, warned.stderr
    assert f"kvprof: warning: {WARNING}" in warned.stderr
    quiet = kvprof("attach", "--exporter", "none", "--output", str(out), "--", *cmd,
                   env={ENV_PROC: str(plain_proc)})
    assert quiet.returncode == 0 and WARNING not in quiet.stderr


def test_the_demos_setup_check_warns_on_an_amx_cpu(amx_proc, monkeypatch, capsys, tmp_path):
    sys.path.insert(0, str(REPO))
    from demo.run_demo import Console, Demo, DemoConfig

    monkeypatch.setenv(ENV_PROC, str(amx_proc))
    try:
        Demo(DemoConfig(out=tmp_path / "out", stack="vllm"), Console()).check_setup()
    except ResourceAbsentError as exc:  # no aiperf venv (make install builds it)
        pytest.skip(f"the demo's set-up check needs its venvs: {exc.message}")
    assert WARNING in capsys.readouterr().out


def test_older_dynamo_connector_flags_count_as_nixl():
    assert parse_serve_argv(["x", "--connector", "nixl"]).connector == "NixlConnector"
    assert parse_serve_argv(["x"], env={"DYN_CONNECTOR": "nixl"}).connector == "NixlConnector"
    assert parse_serve_argv(["x"], env={}).connector is None
    argv = ["python", "-m", "dynamo.vllm", "--model", "M", "--dtype", "bfloat16",
            "--connector", "nixl"]
    assert warning_for_command(argv, amx=True) is not None


def test_a_hub_model_id_reads_its_dtype_from_the_hugging_face_cache(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen3-32B" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    argv = ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "Qwen/Qwen3-32B",
            "--kv-transfer-config", NIXL]
    assert parse_serve_argv(argv).effective_dtype() == "bfloat16"
    assert warning_for_command(argv, amx=True) is not None
    assert warning_for_command([*argv, "--dtype", "float16"], amx=True) is None
    # Not in the cache: nothing is downloaded, and nothing is claimed.
    other = ["x", "--model", "Org/Absent", "--kv-transfer-config", NIXL]
    assert parse_serve_argv(other).effective_dtype() is None


def test_this_machine_is_read_as_it_is():
    flags = Path("/proc/cpuinfo").read_text()
    assert has_amx() == ("amx_tile" in flags)
