"""Start and stop real vLLM API servers (under `kvprof attach` or not) on 127.0.0.1.

Every server leads its own session and dies with the test process (PR_SET_PDEATHSIG);
requests made with ``watch=`` fail within a second when a watched engine dies, with its exit
status and the fatal lines of its log, instead of waiting on an HTTP timeout.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

# float16 on every CPU: bf16 NIXL decode engines die with SIGILL on AMX (kvprof/cpu_quirks.py).
from kvprof.cpu_quirks import PORTABLE_DTYPE

REPO = Path(__file__).resolve().parents[2]
BLOCK_SIZE = 32


def free_port() -> int:
    """Outside the ephemeral range: no outgoing connection can take it before the engine binds
    it (a UCX loopback socket once took a side-channel port that way)."""
    from kvprof.ports import free_port as outside_ephemeral

    return outside_ephemeral("127.0.0.1")


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


def server_command(model: Path, port: int, kv_config: dict | None,
                   dtype: str = PORTABLE_DTYPE, python: str = sys.executable) -> list[str]:
    """vLLM's OpenAI server; ``python`` picks the venv (and so the vLLM version)."""
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port), "--block-size", str(BLOCK_SIZE),
           "--max-model-len", "1024", "--max-num-seqs", "8", "--dtype", dtype,
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
    return start_command(server_command(model, port, kv_config), core, log_path, attach,
                         side_port, worker_in_core)


def start_command(cmd: list[str], core: int, log_path: Path, attach: list[str] | None = None,
                  side_port: int | None = None, worker_in_core: bool = False
                  ) -> subprocess.Popen:
    """Start a server command line (see server_command) pinned to ``core``."""
    if attach is not None:
        # kvprof attach from the venv of the server it wraps.
        cmd = [cmd[0], "-m", "kvprof", "attach", *attach, "--", *cmd]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, env=engine_env(core, side_port, worker_in_core), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
                            preexec_fn=_die_with_parent)
    proc.log_path = log_path  # type: ignore[attr-defined]  # for EngineDied messages
    return proc


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class EngineDied(RuntimeError):
    """A watched engine exited while a request waited on it."""


def _death(proc: subprocess.Popen) -> str:
    rc = proc.returncode
    what = (f"died from {signal.Signals(-rc).name}" if rc is not None and rc < 0 else
            f"died from {signal.Signals(rc - 128).name}" if rc is not None and rc > 128 else
            f"exited with code {rc}")
    log = getattr(proc, "log_path", None)
    tail = ""
    if log is not None:
        lines = Path(log).read_text(errors="replace").splitlines()
        fatal = [ln for ln in lines if "died from" in ln or "Error" in ln or "Fatal" in ln]
        tail = "\n".join(fatal[-8:])
    return f"engine (pid {proc.pid}) {what}" + (f"; from its log {log}:\n{tail}" if tail else "")


def watched(call: Callable[[], dict], watch: Sequence[subprocess.Popen],
            timeout: float = 300) -> dict:
    """Run ``call`` (an HTTP request) while checking every watched engine twice a second."""
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = call()
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while thread.is_alive():
        thread.join(0.5)
        for proc in watch:
            if proc.poll() is not None:
                raise EngineDied(_death(proc))
        if time.monotonic() > deadline:
            raise TimeoutError(f"no answer within {timeout:.0f} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def wait_ready(proc: subprocess.Popen, port: int, log_path: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise EngineDied(_death(proc) + " before it was ready; its log ends:\n"
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
             stream: bool = False, watch: Sequence[subprocess.Popen] = ()) -> dict:
    """One completion; with ``watch``, fails fast when one of those engines dies."""
    if watch:
        return watched(lambda: complete(port, prompt, max_tokens, request_id, stream), watch)
    return _complete(port, prompt, max_tokens, request_id, stream)


def _complete(port: int, prompt: str, max_tokens: int, request_id: str,
              stream: bool = False) -> dict:
    """POST /v1/completions like aiperf does (X-Request-Id), timing the client's view:
    ``send_ns`` before the request goes out, ``first_ns`` when the first bytes of the
    answer arrive (the first server-sent event when streaming)."""
    import http.client

    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        send_ns = time.time_ns()
        conn.request("POST", "/v1/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json", "X-Request-Id": request_id})
        resp = conn.getresponse()
        first = resp.read1(65536)
        first_ns = time.time_ns()
        raw = (first + resp.read()).decode()
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {raw[:500]}")
    timing = {"send_ns": send_ns, "first_ns": first_ns, "x_request_id": request_id}
    if not stream:
        return {**json.loads(raw), **timing}
    text = ""
    for line in raw.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[6:])
            if "error" in event:  # a stream that said 200 reports failures as an event
                raise RuntimeError(f"error event in the stream: {event['error']}")
            text += event["choices"][0]["text"]
    return {"choices": [{"text": text}], **timing}


def aiperf_records(answers: list[dict], path: Path) -> Path:
    """The client's timings as aiperf 0.13 per-request records (profile_export.jsonl)."""
    path.mkdir(parents=True, exist_ok=True)
    lines = []
    for a in answers:
        ttft_ms = (a["first_ns"] - a["send_ns"]) / 1e6
        lines.append(json.dumps({
            "metadata": {"x_request_id": a["x_request_id"], "request_start_ns": a["send_ns"],
                         "benchmark_phase": "profiling", "was_cancelled": False},
            "metrics": {"time_to_first_token": {"value": ttft_ms, "unit": "ms"}}}))
    (path / "profile_export.jsonl").write_text("\n".join(lines) + "\n")
    return path
