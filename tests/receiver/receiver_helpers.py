"""A real `kvprof traces receive` subprocess for the tests, and real OTel SDK spans to send it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 30.0


@dataclass
class Receiver:
    """One receiver process in its own session; stop() or kill() it."""

    proc: subprocess.Popen
    output: Path
    ready: dict
    stdout_path: Path
    stderr_path: Path
    result: dict = field(default_factory=dict)

    @property
    def grpc(self) -> str:
        return self.ready["grpc"]

    @property
    def http(self) -> str:
        return self.ready["http"]

    @property
    def url(self) -> str:
        return self.ready["http_traces_url"]

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> tuple[int, str, str]:
        """Signal it, wait for it; (exit code, stdout, stderr)."""
        if self.alive():
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"receiver did not exit within {timeout} s of "
                                 f"{signal.Signals(sig).name}: {self.stderr}") from None
        return rc, self.stdout_path.read_text(), self.stderr

    def kill(self) -> None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


def start_receiver(tmp_path: Path, *extra: str, output: Path | None = None,
                   grpc: str = "127.0.0.1:0", http: str = "127.0.0.1:0") -> Receiver:
    """Start `kvprof traces receive` on free 127.0.0.1 ports and wait for its ready file."""
    output = output or tmp_path / "received"
    run = tmp_path / f"run-{time.monotonic_ns()}"
    run.mkdir()
    ready_file = run / "ready.json"
    out, err = run / "stdout", run / "stderr"
    with out.open("wb") as fo, err.open("wb") as fe:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvprof", "traces", "receive", "--output", str(output),
             "--grpc", grpc, "--http", http, "--ready-file", str(ready_file), "--json", *extra],
            cwd=REPO, stdout=fo, stderr=fe, start_new_session=True)
    rec = Receiver(proc, output, {}, out, err)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready_file.exists():
        if not rec.alive():
            raise AssertionError(f"receiver exited {proc.returncode} before ready: "
                                 f"{rec.stderr}")
        if time.monotonic() > deadline:
            rec.kill()
            raise AssertionError(f"receiver not ready in {READY_TIMEOUT_S} s: {rec.stderr}")
        time.sleep(0.02)
    rec.ready = json.loads(ready_file.read_text())
    return rec


def summary_of(stdout: str) -> dict:
    """The --json summary (the last stdout line)."""
    return json.loads(stdout.strip().splitlines()[-1])


def make_spans(n_requests: int = 3, service: str = "dynamo-frontend", attrs_per_span: int = 0):
    """Dynamo-shaped traces (http-request > handle_payload > llm_request) as SDK spans."""
    mem = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service,
                                                       "host.name": "node-a"}))
    provider.add_span_processor(SimpleSpanProcessor(mem))
    tracer = provider.get_tracer("dynamo.test")
    for i in range(n_requests):
        with tracer.start_as_current_span("http-request") as root:
            root.set_attribute("x_request_id", f"req-{i}")
            root.set_attribute("ttft_ms", 12.5 + i)
            for k in range(attrs_per_span):
                root.set_attribute(f"extra.{k}", "v" * 16)
            with tracer.start_as_current_span("handle_payload") as hp:
                hp.set_attribute("request_id", f"dyn-{i}")
                with tracer.start_as_current_span("llm_request") as llm:
                    llm.set_attribute("gen_ai.request.id", f"dyn-{i}")
                    llm.set_attribute("gen_ai.usage.prompt_tokens", 40 + i)
    provider.shutdown()
    return list(mem.get_finished_spans())


def sent_spans(provider_spans) -> dict[str, tuple[str, str, str]]:
    """span id (hex) -> (trace id hex, parent span id hex, name) of SDK spans."""
    out = {}
    for sp in provider_spans:
        parent = f"{sp.parent.span_id:016x}" if sp.parent else ""
        out[f"{sp.context.span_id:016x}"] = (f"{sp.context.trace_id:032x}", parent, sp.name)
    return out


def loaded_spans(output: Path) -> dict[str, tuple[str, str, str]]:
    """The same mapping, read back through kvprof's analysis loader."""
    from kvprof.analysis.loaders.traces import load_spans

    df = load_spans(output).spans
    return {r.span_id: (r.trace_id, r.parent_span_id, str(r.name))
            for r in df.itertuples(index=False)}


def assert_files_complete(output: Path) -> int:
    """Every received file ends in a newline and every line is an OTLP/JSON request."""
    lines = 0
    files = sorted(output.glob("received-*.jsonl"))
    assert files, f"no received files in {output}"
    for f in files:
        data = f.read_bytes()
        assert data.endswith(b"\n"), f"{f.name} ends in half a line"
        for line in data.splitlines():
            doc = json.loads(line)
            assert list(doc) == ["resourceSpans"]
            lines += 1
    return lines
