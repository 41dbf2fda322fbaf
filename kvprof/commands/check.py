"""`kvprof check`: this machine's facts and the known crashes a command would hit."""

from __future__ import annotations

import json

import typer


def check(
    ctx: typer.Context,
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
    proc: str = typer.Option(None, "--proc", help="Where /proc is, for the CPU flags (a "
                             "container with the host's /proc mounted elsewhere); default "
                             "$KVPROF_PROC, else /proc."),
) -> None:
    """Print versions (vLLM, NIXL, Dynamo, py-spy), CPU features and known problems.

    With a command after --, check that command line too, e.g.
    `kvprof check -- python -m vllm.entrypoints.openai.api_server --model M --dtype bfloat16
    --kv-transfer-config '{"kv_connector":"NixlConnector",...}'` warns on AMX CPUs.
    """
    import os

    from kvprof.cpu_quirks import ENV_PROC
    from kvprof.setup_check import render, run_checks

    if proc:
        from kvprof.errors import UsageError
        from kvprof.inputs import path_problem

        why = path_problem(proc, "dir")
        if why:
            raise UsageError(f"--proc {proc}: {why}",
                             hint="Pass the folder where the host's /proc is mounted.")
        os.environ[ENV_PROC] = proc
    args = list(ctx.args)
    if args and args[0] == "--":
        args = args[1:]
    result = run_checks(args or None)
    typer.echo(json.dumps(result.to_dict(), indent=1) if json_out else render(result))


def register(app: typer.Typer) -> None:
    """Add `check`; it takes an optional command line verbatim after --."""
    app.command(
        "check",
        options_metavar="[OPTIONS] [-- COMMAND [ARGS]...]",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                          "allow_interspersed_args": False,
                          "help_option_names": ["-h", "--help"]},
    )(check)
