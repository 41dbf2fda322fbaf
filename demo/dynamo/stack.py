"""Start NVIDIA Dynamo 1.6.1 (frontend + vLLM workers) on this CPU, each process in its own
session with its own log; optionally each worker under `kvprof attach`.

Topologies (the seed's, in miniature):
  disagg: frontend, prefill worker (core 0), decode worker (core 1); NixlConnector kv_both
          over UCX on loopback, KV in DRAM.
  agg:    frontend, one worker (cores 0-1).

No etcd, no NATS: file discovery, TCP request plane, ZMQ event plane, every host on
127.0.0.1 (shared/context/dynamo-on-cpu.md). Tracing is on in every process: Dynamo's
spans (`http-request`, `router.route_request`, `handle_payload`) and vLLM's `llm_request`
go to OTLP_ENDPOINT, by default a closed local port (no receiver yet).

The processes run .venv-dynamo's python (make install-dynamo) through demo/dynamo/launch.py,
which applies demo/dynamo/shims.py first. This module itself needs only the standard
library, psutil and kvprof.errors, so the main venv's tests can drive it.

    python -m demo.dynamo.stack smoke [--mode disagg|agg] [--attach] [--work out/dynamo]
    python -m demo.dynamo.stack up    [--mode disagg|agg] [--attach]   # until Ctrl-C
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from demo.limits import engine_limit_args
from demo.procs import DemoProcessError, ManagedProcess, ProcessManager, free_port, log_tail

log = logging.getLogger("kvprof.demo.dynamo")

REPO = Path(__file__).resolve().parents[2]
DYNAMO_VENV = REPO / ".venv-dynamo"
DYNAMO_PYTHON = DYNAMO_VENV / "bin" / "python"

SERVED_MODEL_NAME = "tiny"
BLOCK_SIZE = 32  # on CPU a multiple of 32 (vllm-on-cpu.md); prompts must exceed one block
MAX_MODEL_LEN = 2048
KV_CACHE_GIB = 1
# bf16 dies with SIGILL on AMX CPUs in the NIXL decode path; float16 works on every x86-64.
DTYPE = "float16"
# The frontend says so once it has found a prefill worker; only then does it split requests.
PREFILL_READY_LINE = "Prefill router target activated"
# A port nothing listens on: Dynamo's and vLLM's OTLP exporters fail quietly into it.
# (A receiver, `kvprof traces receive`, will take its place.)
DEFAULT_OTLP_ENDPOINT = "http://127.0.0.1:9"
READY_TIMEOUT_S = 600.0


def kv_transfer_config() -> str:
    """NixlConnector in DRAM; kv_both: Dynamo decides per request (kv_transfer_params)."""
    return json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both",
                       "kv_buffer_device": "cpu"})


@dataclass(frozen=True)
class WorkerSpec:
    name: str  # log name, OTEL_SERVICE_NAME, kvprof --service-name
    mode: str  # --disaggregation-mode: agg | prefill | decode
    cores: str  # VLLM_CPU_OMP_THREADS_BIND
    side_channel_port: int | None = None  # NIXL handshake listener


@dataclass
class StackConfig:
    model_dir: Path
    work_dir: Path
    mode: str = "disagg"  # disagg | agg
    python: Path = DYNAMO_PYTHON
    http_port: int = 0  # 0: a free port
    otlp_endpoint: str = DEFAULT_OTLP_ENDPOINT
    tracing: bool = True  # False: no OTEL_* for Dynamo, no --otlp-traces-endpoint for vLLM
    attach: bool = False  # wrap each worker in `kvprof attach --exporter file`
    attach_role: str = "auto"  # kvprof's --role for the workers (auto reads kv_transfer_params)
    # Extra environment for every process (e.g. DYN_LOG=debug).
    extra_env: dict[str, str] = field(default_factory=dict)
    traces: Path | None = None  # where kvprof attach writes (default: work_dir/kvprof-traces)

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"

    @property
    def trace_dir(self) -> Path:
        return self.traces or self.work_dir / "kvprof-traces"

    @property
    def discovery_dir(self) -> Path:
        return self.work_dir / "discovery"


def worker_specs(mode: str) -> list[WorkerSpec]:
    if mode == "disagg":
        # Distinct NIXL side-channel ports: both engines listen on 127.0.0.1.
        return [WorkerSpec("dynamo-prefill", "prefill", "0", free_port()),
                WorkerSpec("dynamo-decode", "decode", "1", free_port())]
    if mode == "agg":
        return [WorkerSpec("dynamo-worker", "agg", "0-1")]
    raise ValueError(f"unknown mode {mode!r}: disagg or agg")


# -- command lines -------------------------------------------------------------------------------
def launcher(cfg: StackConfig, entry: str) -> list[str]:
    """`python -m demo.dynamo.launch worker|frontend` with .venv-dynamo's python."""
    return [str(cfg.python), "-m", "demo.dynamo.launch", entry]


def frontend_argv(cfg: StackConfig, http_port: int) -> list[str]:
    return [*launcher(cfg, "frontend"), "--http-host", "127.0.0.1", "--http-port",
            str(http_port)]


def worker_argv(cfg: StackConfig, spec: WorkerSpec) -> list[str]:
    """`python -m dynamo.vllm ...` (through the launcher); vLLM engine flags pass through."""
    argv = [
        *launcher(cfg, "worker"),
        "--model", str(cfg.model_dir),
        "--served-model-name", SERVED_MODEL_NAME,
        "--block-size", str(BLOCK_SIZE),
        "--max-model-len", str(MAX_MODEL_LEN),
        # Small enough that the demo's top level queues (demo/limits.py).
        *engine_limit_args(),
        "--dtype", DTYPE,
        "--enforce-eager",  # torch.compile warm-up doubles start-up on 2 cores
        "--no-enable-prefix-caching",  # every request really prefills and moves its KV
    ]
    if cfg.tracing:
        # vLLM's own `llm_request` span, a child of Dynamo's handle_payload.
        argv += ["--otlp-traces-endpoint", cfg.otlp_endpoint]
    if spec.mode != "agg":
        # The prefill worker refuses to start without an explicit kv-transfer-config.
        argv += ["--disaggregation-mode", spec.mode, "--kv-transfer-config",
                 kv_transfer_config()]
    return argv


def attach_argv(cfg: StackConfig, inner: Sequence[str], service_name: str,
                role: str | None = None) -> list[str]:
    """`kvprof attach --exporter file` around a process of the stack, from its venv. The
    frontend (Rust, no vLLM) gets no probe spans from it, but what attach reports of any
    process it runs: a death by a signal, with the Python stack where it happened."""
    return [str(cfg.python), "-m", "kvprof", "attach", "--exporter", "file",
            "--output", str(cfg.trace_dir), "--service-name", service_name,
            "--role", role or cfg.attach_role, "--", *inner]


# -- environments --------------------------------------------------------------------------------
def common_env(cfg: StackConfig, service_name: str) -> dict[str, str]:
    """What every process of the stack shares: no etcd/NATS, loopback only, tracing on."""
    env = {
        # No etcd: discovery through files in a directory of this run.
        "DYN_DISCOVERY_BACKEND": "file",
        "DYN_FILE_KV": str(cfg.discovery_dir),
        # No NATS: TCP request plane, ZMQ event plane.
        "DYN_REQUEST_PLANE": "tcp",
        "DYN_EVENT_PLANE": "zmq",
        # Without these the TCP request plane advertises a non-loopback address.
        "DYN_TCP_RPC_HOST": "127.0.0.1",
        "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
        "DYN_EVENT_PLANE_HOST": "127.0.0.1",
        "DYN_SYSTEM_HOST": "127.0.0.1",
        "DYN_LOGGING_JSONL": "true",
        "OTEL_SERVICE_NAME": service_name,
        # The model is a local folder: no hub look-ups.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
        # demo.dynamo.launch imports from the repository.
        "PYTHONPATH": os.pathsep.join(
            [str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]),
    }
    if cfg.tracing:
        env.update({
            # Tracing: Dynamo's Rust runtime exports OTLP (gRPC by default) when set.
            "OTEL_EXPORT_ENABLED": "true",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": cfg.otlp_endpoint,
            # Anything else OTLP (the Rust side's logs) goes there too, never to :4317.
            "OTEL_EXPORTER_OTLP_ENDPOINT": cfg.otlp_endpoint,
        })
    env.update(cfg.extra_env)
    return env


def worker_env(cfg: StackConfig, spec: WorkerSpec) -> dict[str, str]:
    env = common_env(cfg, spec.name)
    env.update({
        "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB),
        "VLLM_CPU_OMP_THREADS_BIND": spec.cores,
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
        "UCX_NET_DEVICES": "lo",
        # vLLM sets this itself unless nixl is already imported, which Dynamo's worker does
        # first (dynamo.nixl_connect): "can't reset UCX_RCACHE_MAX_UNRELEASED" otherwise.
        "UCX_RCACHE_MAX_UNRELEASED": "1024",
    })
    if spec.side_channel_port is not None:
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(spec.side_channel_port)
    return env


# -- the running stack ---------------------------------------------------------------------------
@dataclass
class Stack:
    cfg: StackConfig
    manager: ProcessManager
    frontend: ManagedProcess
    workers: dict[str, ManagedProcess]
    http_port: int
    startup_s: dict[str, float] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def processes(self) -> list[ManagedProcess]:
        return [self.frontend, *self.workers.values()]

    def check_alive(self) -> None:
        self.manager.dead(self.processes())

    def stop(self) -> None:
        self.manager.stop_all()


def _models(base_url: str) -> list[str]:
    try:
        with urllib.request.urlopen(base_url + "/v1/models", timeout=2) as resp:  # noqa: S310
            doc = json.load(resp)
    except (OSError, ValueError):
        return []
    return [m.get("id") for m in doc.get("data", [])]


def _log_has(path: Path, needle: str) -> bool:
    try:
        return needle in path.read_text(errors="replace")
    except OSError:
        return False


def _wait(manager: ProcessManager, procs: Iterable[ManagedProcess], ready, what: str,
          timeout_s: float) -> float:
    """Poll ready() until true; fail fast, naming the process, its exit status or signal and
    its fatal log lines, when any process exits."""
    procs = list(procs)
    start = time.monotonic()
    while True:
        manager.dead(procs, f" while waiting for {what}")
        if ready():
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            tails = "\n".join(f"--- {p.name} ({p.log_path}):\n{log_tail(p.log_path, 8)}"
                              for p in procs)
            raise DemoProcessError(f"{what} not within {timeout_s:.0f} s\n{tails}",
                                   hint="Retry when no other engines run on this machine.")
        time.sleep(0.5)


def start_stack(cfg: StackConfig, manager: ProcessManager | None = None,
                timeout_s: float = READY_TIMEOUT_S) -> Stack:
    """Start frontend and workers; return once the frontend serves the model (and, for
    disagg, has activated its prefill router). Stops everything it started on failure."""
    if not cfg.python.exists():
        raise DemoProcessError(f"{cfg.python} not found",
                               hint="Build the Dynamo venv first: make install-dynamo")
    if manager is None:  # a caller's manager keeps the logs where it keeps the others
        cfg.log_dir.mkdir(parents=True, exist_ok=True)
    # Stale discovery records of an earlier run would point the frontend at dead workers.
    shutil.rmtree(cfg.discovery_dir, ignore_errors=True)
    cfg.discovery_dir.mkdir(parents=True)  # parents: the work folder may not exist yet
    if cfg.attach:
        cfg.trace_dir.mkdir(parents=True, exist_ok=True)
    manager = manager or ProcessManager(cfg.log_dir)
    http_port = cfg.http_port or free_port()
    t0 = time.monotonic()
    try:
        argv = frontend_argv(cfg, http_port)
        if cfg.attach:
            argv = attach_argv(cfg, argv, "dynamo-frontend", role="auto")
        frontend = manager.start("dynamo-frontend", argv,
                                 env=common_env(cfg, "dynamo-frontend"), cwd=REPO)
        workers: dict[str, ManagedProcess] = {}
        for spec in worker_specs(cfg.mode):
            argv = worker_argv(cfg, spec)
            if cfg.attach:
                argv = attach_argv(cfg, argv, spec.name)
            workers[spec.mode] = manager.start(spec.name, argv, env=worker_env(cfg, spec),
                                               cwd=REPO)
        stack = Stack(cfg, manager, frontend, workers, http_port)
        everyone = stack.processes()
        stack.startup_s["models"] = _wait(
            manager, everyone, lambda: SERVED_MODEL_NAME in _models(stack.base_url),
            f"{SERVED_MODEL_NAME!r} in {stack.base_url}/v1/models", timeout_s)
        if cfg.mode == "disagg":
            stack.startup_s["prefill_router"] = _wait(
                manager, everyone, lambda: _log_has(frontend.log_path, PREFILL_READY_LINE),
                f"{PREFILL_READY_LINE!r} in {frontend.log_path}", timeout_s)
        stack.startup_s["total"] = time.monotonic() - t0
        return stack
    except BaseException:
        manager.stop_all()
        raise


# -- requests ------------------------------------------------------------------------------------
def long_prompt(i: int, tokens_hint: int = 2) -> str:
    """A prompt several KV blocks long (the tiny tokenizer makes ~15-20 tokens a sentence)."""
    sys.path.insert(0, str(REPO / "demo"))
    try:
        from tiny_model import _CORPUS
    finally:
        sys.path.remove(str(REPO / "demo"))
    sentences = [_CORPUS[(i + k) % len(_CORPUS)] for k in range(len(_CORPUS) * tokens_hint)]
    return f"Request {i}. " + " ".join(sentences)


@dataclass
class Completion:
    request_id: str
    text: str
    chunks: int
    ttft_s: float
    total_s: float
    finish_reason: str | None
    usage: dict | None


def stream_completion(base_url: str, prompt: str, request_id: str, max_tokens: int = 16,
                      timeout_s: float = 120.0) -> Completion:
    """One streaming /v1/completions call with an X-Request-Id header (greedy)."""
    body = json.dumps({
        "model": SERVED_MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
    }).encode()
    req = urllib.request.Request(
        base_url + "/v1/completions", data=body, method="POST",
        headers={"Content-Type": "application/json", "X-Request-Id": request_id})
    t0 = time.monotonic()
    ttft = None
    parts: list[str] = []
    chunks = 0
    finish = None
    usage = None
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 (loopback)
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            doc = json.loads(data)
            if doc.get("usage"):
                usage = doc["usage"]
            for choice in doc.get("choices") or ():
                text = choice.get("text") or ""
                if text and ttft is None:
                    ttft = time.monotonic() - t0
                parts.append(text)
                chunks += 1
                finish = choice.get("finish_reason") or finish
    total = time.monotonic() - t0
    return Completion(request_id, "".join(parts), chunks, ttft if ttft is not None else total,
                      total, finish, usage)


# -- kvprof's output -----------------------------------------------------------------------------
def read_kvprof_spans(trace_dir: Path) -> list[dict]:
    """Every span in kvprof's OTLP/JSON-lines files: name, service, role, request id, attrs."""
    out: list[dict] = []
    for path in sorted(trace_dir.rglob("*")):
        if not path.is_file() or path.suffix not in (".json", ".jsonl"):
            continue
        for line in path.read_text(errors="replace").splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            for rs in doc.get("resourceSpans", []):
                res = {a["key"]: _value(a["value"])
                       for a in rs.get("resource", {}).get("attributes", [])}
                for ss in rs.get("scopeSpans", []):
                    for sp in ss.get("spans", []):
                        attrs = {a["key"]: _value(a["value"]) for a in sp.get("attributes", [])}
                        out.append({
                            "name": sp.get("name"), "service": res.get("service.name"),
                            "role": attrs.get("kvprof.role"),
                            "request_id": attrs.get("kvprof.request_id"),
                            "trace_id": sp.get("traceId"), "file": path.name,
                            "duration_ms": (int(sp.get("endTimeUnixNano", 0))
                                            - int(sp.get("startTimeUnixNano", 0))) / 1e6,
                            "attributes": attrs,
                        })
    return out


def _value(v: dict):
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in v:
            return v[key]
    if "intValue" in v:
        return int(v["intValue"])
    if "arrayValue" in v:
        return [_value(x) for x in v["arrayValue"].get("values", [])]
    return v


def kv_transfer_lines(log_path: Path) -> list[str]:
    """vLLM's periodic `KV Transfer metrics: ...` lines in a worker log."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if "KV Transfer metrics" in line]


_SUCCESSFUL = re.compile(r"Num successful transfers=(\d+)")
_FAILED = re.compile(r"Num failed transfers=(\d+)")


def kv_transfer_counts(log_path: Path) -> tuple[int, int]:
    """(successful, failed) NIXL transfers summed over the decode log's metrics lines (each
    line covers one stats interval, VLLM_LOG_STATS_INTERVAL, 10 s by default)."""
    ok = failed = 0
    for line in kv_transfer_lines(log_path):
        if m := _SUCCESSFUL.search(line):
            ok += int(m.group(1))
        if m := _FAILED.search(line):
            failed += int(m.group(1))
    return ok, failed


def wait_kv_transfers(log_path: Path, at_least: int, timeout_s: float = 30.0) -> tuple[int, int]:
    """Poll the decode log until `at_least` successful transfers are reported (or timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = kv_transfer_counts(log_path)
        if counts[0] >= at_least or time.monotonic() > deadline:
            return counts
        time.sleep(1.0)


# -- CLI -----------------------------------------------------------------------------------------
def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m demo.dynamo.stack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("up", "smoke"))
    p.add_argument("--mode", choices=("disagg", "agg"), default="disagg")
    p.add_argument("--work", type=Path, default=REPO / "out" / "dynamo",
                   help="logs, discovery files, kvprof traces, the tiny model")
    p.add_argument("--model", type=Path, default=None,
                   help="model folder (default: build demo/tiny_model.py's into WORK/tiny)")
    p.add_argument("--attach", action="store_true", help="workers under kvprof attach")
    p.add_argument("--role", default="auto", help="kvprof attach --role for the workers")
    p.add_argument("--port", type=int, default=0, help="frontend HTTP port (default: free)")
    p.add_argument("--otlp-endpoint", default=DEFAULT_OTLP_ENDPOINT)
    p.add_argument("--no-tracing", action="store_true",
                   help="no OTLP export from Dynamo or vLLM (kvprof's probes still write)")
    p.add_argument("--python", type=Path, default=DYNAMO_PYTHON)
    p.add_argument("--requests", type=int, default=3, help="smoke: how many requests")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for every process (e.g. DYN_LOG=debug)")
    return p.parse_args(argv)


def build_model(work: Path, python: Path) -> Path:
    """demo/tiny_model.py's model, built with the given python (it has transformers)."""
    import subprocess

    target = work / "tiny"
    if not (target / "config.json").exists():
        subprocess.run([str(python), str(REPO / "demo" / "tiny_model.py"), str(target)],
                       check=True, stdout=subprocess.DEVNULL)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = _parse(argv)
    work = args.work.resolve()
    model = args.model.resolve() if args.model else build_model(work, args.python)
    cfg = StackConfig(model_dir=model, work_dir=work, mode=args.mode, python=args.python,
                      http_port=args.port, otlp_endpoint=args.otlp_endpoint,
                      tracing=not args.no_tracing, attach=args.attach, attach_role=args.role,
                      extra_env=dict(kv.split("=", 1) for kv in args.env))
    if cfg.attach:
        shutil.rmtree(cfg.trace_dir, ignore_errors=True)
    manager = ProcessManager(cfg.log_dir)
    manager.install_cleanup()
    try:
        stack = start_stack(cfg, manager)
        print(json.dumps({"base_url": stack.base_url, "startup_s": stack.startup_s,
                          "logs": str(cfg.log_dir)}), flush=True)
        if args.command == "up":
            while True:
                stack.check_alive()
                time.sleep(1)
        results = []
        for i in range(args.requests):
            c = stream_completion(stack.base_url, long_prompt(i), f"kvprof-smoke-{i}",
                                  max_tokens=args.max_tokens)
            results.append({"request_id": c.request_id, "ttft_ms": round(c.ttft_s * 1e3, 1),
                            "total_ms": round(c.total_s * 1e3, 1), "chunks": c.chunks,
                            "finish": c.finish_reason, "usage": c.usage, "text": c.text})
        print(json.dumps({"requests": results}, indent=1), flush=True)
        if args.mode == "disagg":
            ok, failed = wait_kv_transfers(stack.workers["decode"].log_path, args.requests)
            print(json.dumps({"kv_transfers": {"successful": ok, "failed": failed}}),
                  flush=True)
    except DemoProcessError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        if getattr(exc, "hint", None):
            print(f"Hint: {exc.hint}", file=sys.stderr)
        return 4
    finally:
        manager.stop_all()
    if cfg.attach:
        spans = read_kvprof_spans(cfg.trace_dir)
        summary: dict[str, int] = {}
        for s in spans:
            k = f"{s['service']}|{s['role']}|{s['name']}"
            summary[k] = summary.get(k, 0) + 1
        print(json.dumps({"kvprof_spans": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
