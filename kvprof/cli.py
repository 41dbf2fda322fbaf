"""The kvprof command line: one Typer app; each command imports its subsystem lazily."""

from __future__ import annotations

import os
import signal
import sys

import click
import typer

from kvprof import __version__
from kvprof.commands import analysis as analysis_commands
from kvprof.commands import attach as attach_command
from kvprof.commands import check as check_command
from kvprof.commands import collect as collect_command
from kvprof.commands import microbench as microbench_command
from kvprof.commands import whatif as whatif_command
from kvprof.errors import EXIT_FAILED, EXIT_USAGE, KvprofError

app = typer.Typer(
    name="kvprof",
    help=(
        "Profile the KV-cache hand-off in disaggregated LLM serving (vLLM / NVIDIA Dynamo).\n\n"
        "Exit codes: 0 ok, 1 failed, 2 bad usage, 3 bad input data, "
        "4 needed resource absent (GPU, NVML, nixl, cluster)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    # Inherited by every subcommand and group (click copies it to child contexts).
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"kvprof {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print the kvprof version and exit.",
        callback=_version_callback, is_eager=True,
    ),
) -> None:
    """Profile the KV-cache hand-off in disaggregated LLM serving."""


app.command("microbench", context_settings={"help_option_names": ["-h", "--help"]})(
    microbench_command.microbench
)
attach_command.register(app)
check_command.register(app)
app.command("collect", context_settings={"help_option_names": ["-h", "--help"]})(
    collect_command.collect
)
analysis_commands.register(app)
app.command("whatif", context_settings={"help_option_names": ["-h", "--help"]})(
    whatif_command.whatif
)


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(ClickException, Abort) classes of both click and the copy newer Typer vendors."""
    clicks: list[type] = [click.ClickException]
    aborts: list[type] = [click.exceptions.Abort]
    try:
        from typer._click import exceptions as vendored  # Typer >= 0.20 ships its own click

        clicks.append(vendored.ClickException)
        aborts.append(typer.Abort)
    except ImportError:
        pass
    return tuple(clicks), tuple(aborts)


def print_error(err: KvprofError) -> None:
    """The one place that turns a KvprofError into the documented stderr lines."""
    sys.stderr.write(f"Error: {err.message}\n")
    # Every error gets its Hint: line (the contract scripts and people rely on, issue 21).
    hint = err.hint or ("run 'kvprof COMMAND --help' for the options and their ranges."
                        if err.exit_code == EXIT_USAGE else
                        "check the input named above; 'kvprof COMMAND --help' says what each "
                        "option expects.")
    sys.stderr.write(f"Hint: {hint}\n")


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; never shows a traceback for an expected failure."""
    click_errors, aborts = _click_exception_types()
    try:
        from kvprof.help_words import word_placeholders

        command = word_placeholders(typer.main.get_command(app))
        rc = command.main(args=argv, prog_name="kvprof", standalone_mode=False)
    except KvprofError as err:
        print_error(err)
        sys.exit(err.exit_code)
    except aborts:
        sys.stderr.write("Aborted.\n")
        sys.exit(130)
    except click_errors as err:
        if type(err).__name__ == "NoArgsIsHelpError":
            # `kvprof` alone: the help text is the answer, not an error.
            sys.stdout.write(err.ctx.get_help() + "\n" if err.ctx else "")
            sys.exit(0)
        err.show()
        sys.stderr.write("Hint: run 'kvprof --help' or 'kvprof COMMAND --help'.\n")
        sys.exit(err.exit_code if err.exit_code else EXIT_USAGE)
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted.\n")
        sys.exit(130)
    except Exception as err:  # the last resort: a bug, reported without a wall of traceback
        if os.environ.get("KVPROF_DEBUG"):
            raise
        sys.stderr.write(f"Error: internal error: {type(err).__name__}: {err}\n")
        sys.stderr.write("Hint: rerun with KVPROF_DEBUG=1 for the traceback and report it.\n")
        sys.exit(EXIT_FAILED)
    if rc == 130:
        # Typer turns Ctrl-C into a silent exit code 130: say it (issue 21).
        sys.stderr.write("Interrupted.\n")
    # The work is done and its outputs written: a Ctrl-C from here on would land in the
    # interpreter's shutdown (thread joins, atexit) and end the process by the signal itself
    # (exit -2, no message), so the command's own exit status stands.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
