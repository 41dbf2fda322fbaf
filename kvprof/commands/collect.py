"""`kvprof collect`: sample NVML, NVLink, InfiniBand, host and placement on one node."""

from __future__ import annotations

from pathlib import Path

import typer


def collect(
    interval: float = typer.Option(0.1, "--interval", help="Seconds between samples (10 Hz)."),
    once: bool = typer.Option(False, "--once", help="Take one sample set, print it, exit."),
    fmt: str = typer.Option("json", "--format", help="Output of --once: json or prom."),
    listen: str = typer.Option(
        "127.0.0.1:9402", "--listen",
        help="HOST:PORT serving Prometheus /metrics, /healthz and /readyz ('' = off). "
        "The default port 9402 never clashes with dcgm-exporter's 9400.",
    ),
    output: Path | None = typer.Option(
        None, "--output", help="Directory for time-rotated Parquet sample files."
    ),
    rotate: float = typer.Option(
        60.0, "--rotate", help="Seconds per Parquet file (written as .tmp, renamed when done)."
    ),
    sysfs: Path = typer.Option(Path("/sys"), "--sysfs", help="Root of sysfs (for fixtures)."),
    proc: Path = typer.Option(Path("/proc"), "--proc", help="Root of procfs (/host/proc in pods)."),
    no_nvml: bool = typer.Option(False, "--no-nvml", help="Do not touch NVML at all."),
    kubelet_socket: Path = typer.Option(
        Path("/var/lib/kubelet/pod-resources/kubelet.sock"), "--kubelet-socket",
        help="kubelet pod-resources gRPC socket.",
    ),
    duration: float | None = typer.Option(
        None, "--duration", help="Stop after this many seconds (default: until SIGTERM)."
    ),
    watch_pid: list[str] = typer.Option(
        [], "--watch-pid", help="[ROLE=]PID: sample this process's CPU waits (run-queue wait, "
        "CPU time, involuntary switches per thread); repeatable.",
    ),
    watch_name: list[str] = typer.Option(
        [], "--watch-name", help="[ROLE=]REGEX: sample the CPU waits of processes whose command "
        "line matches, and of their descendants, e.g. 'client=aiperf profile' for the load "
        "generator; repeatable.",
    ),
    watch_attach: bool = typer.Option(
        True, "--watch-attach/--no-watch-attach",
        help="Sample the CPU waits of every process started under `kvprof attach` (found by "
        "its environment; needs root or CAP_SYS_PTRACE for other users' processes).",
    ),
) -> None:
    """Sample GPU, NVLink, InfiniBand and host counters and the CPU waits of the serving
    processes at 10 Hz and record pod placement;
    serve them as Prometheus metrics and write them as Parquet.

    Start with `kvprof collect --once`: one sample set as JSON, with the reason for every
    value that has no data (no NVML, no InfiniBand, no kubelet socket). SIGTERM / SIGINT
    finish the current Parquet file and exit 0."""
    from kvprof.collectors.daemon import run_collect_command

    run_collect_command(
        interval=interval, once=once, fmt=fmt, listen=listen, output=output, rotate=rotate,
        sysfs=sysfs, proc=proc, no_nvml=no_nvml, kubelet_socket=kubelet_socket,
        duration=duration, watch_pids=tuple(watch_pid), watch_names=tuple(watch_name),
        watch_attach=watch_attach,
    )
