"""Record what NVIDIA Dynamo and vLLM emit on their own, as a user would export it.

Starts `kvprof traces receive`, then Dynamo (frontend + prefill + decode worker, disagg) with
OTLP tracing to it (OTEL_EXPORT_ENABLED, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, vLLM's
--otlp-traces-endpoint) and Dynamo's per-request `request_end` records
(DYN_REQUEST_TRACE=1, DYN_REQUEST_TRACE_SINKS=stderr, DYN_LOGGING_JSONL=true: one JSON log
line per record in the frontend's log), sends a few streaming completions with X-Request-Id
headers, and keeps:

    OUT/traces/received/*.jsonl   Dynamo's and vLLM's spans (OTLP/JSON lines)
    OUT/traces/kvprof-*.jsonl     kvprof's probe spans (only with --attach)
    OUT/dynamo-frontend.jsonl     the frontend's JSONL log lines with request_end records
    OUT/client.json               each request's id and the client's TTFT

    .venv/bin/python -m demo.dynamo.record_native --out DIR [--attach] [--requests 4]

Run it under `flock /tmp/kvprof-engines.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from demo.dynamo import stack as dyn
from demo.procs import DemoProcessError, ProcessManager
from kvprof.analysis.loaders.dynamo_records import SCHEMA

EXPORT_WAIT_S = 6.0  # Dynamo's Rust exporter sends in 5 s batches and drops its queue on exit
RECORD_MARK = SCHEMA  # the marker of a request_end line in the frontend log


def _receiver(pm: ProcessManager, out: Path, python: str) -> tuple[object, str]:
    ready = out / "receiver.json"
    ready.unlink(missing_ok=True)
    proc = pm.start("receiver", [python, "-m", "kvprof", "traces", "receive", "--output",
                                 str(out / "traces" / "received"), "--grpc", "127.0.0.1:0",
                                 "--http", "off", "--ready-file", str(ready)], cwd=dyn.REPO)
    deadline = time.monotonic() + 60
    while not ready.exists():
        pm.dead([proc], " before it was ready")
        if time.monotonic() > deadline:
            raise DemoProcessError("the OTLP receiver did not start within 60 s")
        time.sleep(0.2)
    return proc, "http://" + json.loads(ready.read_text())["grpc"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.dynamo.record_native",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--attach", action="store_true", help="workers under kvprof attach too")
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--work", type=Path, default=dyn.REPO / "out" / "dynamo-native")
    args = p.parse_args(argv)
    out = args.out.resolve()
    # Only a previous recording (it has client.json) is replaced: --out is a user's path, and
    # removing an arbitrary folder tree on a typo would lose their files.
    if out.exists() and any(out.iterdir()) and not (out / "client.json").exists():
        print(f"Error: --out {out} is not empty and holds no earlier recording (client.json)",
              file=sys.stderr)
        print("Hint: Pass a new or empty folder, or an earlier record_native --out.",
              file=sys.stderr)
        return 2
    shutil.rmtree(out, ignore_errors=True)
    (out / "traces").mkdir(parents=True)
    work = args.work.resolve()
    shutil.rmtree(work / "request-trace", ignore_errors=True)
    pm = ProcessManager(work / "logs")
    pm.install_cleanup()
    try:
        receiver, endpoint = _receiver(pm, out, sys.executable)
        model = dyn.build_model(work, dyn.DYNAMO_PYTHON)
        cfg = dyn.StackConfig(
            model_dir=model, work_dir=work, mode="disagg", attach=args.attach,
            otlp_endpoint=endpoint, traces=out / "traces",
            extra_env={"DYN_REQUEST_TRACE": "1", "DYN_REQUEST_TRACE_SINKS": "stderr,jsonl",
                       "DYN_REQUEST_TRACE_OUTPUT_PATH": str(work / "request-trace"),
                       "OTEL_RESOURCE_ATTRIBUTES": "host.name=recorder"})
        stack = dyn.start_stack(cfg, pm)
        client = []
        for i in range(args.requests):
            c = dyn.stream_completion(stack.base_url, dyn.long_prompt(i),
                                      f"kvprof-native-{i}", max_tokens=8)
            client.append({"x_request_id": c.request_id, "ttft_ms": round(c.ttft_s * 1e3, 2),
                           "total_ms": round(c.total_s * 1e3, 2), "chunks": c.chunks})
        ok, failed = dyn.wait_kv_transfers(stack.workers["decode"].log_path, args.requests)
        time.sleep(EXPORT_WAIT_S)
        for proc in reversed(stack.processes()):
            pm.stop(proc)
        pm.stop(receiver)
        lines = [ln for ln in stack.frontend.log_path.read_text(errors="replace").splitlines()
                 if RECORD_MARK in ln]
        (out / "dynamo-frontend.jsonl").write_text("".join(ln + "\n" for ln in lines))
        trace_file = work / "request-trace"  # the jsonl sink's file (a file, not a folder)
        if trace_file.is_file():
            shutil.copy(trace_file, out / "request-trace.jsonl")
        (out / "client.json").write_text(json.dumps(
            {"requests": client, "kv_transfers": {"successful": ok, "failed": failed}},
            indent=1) + "\n")
        print(json.dumps({"out": str(out), "request_end_lines": len(lines),
                          "kv_transfers": [ok, failed], "client": client}, indent=1))
    except DemoProcessError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 4
    finally:
        pm.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
