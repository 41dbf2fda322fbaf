"""Per-process CPU waits: how long each watched process's threads were runnable but not running.

For every watched process the sampler reads, per thread, ``<proc>/<pid>/task/<tid>/schedstat``
(time on a CPU, time waiting on a run queue, in ns) every tick, and at every
SWITCHES_EVERY_SCANS-th full scan the thread's ``nonvoluntary_ctxt_switches`` from its
``status`` when the thread ran since then (a thread that did not run was not preempted).
Threads that neither ran nor waited for ``cold_after_s`` (1 s) are "cold" and read again
only at the next full scan (every ``discover_every_s``): most threads of a serving process
sleep (thread pools, tokenizer and exporter threads), and reading them every tick would
cost the most for nothing. A cold thread that wakes up shows its wait at the next full
scan, at most ``discover_every_s`` late; the counters stay exact. The grace second keeps an
engine's threads hot between requests: a thread that had gone cold after one quiet tick
showed a 250 ms wait up to 2 s late, in another request's legs (issue 19's CPU-hog test).
It emits per process:

* ``kvprof_process_runqueue_wait_seconds`` / ``kvprof_process_cpu_seconds`` /
  ``kvprof_process_nonvoluntary_switches``: counters summed over the process's threads,
  exited threads included (per-thread deltas are accumulated, so the sum never drops);
* ``kvprof_process_thread_runqueue_wait_max_seconds``: the run-queue wait of the thread that
  waited most in the last interval, with its name in label ``thread``. The analysis uses this
  one (kvprof/analysis/cpu_wait.py): threads of one process wait side by side, so their sum
  can exceed the interval, while one thread's wait is time the process lost on one path.
  A thread that was *polling* in the interval is left out of it: one that never slept
  (time on a CPU + time waiting >= POLL_RUNNABLE of the interval) yet ran under
  POLL_SLICE_CPU_NS per time slice, i.e. a loop that yields the core as soon as it gets it
  (vLLM's EngineCore and workers spin on sched_yield for 1 s after each message of their
  shared-memory queues, shm_broadcast.py). Its wait is the others' turn on the core it gave
  away, not work held up: counted, it read every sleep or long step of a process as "CPU
  contention" (issue 19's known-delay tests: a 250 ms sleep showed +228..265 ms of it).
  A wait longer than the interval (plus POLL_TURN_NS) is never polling: the kernel adds a
  wait when the thread gets its core back, and a polling thread's waits are each the length
  of another thread's turn, so only a thread kept off its core for longer than a tick (a
  hog, a real-time task) shows one; the known-delay CPU hog is exactly that. Shorter
  starvation of a thread that polls is lost with the polling (the price of not naming a
  sleep as contention).
  The process sum above keeps every thread's wait.

Which processes: those started under ``kvprof attach`` (their environment carries
``KVPROF_ENABLED=1``, with KVPROF_ROLE and KVPROF_SERVICE_NAME: found in Kubernetes too, from
a DaemonSet with the node's procfs at ``--proc /host/proc``, no hostPID and no shared folder
needed; another user's environ takes CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH), plus
``--watch-pid [ROLE=]PID`` and ``--watch-name [ROLE=]REGEX`` (a regular expression searched
in the command line; the matching process's descendants are watched too, e.g. aiperf's
worker processes). New processes are looked for every ``discover_every_s``; only processes
not seen before have their environ / cmdline read, so discovery costs a directory listing.
Descriptors of the per-thread files stay open and are re-read with pread, as the NIC sampler
does with /proc/net/dev: an open + read + close per thread and tick would not fit the
collector's 1%-of-a-core budget (bench/collector_cost.py measures it).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from time import monotonic_ns

from kvprof import semconv
from kvprof.collectors.base import (
    ALL_METRICS,
    WHOLE_COLLECTOR,
    NoData,
    Sample,
    SampleSet,
    timed_sample,
)
from kvprof.errors import UsageError

log = logging.getLogger("kvprof.collectors")

DISCOVER_EVERY_S = 2.0  # full scans: new processes and threads, cold threads re-read
COLD_AFTER_S = 1.0  # a thread unchanged this long is read only at full scans
SWITCHES_EVERY_SCANS = 3  # involuntary switches: read at every 3rd full scan (6 s)
RELIST_EVERY_SCANS = 10  # a process's thread list: listed again at least every 10th scan
DEFAULT_INTERVAL_S = 0.1
# Polling (see above): measured, a Python sched_yield loop runs 5-13 us per slice; a thread
# doing real work between preemptions runs CFS slices of ~0.75-3 ms, and one that waits for
# messages sleeps between them (runnable well under the whole interval).
POLL_SLICE_CPU_NS = 20_000
POLL_MIN_SLICES = 3
POLL_RUNNABLE = 0.9
# One other thread's turn on the core (a CFS slice, a few ms; 25 ms covers a loaded run
# queue): a polling thread's waits straddle the interval's ends by at most one.
POLL_TURN_NS = 25_000_000
SOURCE_ATTACH = "attach"
SOURCE_PID = "pid"
SOURCE_NAME = "name"
ROLE_CLIENT = "client"
_ENV_MARK = f"{semconv.ENV_ENABLED}=1".encode()
_NIVCSW = b"nonvoluntary_ctxt_switches:"
_ROLE_PREFIX = re.compile(r"^([A-Za-z][\w.-]*)=(.+)$")
_sample_of = tuple.__new__
_M_WAIT, _M_CPU = semconv.METRIC_PROCESS_RUNQUEUE_WAIT, semconv.METRIC_PROCESS_CPU
_M_SWITCHES = semconv.METRIC_PROCESS_NONVOLUNTARY_SWITCHES
_M_WAIT_MAX = semconv.METRIC_PROCESS_THREAD_WAIT_MAX


def parse_schedstat(data: bytes) -> tuple[int, int, int]:
    """``<proc>/<pid>/task/<tid>/schedstat`` -> (ns on a CPU, ns waiting on a run queue,
    time slices run)."""
    cpu, wait, slices = data.split()[:3]
    return int(cpu), int(wait), int(slices)


def parse_nonvoluntary(data: bytes) -> int | None:
    """The ``nonvoluntary_ctxt_switches`` count of a ``status`` file (None if absent)."""
    at = data.rfind(_NIVCSW)
    if at < 0:
        return None
    end = data.find(b"\n", at)
    return int(data[at + len(_NIVCSW):end if end >= 0 else None])


def parse_stat(data: bytes) -> tuple[str, int, int]:
    """``<proc>/<pid>/stat`` -> (comm, ppid, start time in clock ticks). The name sits in
    parentheses and may itself hold spaces and parentheses: split after the last ')'."""
    open_at, close_at = data.find(b"("), data.rfind(b")")
    comm = data[open_at + 1:close_at].decode("utf-8", "replace")
    rest = data[close_at + 2:].split()
    return comm, int(rest[1]), int(rest[19])


def parse_environ(data: bytes) -> dict[str, str] | None:
    """The KVPROF_* variables of a process started under ``kvprof attach`` (else None)."""
    if _ENV_MARK not in data:
        return None
    env = {}
    for item in data.split(b"\0"):
        if item.startswith(b"KVPROF_") or item.startswith(b"OTEL_SERVICE_NAME="):
            key, _, value = item.partition(b"=")
            env[key.decode()] = value.decode("utf-8", "replace")
    return env if env.get(semconv.ENV_ENABLED) == "1" else None


def parse_watch_pid(spec: str) -> tuple[str | None, int]:
    """``[ROLE=]PID`` -> (role, pid)."""
    role, value = _split_role(spec)
    if not value.isdigit() or int(value) <= 0:
        raise UsageError(f"--watch-pid {spec!r} is not [ROLE=]PID",
                         hint="e.g. --watch-pid 4242 or --watch-pid client=4242")
    return role, int(value)


def parse_watch_name(spec: str) -> tuple[str | None, re.Pattern[str]]:
    """``[ROLE=]REGEX`` -> (role, compiled pattern searched in the command line)."""
    role, value = _split_role(spec)
    try:
        return role, re.compile(value)
    except re.error as err:
        raise UsageError(f"--watch-name {spec!r}: not a regular expression ({err})",
                         hint="e.g. --watch-name 'client=aiperf profile'") from None


def _split_role(spec: str) -> tuple[str | None, str]:
    match = _ROLE_PREFIX.match(spec)
    return (match.group(1), match.group(2)) if match else (None, spec)


@dataclass(slots=True)
class _Thread:
    fd: int
    status_fd: int | None
    name: str
    nivcsw: int | None


@dataclass(slots=True)
class _Process:
    pid: int
    start: int
    comm: str
    role: str
    service: str
    source: str
    threads: dict[int, _Thread] = field(default_factory=dict)
    cpu_ns: int = 0
    wait_ns: int = 0
    nivcsw: int = 0
    primed: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    thread_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    # Per thread, in ``tids`` order (rebuilt when threads come or go): the last values
    # read, whether the thread moved at its last read ("hot"), and whether it ran since its
    # status was last read.
    tids: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    cpu: list[int] = field(default_factory=list)
    wait: list[int] = field(default_factory=list)
    slices: list[int] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)  # monotonic ns of the last read
    hot: list[bool] = field(default_factory=list)
    calm: list[int] = field(default_factory=list)  # reads in a row that found no change
    ran: list[bool] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)  # the file as last read
    hot_idx: list[int] = field(default_factory=list)  # positions of the hot threads
    links: int = -1  # st_nlink of <pid>/task at the last listing
    entity: str = ""  # the samples' entity, "pid<pid>"
    scans: int = 0


class SchedstatSampler:
    """Run-queue wait, CPU time and involuntary switches of watched processes, per thread."""

    name = "schedstat"

    def __init__(self, proc: Path | str = "/proc", *, watch_pids: Iterable[str] = (),
                 watch_names: Iterable[str] = (), watch_attach: bool = True,
                 discover_every_s: float = DISCOVER_EVERY_S,
                 interval_s: float = DEFAULT_INTERVAL_S, cold_after_s: float = COLD_AFTER_S):
        self.proc = str(proc)
        self.pids = [parse_watch_pid(s) for s in watch_pids]
        self.names = [parse_watch_name(s) for s in watch_names]
        self.watch_attach = watch_attach
        # Counted in ticks, not seconds: a late tick must not shift the full scans, and the
        # benchmark (ticks back to back) scans as often per tick as a live collector.
        self.scan_every = max(1, round(discover_every_s / interval_s))
        self.cold_after = max(1, round(cold_after_s / interval_s))
        self.procs: dict[int, _Process] = {}
        self._tick = 0
        self._switches = False
        self._decided: dict[int, tuple[str, str, str] | None] = {}  # pid -> (role, service, src)
        self._ppid: dict[int, int] = {}
        self._problem: str | None = None
        self._names: set[str] = set()  # <proc>'s entries at the last full scan
        self._listed: set[int] = set()  # and the pids among them
        self._wanted: set[int] = set()  # pids decided to be watched
        # The collector's own command line names what it watches for (--watch-name aiperf):
        # never watch ourselves when sampling this machine's own procfs.
        self._self = os.getpid() if os.path.realpath(self.proc) == "/proc" else None

    @property
    def watching(self) -> bool:
        return bool(self.watch_attach or self.pids or self.names)

    def sample(self) -> SampleSet:
        return timed_sample(self.name, self._sample)

    # -- discovery ------------------------------------------------------------------------
    def _read(self, *parts: str | int) -> bytes:
        # os.open/os.read, not open(): a file object cost more than the read itself here,
        # and full scans read comm (and new processes' environ, cmdline, stat) this way.
        fd = os.open(os.path.join(self.proc, *map(str, parts)), os.O_RDONLY)
        try:
            data = os.read(fd, 65536)
            if len(data) == 65536:  # a long environ or command line: the rest too
                chunks = [data]
                while chunk := os.read(fd, 65536):
                    chunks.append(chunk)
                data = b"".join(chunks)
            return data
        finally:
            os.close(fd)

    def _decide(self, pid: int, depth: int = 0) -> tuple[str, str, str] | None:
        """Whether ``pid`` is watched, and as what: (role, service, source) or None."""
        if pid in self._decided:
            return self._decided[pid]
        verdict = None
        if pid != self._self:
            for role, wanted in self.pids:
                if wanted == pid:
                    verdict = (role or "watched", "", SOURCE_PID)
            if verdict is None and self.watch_attach:
                try:
                    env = parse_environ(self._read(pid, "environ"))
                except OSError:
                    env = None
                if env is not None:
                    verdict = (env.get(semconv.ENV_ROLE) or "auto",
                               env.get(semconv.ENV_SERVICE_NAME)
                               or env.get("OTEL_SERVICE_NAME", ""), SOURCE_ATTACH)
            if verdict is None and self.names:
                verdict = self._by_name(pid, depth)
        self._decided[pid] = verdict
        return verdict

    def _by_name(self, pid: int, depth: int) -> tuple[str, str, str] | None:
        try:
            cmdline = self._read(pid, "cmdline").replace(b"\0", b" ").decode(
                "utf-8", "replace").strip()
        except OSError:
            return None
        for role, pattern in self.names:
            if cmdline and pattern.search(cmdline):
                return (role or "watched", "", SOURCE_NAME)
        # A descendant of a process watched by name (aiperf's workers).
        ppid = self._ppid.get(pid)
        if ppid is None:
            try:
                ppid = parse_stat(self._read(pid, "stat"))[1]
            except (OSError, ValueError, IndexError):
                return None
            self._ppid[pid] = ppid
        if ppid > 1 and depth < 32:
            parent = self._decide(ppid, depth + 1)
            if parent is not None and parent[2] == SOURCE_NAME:
                return parent
        return None

    def _discover(self) -> None:
        # Set differences against the last listing: only pids new since then (and watched
        # ones not being sampled, e.g. after a failed read) are looked at in Python; a node
        # runs hundreds to thousands of processes, each scan looked at every one.
        try:
            names = set(os.listdir(self.proc))
        except OSError as err:
            self._problem = f"cannot list {self.proc}: {err.strerror or err}"
            return
        self._problem = None
        gone = {int(n) for n in self._names - names if n.isdigit()}
        fresh = {int(n) for n in names - self._names if n.isdigit()}
        self._names = names
        listed = self._listed = (self._listed - gone) | fresh
        # Forget pids that are gone, so a reused pid is looked at afresh.
        for pid in gone:
            self._decided.pop(pid, None)
            self._ppid.pop(pid, None)
            self._wanted.discard(pid)
        for pid in sorted((fresh - self._decided.keys()) | (self._wanted - self.procs.keys())):
            if pid in self.procs:
                continue
            verdict = self._decide(pid)
            if verdict is None:
                continue
            self._wanted.add(pid)
            try:
                comm, _, start = parse_stat(self._read(pid, "stat"))
            except (OSError, ValueError, IndexError):
                continue
            role, service, source = verdict
            labels = {"pid": str(pid), "process": comm, "role": role, "service": service,
                      "source": source}
            self.procs[pid] = _Process(pid, start, comm, role, service, source, labels=labels,
                                       entity=f"pid{pid}")
            log.debug("schedstat: watching pid %d (%s, role %s)", pid, comm, role)
        for pid, p in list(self.procs.items()):
            if pid not in listed:
                self._drop(pid)
            else:
                self._refresh_name(p)
                self._refresh_threads(p)

    def _refresh_name(self, p: _Process) -> None:
        """Processes rename themselves after start (setproctitle: aiperf's "aiperf worker_3"
        began as "python"): follow the kernel's name, for the process and its main thread."""
        try:
            comm = self._read(p.pid, "comm").strip().decode("utf-8", "replace")
        except OSError:
            return
        if comm and comm != p.comm:
            p.comm = comm
            # A new dict: sinks cache a labels dict's JSON by its identity.
            p.labels = {**p.labels, "process": comm}
            p.thread_labels = {}
            main = p.threads.get(p.pid)
            if main is not None:
                main.name = comm

    def _refresh_threads(self, p: _Process) -> None:
        task = os.path.join(self.proc, str(p.pid), "task")
        # procfs gives a task directory 2 + (number of threads) links: a stat tells whether
        # threads came or went at a tenth of a listing's cost; list anyway now and then, in
        # case as many threads started as ended.
        try:
            links = os.stat(task).st_nlink
        except OSError:
            return
        p.scans += 1
        if links == p.links and p.scans % RELIST_EVERY_SCANS:
            return
        try:
            tids = {int(t) for t in os.listdir(task) if t.isdigit()}
        except OSError:
            return
        p.links = links
        for tid in [t for t in p.threads if t not in tids]:
            self._close_thread(p.threads.pop(tid))
        for tid in tids - p.threads.keys():
            base = os.path.join(task, str(tid))
            try:
                fd = os.open(os.path.join(base, "schedstat"), os.O_RDONLY)
            except OSError:
                continue
            try:
                status_fd = os.open(os.path.join(base, "status"), os.O_RDONLY)
            except OSError:
                status_fd = None
            try:
                with open(os.path.join(base, "comm"), "rb") as fh:
                    name = fh.read().strip().decode("utf-8", "replace")
            except OSError:
                name = str(tid)
            p.threads[tid] = _Thread(fd, status_fd, name, 0 if p.primed else None)
        self._rebuild(p)

    @staticmethod
    def _rebuild(p: _Process) -> None:
        """The per-thread lists after threads came or went, values carried over; a thread
        born after the process was first seen counts from zero (its whole history lies
        inside the watch)."""
        tids = sorted(p.threads)
        if tids == p.tids:
            return
        old = {tid: i for i, tid in enumerate(p.tids)}
        keep = [old.get(t, -1) for t in tids]
        p.cpu = [p.cpu[i] if i >= 0 else 0 for i in keep]
        p.wait = [p.wait[i] if i >= 0 else 0 for i in keep]
        p.slices = [p.slices[i] if i >= 0 else 0 for i in keep]
        p.seen = [p.seen[i] if i >= 0 else 0 for i in keep]
        p.hot = [p.hot[i] if i >= 0 else True for i in keep]
        p.calm = [p.calm[i] if i >= 0 else 0 for i in keep]
        p.ran = [p.ran[i] if i >= 0 else True for i in keep]
        p.raw = [p.raw[i] if i >= 0 else b"" for i in keep]
        p.tids, p.fds = tids, [p.threads[t].fd for t in tids]
        p.hot_idx = [i for i, h in enumerate(p.hot) if h]

    def _drop(self, pid: int) -> None:
        p = self.procs.pop(pid)
        for t in p.threads.values():
            self._close_thread(t)

    @staticmethod
    def _close_thread(t: _Thread) -> None:
        for fd in (t.fd, t.status_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass

    # -- sampling -------------------------------------------------------------------------
    def _sample(self, result: SampleSet) -> None:
        full = self._tick % self.scan_every == 0
        self._switches = full and (self._tick // self.scan_every) % SWITCHES_EVERY_SCANS == 0
        self._tick += 1
        if full:
            self._discover()
        if self._problem:
            result.no_data.append(NoData(WHOLE_COLLECTOR, ALL_METRICS, self._problem))
            return
        if not self.procs:
            result.no_data.append(NoData(WHOLE_COLLECTOR, ALL_METRICS, self._nobody()))
            return
        out = result.samples
        for pid, p in list(self.procs.items()):
            top_wait, top_name = self._read_threads(p, full)
            if not p.threads:
                self._drop(pid)
                continue
            labels, entity = p.labels, p.entity
            # Samples built as tuples (tuple.__new__): NamedTuple's Python-level __new__
            # cost more than half of the emitting, 4 samples per process and tick.
            out.append(_sample_of(Sample, (_M_WAIT, p.wait_ns / 1e9, entity, labels, True)))
            out.append(_sample_of(Sample, (_M_CPU, p.cpu_ns / 1e9, entity, labels, True)))
            out.append(_sample_of(Sample, (_M_SWITCHES, float(p.nivcsw), entity, labels,
                                           True)))
            if p.primed:
                # One labels dict per (process, thread name), reused: sinks cache the
                # labels' JSON by the dict's identity.
                tl = p.thread_labels.get(top_name)
                if tl is None:
                    if len(p.thread_labels) > 256:
                        p.thread_labels.clear()
                    tl = p.thread_labels[top_name] = {**labels, "thread": top_name}
                out.append(_sample_of(Sample, (_M_WAIT_MAX, top_wait / 1e9, entity, tl,
                                               False)))
            p.primed = True
        if not out:
            result.no_data.append(NoData(WHOLE_COLLECTOR, ALL_METRICS, self._nobody()))

    def _read_threads(self, p: _Process, full: bool) -> tuple[int, str]:
        """Read the process's threads (all at a full scan, else the hot ones), add their
        deltas to its counters; returns the largest wait of a thread and its name.

        Plain lists and one loop: the watched sets are small (tens of hot threads per tick),
        where numpy's per-call overhead cost more than the loop, and a thread whose file
        reads as last time is skipped unparsed (bench/collector_cost.py)."""
        hot, raw_l = p.hot, p.raw
        idx = list(range(len(hot))) if full else p.hot_idx
        if not idx:
            return 0, ""
        hot_idx: list[int] = []
        fds, pread = p.fds, os.pread
        cpu_l, wait_l, ran, calm = p.cpu, p.wait, p.ran, p.calm
        slices_l, seen_l, now = p.slices, p.seen, monotonic_ns()
        cold_after = self.cold_after
        top_wait, top_i, d_cpu_sum, d_wait_sum = 0, -1, 0, 0
        gone = []
        for i in idx:
            try:
                raw = pread(fds[i], 128, 0)
            except OSError:
                raw = b""
            if raw == raw_l[i]:
                calm[i] += 1
                if calm[i] < cold_after:
                    hot_idx.append(i)
                else:
                    hot[i] = False
                continue
            calm[i] = 0
            fields = raw.split()  # parse_schedstat, inlined: this loop is the hot path
            if len(fields) < 3:
                gone.append(p.tids[i])  # the thread exited (ESRCH) since the last listing
                continue
            cpu, wait, slices = int(fields[0]), int(fields[1]), int(fields[2])
            raw_l[i] = raw
            hot_idx.append(i)
            d_cpu, d_wait, d_slices = cpu - cpu_l[i], wait - wait_l[i], slices - slices_l[i]
            cpu_l[i], wait_l[i], slices_l[i] = cpu, wait, slices
            elapsed, seen_l[i] = now - seen_l[i], now
            hot[i] = True
            if d_cpu:
                ran[i] = True
            d_cpu_sum += d_cpu
            d_wait_sum += d_wait
            if d_wait > top_wait and not (
                    d_slices >= POLL_MIN_SLICES and d_cpu < d_slices * POLL_SLICE_CPU_NS
                    and d_cpu + d_wait >= POLL_RUNNABLE * elapsed
                    and d_wait <= elapsed + POLL_TURN_NS):
                top_wait, top_i = d_wait, i
        p.cpu_ns += d_cpu_sum
        p.wait_ns += d_wait_sum
        p.hot_idx = hot_idx
        top_name = p.threads[p.tids[top_i]].name if top_i >= 0 else ""
        if self._switches:
            # Switch counts at every few full scans only: the status file costs ~5x
            # schedstat in the kernel, and the counter loses nothing by being read rarely.
            for i in idx:
                t = p.threads.get(p.tids[i])
                if t is None or t.status_fd is None or not (ran[i] or t.nivcsw is None):
                    continue
                ran[i] = False
                try:
                    count = parse_nonvoluntary(os.pread(t.status_fd, 4096, 0))
                except (OSError, ValueError):
                    count = None
                if count is not None:
                    p.nivcsw += count - (t.nivcsw or 0)
                    t.nivcsw = count
        if gone:
            for tid in gone:
                self._close_thread(p.threads.pop(tid))
            self._rebuild(p)  # keeps the survivors' values (and makes every thread hot)
        if not p.primed or top_i < 0:
            return 0, ""
        return top_wait, top_name

    def _nobody(self) -> str:
        if not self.watching:
            return "nothing to watch (--no-watch-attach and no --watch-pid / --watch-name)"
        what = []
        if self.watch_attach:
            what.append("runs under kvprof attach")
        if self.pids:
            what.append("has a --watch-pid")
        if self.names:
            what.append("matches --watch-name")
        return "no watched process: none " + " or ".join(what)

    def close(self) -> None:
        for pid in list(self.procs):
            self._drop(pid)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown: nothing left to do
            pass
