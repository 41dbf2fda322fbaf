"""Test-only: a CPU hog that takes one core for a known time when asked (issue 19).

``python cpu_hog.py FIFO LOG CORE``: pins itself to CORE, becomes a real-time (SCHED_FIFO)
task, and blocks reading FIFO. Each line read is a number of ms: it then busy-loops that
long on CORE (nothing of normal priority runs there meanwhile) and appends "start_ns end_ns"
(wall clock) to LOG. The decode worker's delay site writes the line after a step's compute,
so the worker stays runnable and waits on the run queue the whole time: a known amount of
CPU contention at a known place. Exits 3 at once when real-time scheduling is not allowed;
exits when its parent dies; one busy loop lasts at most 1 s.
"""

import ctypes
import os
import signal
import sys
import time


def main() -> int:
    fifo, log, core = sys.argv[1], sys.argv[2], int(sys.argv[3])
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    os.sched_setaffinity(0, {core})
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (PermissionError, OSError) as exc:
        print(f"cpu_hog: real-time scheduling not allowed: {exc}", file=sys.stderr)
        return 3
    fd = os.open(fifo, os.O_RDWR)  # RDWR: never EOF when a writer closes
    buf = b""
    with open(log, "a") as out:
        print("ready", file=out, flush=True)
        while True:
            chunk = os.read(fd, 64)
            if not chunk:
                return 0
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                ms = min(float(line or 0), 1000.0)
                t0 = time.time_ns()
                stop = time.monotonic() + ms / 1000
                while time.monotonic() < stop:
                    pass
                print(t0, time.time_ns(), file=out, flush=True)


if __name__ == "__main__":
    sys.exit(main())
