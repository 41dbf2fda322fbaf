"""Free TCP ports outside the kernel's ephemeral range, and which ports are listening now.

A port the kernel picked for bind(0) lies in /proc/sys/net/ipv4/ip_local_port_range: the
very range it also hands to every outgoing connection. Between choosing such a port and the
engine binding it, any connect() on the machine (a UCX loopback socket in the engine itself,
once) can take it. A port below that range is never given out on its own, so only another
explicit bind can take it; picking at random among ~20,000 makes that unlikely.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import socket
import threading

_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
_LOW = 10_000  # below: well-known and registered services people run
_handed: set[int] = set()
_lock = threading.Lock()
_rnd = random.SystemRandom()


def ephemeral_range(path: str = _RANGE_FILE) -> tuple[int, int]:
    """The kernel's range for automatically chosen local ports (Linux default 32768-60999)."""
    try:
        with open(path) as fh:
            lo, hi = (int(x) for x in fh.read().split()[:2])
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def _pool(lo: int, hi: int) -> tuple[int, int] | None:
    if lo - _LOW >= 1000:
        return _LOW, lo - 1
    if 65535 - hi >= 1000:
        return hi + 1, 65535
    return None


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody uses now, chosen outside the ephemeral range (kernel's pick otherwise)."""
    pool = _pool(*ephemeral_range())
    if pool is not None:
        with _lock:
            for _ in range(500):
                port = _rnd.randint(*pool)
                if port not in _handed and _bindable(host, port):
                    _handed.add(port)  # never twice to one process (two engines, one port)
                    return port
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def listening_ports(proc_net: str = "/proc/net") -> set[int]:
    """TCP ports with a listening socket on this machine (IPv4 and IPv6), from /proc/net/tcp*."""
    ports: set[int] = set()
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(os.path.join(proc_net, name)) as fh:
            next(fh, None)  # the header
            for line in fh:
                parts = line.split()
                if len(parts) > 3 and parts[3] == "0A":  # TCP_LISTEN
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports
