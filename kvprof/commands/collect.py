"""`kvprof collect`: sample NVML, NVLink, InfiniBand, host and placement on one node."""

from __future__ import annotations

from pathlib import Path

import typer


def collect(
    interval: float = typer.Option(0.1, "--interval", help="Seconds between samples (10 Hz)."),
    once: bool = typer.Option(False, "--once", help="Take one sample set, print it, exit."),
    fmt: str = typer.Option("json", "--format", help="Output of --once: json or prom."),
    listen: str = typer.Option(
        "127.0.0.1:9402", "--listen", help="HOST:PORT serving Prometheus /metrics ('' = off)."
    ),
    output: Path | None = typer.Option(
        None, "--output", help="Directory for time-rotated Parquet sample files."
    ),
    rotate: float = typer.Option(60.0, "--rotate", help="Seconds per Parquet file."),
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
) -> None:
    """Sample GPU, NVLink, InfiniBand and host counters at 10 Hz and record pod placement;
    serve them as Prometheus metrics and write them as Parquet."""
    from kvprof.collectors.daemon import run_collect_command

    run_collect_command(
        interval=interval, once=once, fmt=fmt, listen=listen, output=output, rotate=rotate,
        sysfs=sysfs, proc=proc, no_nvml=no_nvml, kubelet_socket=kubelet_socket,
        duration=duration,
    )
