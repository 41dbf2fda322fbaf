"""The body of `kvprof traces receive`: check options, serve until told to stop, summarise."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from kvprof.errors import ResourceAbsentError, UsageError

log = logging.getLogger(__name__)

DEFAULT_OUTPUT = Path("out/traces/received")
DEFAULT_MAX_PAYLOAD = 16 << 20
SHUTDOWN_GRACE_S = 5.0
_OFF = ("", "off", "none", "no", "false", "0")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_address(option: str, value: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port); ``off`` -> None."""
    if value.strip().lower() in _OFF:
        return None
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"{option} {value!r} is not HOST:PORT or 'off'",
                         hint=f"e.g. {option} 127.0.0.1:0 (0 picks a free port), "
                         f"{option} 0.0.0.0:PORT in a pod, or {option} off")
    return host, int(port)


def parse_size(option: str, value: str) -> int:
    """A byte count: ``67108864``, ``64M``, ``64MiB``, ``512k``, ``1G`` (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", str(value).lower())
    if not m or int(m.group(1)) <= 0:
        raise UsageError(f"{option} {value!r} is not a positive size",
                         hint=f"e.g. {option} 64MiB, {option} 512k or {option} 1048576")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


def _configure_logging() -> None:
    logger = logging.getLogger("kvprof")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _write_ready_file(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, path)  # a waiting script sees no file or a whole one


def run_receive_command(
    output: Path = DEFAULT_OUTPUT,
    grpc: str = "127.0.0.1:4317",
    http: str = "127.0.0.1:4318",
    max_bytes: str = "64MiB",
    max_queue_bytes: str = "64MiB",
    max_payload_bytes: str | None = None,
    duration: float | None = None,
    ready_file: Path | None = None,
    json_out: bool = False,
) -> dict[str, Any]:
    """Receive OTLP traces into OTLP/JSON-lines files until a signal or --duration; the
    summary as a dict (also printed as one line on stderr, and as JSON on stdout with --json)."""
    grpc_addr = parse_address("--grpc", grpc)
    http_addr = parse_address("--http", http)
    if grpc_addr is None and http_addr is None:
        raise UsageError("--grpc and --http are both off: nothing to receive on",
                         hint="keep at least one, e.g. --http 127.0.0.1:4318")
    file_bytes = parse_size("--max-bytes", max_bytes)
    queue_bytes = parse_size("--max-queue-bytes", max_queue_bytes)
    payload_bytes = (min(DEFAULT_MAX_PAYLOAD, queue_bytes) if max_payload_bytes is None
                     else parse_size("--max-payload-bytes", max_payload_bytes))
    if payload_bytes > queue_bytes:
        raise UsageError(f"--max-payload-bytes ({payload_bytes}) is over --max-queue-bytes "
                         f"({queue_bytes}): such a payload could never be queued",
                         hint="raise --max-queue-bytes or lower --max-payload-bytes")
    if duration is not None and duration < 0:
        raise UsageError(f"--duration must be >= 0, got {duration}", hint="e.g. --duration 60")
    from kvprof.inputs import option_number
    from kvprof.outputs import check_output

    option_number(duration, "--duration", strict=False)  # nan would wait forever
    check_output(output, "--output", want="dir")  # a file, a path under one, read-only
    if ready_file is not None:
        check_output(ready_file, "--ready-file")
        ready_file.unlink(missing_ok=True)  # a stale one would hand a script the old ports
    try:
        output.mkdir(parents=True, exist_ok=True)
        if not os.access(output, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise UsageError(f"cannot write to --output {output}: {exc.strerror or exc}",
                         hint="pass a writable directory, e.g. --output out/traces/received"
                         ) from None
    _configure_logging()
    # gRPC's C core would print its own lines (a failed bind) beside our Error:/Hint: ones;
    # set GRPC_VERBOSITY to see them.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")

    from kvprof.receiver.intake import Intake
    from kvprof.receiver.queue import PayloadQueue
    from kvprof.receiver.stats import ReceiverStats
    from kvprof.receiver.store import JsonlFileSeries, StoreWriter

    stop = threading.Event()
    why = {"text": f"--duration {duration:g} s elapsed" if duration is not None else ""}

    def on_signal(signum: int, _frame: Any) -> None:
        if not stop.is_set():
            why["text"] = signal.Signals(signum).name
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    stats = ReceiverStats()
    queue = PayloadQueue(queue_bytes)
    series = JsonlFileSeries(output, f"received-{os.getpid()}", file_bytes)
    writer = StoreWriter(queue, series, stats)
    intake = Intake(queue, stats, writer, payload_bytes)
    servers: list[Any] = []
    writer.start()
    try:
        _start_servers(servers, intake, stats, grpc_addr, http_addr)
        bound = {kind: s.address for kind, s in servers}
        if ready_file is not None:
            _write_ready_file(ready_file, {
                "pid": os.getpid(), "grpc": bound.get("grpc"), "http": bound.get("http"),
                "http_traces_url": (f"http://{bound['http']}/v1/traces"
                                    if "http" in bound else None),
                "output": str(output.resolve()),
            })
        where = ", ".join(f"OTLP/gRPC on {addr}" if kind == "grpc"
                          else f"OTLP/HTTP on http://{addr}/v1/traces"
                          for kind, addr in bound.items())
        log.info("kvprof traces receive: %s -> %s/received-%d-NNNN.jsonl (new file every %s, "
                 "queue %s, payloads up to %s); %s", where, output, os.getpid(),
                 _mib(file_bytes), _mib(queue_bytes), _mib(payload_bytes),
                 f"stops after {duration:g} s" if duration is not None
                 else "Ctrl-C or SIGTERM stops")
        stop.wait(duration)
    finally:
        # Stop accepting, let requests in hand finish, then let the writer drain the queue.
        for _kind, server in servers:
            server.stop(SHUTDOWN_GRACE_S)
        queue.close()
        writer.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)
    summary = stats.as_dict()
    summary["output"] = str(output)
    summary["files"] = [str(p) for p in series.files]
    summary["queue_peak_bytes"] = queue.peak
    log.info("%s", stats.summary_line(str(output), why["text"] or "stopped"))
    if json_out:
        sys.stdout.write(json.dumps(summary) + "\n")
        sys.stdout.flush()
    if stats.spans_lost:
        from kvprof.errors import KvprofError

        raise KvprofError(
            f"{stats.spans_lost} received span(s) could not be written under {output} "
            f"({writer.last_error or 'write error'}); the senders were told to retry",
            hint="Free space on that filesystem (df -h) or pass another --output.")
    return summary


def _start_servers(servers: list, intake: Any, stats: Any, grpc_addr: tuple[str, int] | None,
                   http_addr: tuple[str, int] | None) -> None:
    from kvprof.receiver.server_grpc import OtlpGrpcServer
    from kvprof.receiver.server_http import OtlpHttpServer

    for kind, addr, cls in (("grpc", grpc_addr, OtlpGrpcServer),
                            ("http", http_addr, OtlpHttpServer)):
        if addr is None:
            continue
        server = cls(intake, stats, *addr)
        try:
            server.start()
        except OSError as exc:
            shown = f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
            raise ResourceAbsentError(
                f"cannot listen for OTLP/{kind} on {shown}: {exc.strerror or exc}",
                hint=f"another collector (Jaeger, an OTel Collector) may hold the port: pick "
                f"another with --{kind} HOST:PORT (port 0 picks a free one), or --{kind} off",
            ) from None
        servers.append((kind, server))
