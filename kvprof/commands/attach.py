"""`kvprof attach`: run a command with probes on, or sample a running worker with py-spy."""

from __future__ import annotations

from pathlib import Path

import typer


def attach(
    ctx: typer.Context,
    exporter: str = typer.Option(
        "file", "--exporter", help="otlp (OTEL_* env / --endpoint), file, console or none."
    ),
    endpoint: str | None = typer.Option(
        None, "--endpoint", help="OTLP endpoint, e.g. http://127.0.0.1:4318 (Jaeger)."
    ),
    output: Path = typer.Option(Path("out/traces"), "--output", help="Directory for files."),
    service_name: str | None = typer.Option(None, "--service-name", help="OTel service.name."),
    role: str = typer.Option("auto", "--role", help="prefill, decode or auto (from vLLM config)."),
    pid: int | None = typer.Option(
        None, "--pid", help="Sample this running process with py-spy (a brief pause per "
        "sample) and show each thread's phases and waits."
    ),
    duration: float = typer.Option(10.0, "--duration", help="With --pid: seconds to sample."),
    rate: int = typer.Option(100, "--rate", help="With --pid: samples per second."),
) -> None:
    """Run COMMAND (after --) with kvprof's vLLM probes in every Python process it starts,
    or, with --pid, sample an already running worker with py-spy and classify its stacks.

    A stop signal reaches COMMAND once every probed process has written out its spans (at
    most 3 s; vLLM kills its EngineCore at once); a second signal stops at once."""
    from kvprof.probes.launcher import run_attach_command

    rc = run_attach_command(
        command=list(ctx.args), exporter=exporter, endpoint=endpoint, output=output,
        service_name=service_name, role=role, pid=pid, duration=duration, rate=rate,
    )
    raise typer.Exit(rc)


def register(app: typer.Typer) -> None:
    """Add `attach` to the app; it takes the wrapped command's arguments verbatim."""
    app.command(
        "attach",
        options_metavar="[OPTIONS] -- COMMAND [ARGS]...  |  --pid PID [OPTIONS]",
        epilog=(
            "Examples: kvprof attach --exporter file --output out/traces -- python -m "
            "vllm.entrypoints.openai.api_server --model M ...;  "
            "kvprof attach --exporter otlp --endpoint http://127.0.0.1:4318 -- python -m "
            "dynamo.vllm ...;  kvprof attach --pid 1234 --duration 20"
        ),
        context_settings={
            "allow_extra_args": True,
            "ignore_unknown_options": True,
            "allow_interspersed_args": False,
            "help_option_names": ["-h", "--help"],
        },
    )(attach)
