"""`kvprof report`, `audit`, `compare` and `traces convert`: the analysis commands."""

from __future__ import annotations

from pathlib import Path

import typer

traces_app = typer.Typer(help="Convert traces between OTLP JSON, Jaeger JSON and Perfetto; "
                         "receive OTLP traces from processes kvprof does not probe.",
                         no_args_is_help=True,
                         context_settings={"help_option_names": ["-h", "--help"]})


def report(
    traces: str = typer.Option(
        ..., "--traces", help="OTLP/Jaeger JSON file or directory, a Jaeger URL, or the "
        "OpenTelemetry Collector ClickHouse exporter's table: clickhouse://[USER:PASSWORD@]"
        "HOST:8123/DB[?table=otel_traces&timeout=300] (its HTTP interface; the spans are "
        "selected and flattened by SQL on the server, within --lookback of the newest span)."
    ),
    engine: str = typer.Option(
        "pandas", "--engine", metavar="pandas|chdb",
        help="Who reads local trace files: pandas (kvprof's loader) or chdb (ClickHouse "
        "in-process, pip install chdb: the same SQL as clickhouse://). Same report either way."),
    samples: Path | None = typer.Option(None, "--samples", help="Collector Parquet directory."),
    aiperf: Path | None = typer.Option(None, "--aiperf", help="aiperf artifact directory."),
    microbench: Path | None = typer.Option(None, "--microbench", help="microbench --json file."),
    placement: Path | None = typer.Option(None, "--placement", help="Placement records dir."),
    service: str | None = typer.Option(
        None, "--service", help="With a Jaeger URL: service; with clickhouse://: only traces "
        "that passed through this service."),
    lookback: str = typer.Option(
        "1h", "--lookback", help="With a Jaeger URL or clickhouse://: time window (1h, 30m)."),
    vllm_log: list[Path] = typer.Option(
        [], "--vllm-log",
        help="vLLM worker log (repeatable): 'KV Transfer metrics' lines (decode) and NIXL KV "
        "lease expiries (prefill).",
    ),
    vllm_metrics: Path | None = typer.Option(
        None, "--vllm-metrics", help="Saved /metrics page with vllm:nixl_* samples."
    ),
    dynamo_log: list[Path] = typer.Option(
        [], "--dynamo-log",
        help="NVIDIA Dynamo frontend log or request-trace files (repeatable; file or folder) "
        "with its request_end records (DYN_REQUEST_TRACE=1, DYN_REQUEST_TRACE_SINKS=stderr, "
        "DYN_LOGGING_JSONL=true): coarse legs where kvprof's probes did not run. Such files "
        "inside --traces are read too.",
    ),
    client_host: str | None = typer.Option(
        None, "--client-host",
        help="Host aiperf ran on (its host.name / node): its timestamps are on that clock. "
        "Unknown: the client's clock offset is estimated from the router's spans."),
    one_clock: bool = typer.Option(
        False, "--one-clock",
        help="Every process ran on this one machine (like `make demo`): one clock, no skew "
        "to estimate, whatever host or service names the spans carry."),
    out: Path | None = typer.Option(
        None, "--out", help="Output file; its suffix (.html, .md, .json) picks the format "
        "when --format is not given.  [default: out/report.html, or .md / .json after "
        "--format]"),
    fmt: str | None = typer.Option(
        None, "--format", help="html, md or json.  [default: from --out's suffix, else html]"),
    json_out: bool = typer.Option(False, "--json", help="Same as --format json."),
    stream: str = typer.Option(
        "auto", "--stream",
        help="auto, on or off: break the traces down shard by shard of requests (one shard's "
        "spans in memory at a time; the request table is kept whole: 12M spans peaked at "
        "6.4 GB); auto streams local trace files over 1 GiB. Same legs and summary; the "
        "sections that read every span at once (causes, CPU waits, capacity, what-if, link "
        "counters) are left out."),
    shards: int | None = typer.Option(
        None, "--shards", help="With --stream: how many shards of requests [default: one "
        "per 128 MB of trace files]."),
) -> None:
    """Break each request's TTFT into the legs of its path (client, router or Dynamo frontend,
    each engine's API server and EngineCore, KV wait/transfer/ready, first token, the way back)
    that add up to the client's TTFT, with link utilisation and a verdict per concurrency."""
    from kvprof.analysis.views.report import run_report_command

    summary = run_report_command(
        traces=traces, samples=samples, aiperf=aiperf, microbench=microbench,
        placement=placement, service=service, lookback=lookback, out=out,
        fmt="json" if json_out else fmt, vllm_log=vllm_log or None, vllm_metrics=vllm_metrics,
        client_host=client_host, one_clock=one_clock, dynamo_log=dynamo_log or None,
        engine=engine, stream=stream, shards=shards,
    )
    typer.echo(summary, err=True)


def audit(
    pods: Path | None = typer.Option(None, "--pods", help="`kubectl get pods -o json` file."),
    nodes: Path | None = typer.Option(None, "--nodes", help="`kubectl get nodes -o json` file."),
    kubeconfig: Path | None = typer.Option(None, "--kubeconfig", help="Audit a live cluster."),
    namespace: str | None = typer.Option(None, "--namespace", help="Only this namespace."),
    placement: Path | None = typer.Option(None, "--placement", help="Collector placement dir."),
    role_label: str | None = typer.Option(None, "--role-label", help="Pod label naming roles."),
    tokens: int = typer.Option(4000, "--tokens", help="Request size for the cost column."),
    model: str = typer.Option("qwen3-32b", "--model", help="Model preset for the cost column."),
    fmt: str | None = typer.Option(
        None, "--format", help="md, json or html.  [default: from --out's suffix, else md]"),
    json_out: bool = typer.Option(False, "--json", help="Same as --format json."),
    out: Path | None = typer.Option(None, "--out", help="Write here instead of stdout."),
) -> None:
    """Audit where prefill and decode pods run and which path each KV hand-off must take."""
    from kvprof.analysis.audit import run_audit_command

    text, summary = run_audit_command(
        pods=pods, nodes=nodes, kubeconfig=kubeconfig, namespace=namespace,
        placement=placement, role_label=role_label, tokens=tokens, model=model,
        fmt="json" if json_out else fmt, out=out,
    )
    if text is not None:
        typer.echo(text)
    typer.echo(summary, err=True)


def compare(
    baseline: Path = typer.Option(..., "--baseline", help="aiperf tree, one dir per concurrency."),
    candidate: Path = typer.Option(..., "--candidate", help="aiperf tree of the other setup."),
    gpus: list[int] = typer.Option(
        [], "--gpus", help="GPU count of baseline then candidate (give twice)."
    ),
    baseline_name: str = typer.Option("baseline", "--baseline-name"),
    candidate_name: str = typer.Option("candidate", "--candidate-name"),
    out: Path = typer.Option(Path("out/compare"), "--out", help="Output directory."),
    fmt: str = typer.Option("md", "--format", help="md or json (printed); files always written."),
    json_out: bool = typer.Option(False, "--json", help="Same as --format json."),
) -> None:
    """Compare two deployments' aiperf runs: the seed report's tables and Pareto plot."""
    from kvprof.analysis.compare import run_compare_command

    text, summary = run_compare_command(
        baseline=baseline, candidate=candidate, gpus=gpus, baseline_name=baseline_name,
        candidate_name=candidate_name, out=out, fmt="json" if json_out else fmt,
    )
    typer.echo(text)
    typer.echo(summary, err=True)


@traces_app.command("convert")
def convert(
    src: Path = typer.Argument(..., help="OTLP JSON(-lines) or Jaeger JSON file or directory."),
    to: str = typer.Option(..., "--to", help="jaeger, otlp or perfetto."),
    out: Path | None = typer.Option(None, "--out", help="Output file (default: stdout)."),
    into_source: bool = typer.Option(
        False, "--into-source",
        help="Allow --out inside the SRC folder (report then reads those spans twice, keeps "
        "each once and warns)."),
) -> None:
    """Convert traces to Jaeger JSON (UI upload), OTLP JSON or Perfetto trace-event JSON."""
    from kvprof.analysis.convert import run_convert_command

    text, summary = run_convert_command(src=src, to=to, out=out, into_source=into_source)
    if text is not None:
        typer.echo(text)
    typer.echo(summary, err=True)


@traces_app.command("receive", context_settings={"help_option_names": ["-h", "--help"]})
def receive(
    output: Path = typer.Option(
        Path("out/traces/received"), "--output",
        help="Directory for received-PID-NNNN.jsonl (OTLP/JSON lines, as the probes write).",
    ),
    grpc: str = typer.Option(
        "127.0.0.1:4317", "--grpc",
        help="HOST:PORT for OTLP/gRPC; port 0 picks a free port; 'off' = none.",
    ),
    http: str = typer.Option(
        "127.0.0.1:4318", "--http",
        help="HOST:PORT for OTLP/HTTP (POST /v1/traces); port 0 picks a free port; 'off'.",
    ),
    max_bytes: str = typer.Option(
        "64MiB", "--max-bytes", help="Start a new file before one passes this size."
    ),
    max_queue_bytes: str = typer.Option(
        "64MiB", "--max-queue-bytes",
        help="Bound on payloads read but not yet written; when full, senders get 503 / "
        "UNAVAILABLE and retry.",
    ),
    max_payload_bytes: str | None = typer.Option(
        None, "--max-payload-bytes",
        help="Largest export accepted, after gunzip (413 / RESOURCE_EXHAUSTED above it). "
        "Default: 16MiB or --max-queue-bytes if smaller.",
    ),
    duration: float | None = typer.Option(
        None, "--duration", help="Stop after this many seconds (default: until SIGINT/SIGTERM)."
    ),
    ready_file: Path | None = typer.Option(
        None, "--ready-file",
        help="Once listening, write the bound addresses here as JSON (removed at exit).",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the final summary as JSON."),
) -> None:
    """Receive OTLP traces (NVIDIA Dynamo's spans, vLLM's `llm_request`) and store them
    beside kvprof's own, so `kvprof report --traces DIR` reads both without a Jaeger.

    Accepts OTLP/gRPC TraceService/Export and OTLP/HTTP POST /v1/traces (protobuf or JSON,
    gzip), e.g. OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=http://127.0.0.1:4317 for Dynamo.
    Logs and metrics exports (Dynamo sends its logs here too) are read, counted and dropped,
    answered OK with OTLP's partial_success saying how many records were rejected and why, so
    the sender neither retries nor logs export errors. SIGINT / SIGTERM
    stop accepting, write what was received and exit 0 with a summary line."""
    from kvprof.receiver.run import run_receive_command

    run_receive_command(
        output=output, grpc=grpc, http=http, max_bytes=max_bytes,
        max_queue_bytes=max_queue_bytes, max_payload_bytes=max_payload_bytes,
        duration=duration, ready_file=ready_file, json_out=json_out,
    )


def register(app: typer.Typer) -> None:
    """Add the analysis commands to the app."""
    ctx = {"help_option_names": ["-h", "--help"]}
    app.command("report", context_settings=ctx)(report)
    app.command("audit", context_settings=ctx)(audit)
    app.command("compare", context_settings=ctx)(compare)
    app.add_typer(traces_app, name="traces")
