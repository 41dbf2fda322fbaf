"""Start and stop real vLLM API servers (under `kvprof attach` or not) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BLOCK_SIZE = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_env(core: int, side_port: int | None = None,
               worker_in_core: bool = False) -> dict[str, str]:
    """Loopback-only engine environment pinned to ``core``.

    ``worker_in_core``: the model runner runs inside the EngineCore process (vLLM's uni
    executor, the default topology on one GPU) instead of a third process (the CPU default),
    so the engine starts with one Python process fewer to import vLLM into.
    """
    env = dict(os.environ)
    env.update({
        "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": str(core),
        "VLLM_HOST_IP": "127.0.0.1", "UCX_NET_DEVICES": "lo", "HF_HUB_OFFLINE": "1",
        "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1", "VLLM_LOGGING_LEVEL": "WARNING",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "TOKENIZERS_PARALLELISM": "false",
    })
    if side_port:
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(side_port)
    if worker_in_core:
        # The API server's EngineCore is a separate process regardless; this only lets
        # the CPU platform keep the uni executor.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def server_command(model: Path, port: int, kv_config: dict | None) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port), "--block-size", str(BLOCK_SIZE),
           "--max-model-len", "1024", "--max-num-seqs", "8", "--dtype", "bfloat16",
           "--seed", "0", "--served-model-name", "tiny",
           # Start-up trims: no torch.compile, quiet frontend; the
           # baseline engine uses the same flags, so tokens stay comparable.
           "--enforce-eager", "--disable-log-stats",
           "--uvicorn-log-level", "warning"]
    if kv_config:
        cmd += ["--kv-transfer-config", json.dumps(kv_config)]
    return cmd


def start_server(model: Path, port: int, core: int, kv_config: dict | None, log_path: Path,
                 attach: list[str] | None = None, side_port: int | None = None,
                 worker_in_core: bool = False) -> subprocess.Popen:
    """Start one API server; ``attach`` = kvprof attach options to run it under."""
    cmd = server_command(model, port, kv_config)
    if attach is not None:
        cmd = [sys.executable, "-m", "kvprof", "attach", *attach, "--", *cmd]
    log = open(log_path, "wb")
    return subprocess.Popen(cmd, env=engine_env(core, side_port, worker_in_core), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)


def wait_ready(proc: subprocess.Popen, port: int, log_path: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n"
                               + log_path.read_text(errors="replace")[-4000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise TimeoutError(f"server on {port} not ready:\n"
                       + log_path.read_text(errors="replace")[-4000:])


def stop(proc: subprocess.Popen, timeout: float = 60) -> int | None:
    """SIGINT the process group (flushes probes, prints the summary), then SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
    try:  # anything left in the group (an orphaned worker) goes too
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return proc.returncode


def stop_all(procs: list[subprocess.Popen], timeout: float = 60) -> None:
    """Stop several servers at once: SIGINT every group first, so their shutdowns overlap."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
    deadline = time.time() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
        stop(proc)  # SIGKILLs what is left of the group


def complete(port: int, prompt: str, max_tokens: int, request_id: str,
             stream: bool = False) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-Request-Id": request_id})
    with urllib.request.urlopen(req, timeout=300) as r:
        raw = r.read().decode()
    if not stream:
        return json.loads(raw)
    text = ""
    for line in raw.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            text += json.loads(line[6:])["choices"][0]["text"]
    return {"choices": [{"text": text}]}
