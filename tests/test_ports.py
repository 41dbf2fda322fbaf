"""Ports nothing can take between choice and bind, and the demo watchdog's listener check."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from demo.procs import LISTEN_GRACE_S, ProcessManager  # noqa: E402
from kvprof.ports import ephemeral_range, free_port, listening_ports  # noqa: E402


def test_free_port_is_outside_the_ephemeral_range_and_bindable() -> None:
    lo, hi = ephemeral_range()
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20  # one process never gets the same port twice
    for port in ports:
        assert not lo <= port <= hi
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_free_port_never_returns_a_port_in_use() -> None:
    lo, _ = ephemeral_range()
    held = []
    try:  # occupy a slice of the pool: none of it may come back
        for port in range(10_000, 10_200):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
        taken = {s.getsockname()[1] for s in held}
        assert not taken & {free_port() for _ in range(200)}
    finally:
        for s in held:
            s.close()


def test_ephemeral_range_reads_the_kernel_file(tmp_path: Path) -> None:
    f = tmp_path / "range"
    f.write_text("40000\t50000\n")
    assert ephemeral_range(str(f)) == (40000, 50000)
    assert ephemeral_range(str(tmp_path / "missing")) == (32768, 60999)


def test_listening_ports_sees_a_listener() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert s.getsockname()[1] in listening_ports()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening
        assert s.getsockname()[1] not in listening_ports()


# An "engine" that listens on its side channel, then loses the listener and stays alive (the
# issue: a ZMQ listener thread died, the worker kept answering /health).
LOSES_LISTENER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
print("listening", flush=True); time.sleep(float(sys.argv[2])); s.close()
time.sleep(600)
"""


@pytest.mark.parametrize("keeps", [False, True])
def test_watchdog_stops_an_engine_whose_listener_died(tmp_path: Path, keeps: bool) -> None:
    port = free_port()
    pm = ProcessManager(tmp_path)
    proc = pm.start("engine", [sys.executable, "-c", LOSES_LISTENER, str(port),
                               "600" if keeps else "2"])
    try:
        deadline = time.monotonic() + 30
        while port not in listening_ports() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert port in listening_ports()
        pm.watch(proc, None, [port])
        time.sleep(2 + LISTEN_GRACE_S + 3)  # listener gone at 2 s; seen within a second
        if keeps:
            pm.check()  # a healthy engine is left alone
            assert proc.alive()
        else:
            with pytest.raises(Exception, match=f"nothing listens on its port {port}"):
                pm.check()
    finally:
        pm.unwatch_all()
        pm.stop_all()
