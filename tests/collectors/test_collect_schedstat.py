"""The schedstat sampler: recorded real procfs files, real processes pinned by taskset, and
`kvprof collect` end to end writing Parquet the CPU-wait loader reads back."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvprof import semconv
from kvprof.collectors import schedstat as ss
from kvprof.errors import UsageError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "collectors" / "proc_schedstat"
ENGINE, CLIENT, CLIENT_CHILD, OTHER = 15832, 15833, 15837, 15834
BUSY_TID = 15836


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    shutil.copytree(FIXTURE, root)
    return root


def _by(result, metric: str) -> dict[int, float]:
    return {int(s.labels["pid"]): s.value for s in result.samples if s.metric == metric}


def _task_sum(root: Path, pid: int, field: int) -> int:
    return sum(int((t / "schedstat").read_text().split()[field])
               for t in (root / str(pid) / "task").iterdir())


def test_parsers_read_the_recorded_files():
    cpu, wait, slices = ss.parse_schedstat((FIXTURE / "15832/task/15836/schedstat").read_bytes())
    assert (cpu, wait, slices) == (420158736, 1659248478, 176)
    status = (FIXTURE / "15832/task/15836/status").read_bytes()
    line = next(x for x in status.decode().splitlines() if x.startswith("nonvoluntary"))
    assert ss.parse_nonvoluntary(status) == int(line.split()[1])
    comm, ppid, start = ss.parse_stat((FIXTURE / f"{CLIENT_CHILD}/stat").read_bytes())
    assert (comm, ppid) == ("python3", CLIENT) and start > 0
    env = ss.parse_environ((FIXTURE / f"{ENGINE}/environ").read_bytes())
    assert env is not None and env[semconv.ENV_ROLE] == "decode"
    assert env[semconv.ENV_SERVICE_NAME] == "vllm-decode"
    assert ss.parse_environ((FIXTURE / f"{OTHER}/environ").read_bytes()) is None
    # A process name with spaces and parentheses: split after the last ')'.
    assert ss.parse_stat(b"7 (a (b) c) S 3 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 99 0")[0:2] \
        == ("a (b) c", 3)


def test_sampler_finds_attach_processes_and_the_client_with_its_children(tmp_path):
    root = _tree(tmp_path)
    sampler = ss.SchedstatSampler(root, watch_names=["client=aiperf[ ]profile"])
    result = sampler.sample()
    assert result.ok and not result.no_data
    waits = _by(result, semconv.METRIC_PROCESS_RUNQUEUE_WAIT)
    assert set(waits) == {ENGINE, CLIENT, CLIENT_CHILD}  # not the unrelated `sleep`
    labels = {int(s.labels["pid"]): s.labels for s in result.samples}
    assert labels[ENGINE] == {"pid": str(ENGINE), "process": "python3", "role": "decode",
                              "service": "vllm-decode", "source": "attach"}
    assert labels[CLIENT]["role"] == labels[CLIENT_CHILD]["role"] == "client"
    assert labels[CLIENT_CHILD]["source"] == "name"
    # Counters are the sums over the threads of the recorded files.
    assert waits[ENGINE] == pytest.approx(_task_sum(root, ENGINE, 1) / 1e9)
    cpu = _by(result, semconv.METRIC_PROCESS_CPU)
    assert cpu[ENGINE] == pytest.approx(_task_sum(root, ENGINE, 0) / 1e9)
    nivcsw = sum(ss.parse_nonvoluntary((t / "status").read_bytes())
                 for t in (root / str(ENGINE) / "task").iterdir())
    assert _by(result, semconv.METRIC_PROCESS_NONVOLUNTARY_SWITCHES)[ENGINE] == nivcsw
    # No interval yet: no top-thread value on the first sight.
    assert not _by(result, semconv.METRIC_PROCESS_THREAD_WAIT_MAX)


def _bump(root: Path, pid: int, tid: int, cpu_ns: int, wait_ns: int, switches: int) -> None:
    task = root / str(pid) / "task" / str(tid)
    c, w, n = ss.parse_schedstat((task / "schedstat").read_bytes())
    # Rewritten in place: the sampler keeps the descriptor open and preads it.
    with open(task / "schedstat", "r+") as fh:
        fh.write(f"{c + cpu_ns} {w + wait_ns} {n + 1}\n")
        fh.truncate()
    status = (task / "status").read_text()
    old = ss.parse_nonvoluntary(status.encode())
    with open(task / "status", "r+") as fh:
        fh.write(status.replace(f"nonvoluntary_ctxt_switches:\t{old}",
                                f"nonvoluntary_ctxt_switches:\t{old + switches}"))
        fh.truncate()


def test_interval_gives_the_thread_that_waited_most_and_counts_switches(tmp_path,
                                                                         monkeypatch):
    root = _tree(tmp_path)
    # A full scan and a switch count every tick (live: every 2 s and every 6 s).
    monkeypatch.setattr(ss, "SWITCHES_EVERY_SCANS", 1)
    sampler = ss.SchedstatSampler(root, discover_every_s=0.1, interval_s=0.1)
    first = sampler.sample()
    _bump(root, ENGINE, BUSY_TID, cpu_ns=10_000_000, wait_ns=50_000_000, switches=3)
    _bump(root, ENGINE, ENGINE, cpu_ns=0, wait_ns=2_000_000, switches=0)
    second = sampler.sample()
    delta = (_by(second, semconv.METRIC_PROCESS_RUNQUEUE_WAIT)[ENGINE]
             - _by(first, semconv.METRIC_PROCESS_RUNQUEUE_WAIT)[ENGINE])
    assert delta == pytest.approx(0.052)
    assert (_by(second, semconv.METRIC_PROCESS_CPU)[ENGINE]
            - _by(first, semconv.METRIC_PROCESS_CPU)[ENGINE]) == pytest.approx(0.010)
    assert (_by(second, semconv.METRIC_PROCESS_NONVOLUNTARY_SWITCHES)[ENGINE]
            - _by(first, semconv.METRIC_PROCESS_NONVOLUNTARY_SWITCHES)[ENGINE]) == 3
    top = next(s for s in second.samples if s.metric == semconv.METRIC_PROCESS_THREAD_WAIT_MAX)
    comm = (root / str(ENGINE) / "task" / str(BUSY_TID) / "comm").read_text().strip()
    assert top.value == pytest.approx(0.050) and top.labels["thread"] == comm


def test_a_thread_that_exits_keeps_the_process_counters_monotonic(tmp_path):
    root = _tree(tmp_path)
    sampler = ss.SchedstatSampler(root, discover_every_s=3600, interval_s=0.1)
    before = _by(sampler.sample(), semconv.METRIC_PROCESS_RUNQUEUE_WAIT)[ENGINE]
    (root / str(ENGINE) / "task" / str(BUSY_TID) / "schedstat").write_text("")  # ESRCH-like
    after = _by(sampler.sample(), semconv.METRIC_PROCESS_RUNQUEUE_WAIT)[ENGINE]
    assert after == pytest.approx(before)
    assert list(sampler.procs[ENGINE].threads) == [ENGINE]


def test_no_data_is_explicit(tmp_path):
    root = _tree(tmp_path)
    nobody = ss.SchedstatSampler(root, watch_attach=False).sample()
    assert not nobody.ok and "nothing to watch" in nobody.no_data[0].reason
    unmatched = ss.SchedstatSampler(root, watch_attach=False,
                                    watch_names=["no-such-program"]).sample()
    assert not unmatched.ok and "matches --watch-name" in unmatched.no_data[0].reason
    missing = ss.SchedstatSampler(tmp_path / "absent").sample()
    assert not missing.ok and "cannot list" in missing.no_data[0].reason


def test_watch_options_are_checked():
    assert ss.parse_watch_pid("client=42") == ("client", 42)
    assert ss.parse_watch_pid("42") == (None, 42)
    assert ss.parse_watch_name("router=demo/router[.]py")[0] == "router"
    with pytest.raises(UsageError):
        ss.parse_watch_pid("client=abc")
    with pytest.raises(UsageError):
        ss.parse_watch_name("client=(")


def _spinner(core: int) -> subprocess.Popen:
    return subprocess.Popen(["taskset", "-c", str(core), sys.executable, "-c",
                             "while True: pass"])


def _schedstat(pid: int) -> tuple[int, int]:
    cpu, wait, _ = ss.parse_schedstat(Path(f"/proc/{pid}/schedstat").read_bytes())
    return cpu, wait


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) not installed")
def test_a_busy_loop_on_the_same_core_shows_as_run_queue_wait():
    """Two always-runnable processes share one core: while the hog runs, the measured one
    waits, so its run-queue wait grows by at least most of the hog's CPU time, and its CPU
    time plus its wait fill the wall time (it never sleeps)."""
    measured = _spinner(0)
    # `sleep`, not a Python: an interpreter still starting up on a loaded machine waits for a
    # core (1.27 s seen at load 17), and that is not the asleep process this checks.
    idle = subprocess.Popen(["sleep", "30"])
    hog = None
    try:
        time.sleep(0.3)
        sampler = ss.SchedstatSampler("/proc", watch_attach=False,
                                      watch_pids=[f"m={measured.pid}", f"idle={idle.pid}"])
        first = sampler.sample()
        hog = _spinner(0)
        time.sleep(0.2)
        hog_cpu0 = _schedstat(hog.pid)[0]
        t0 = time.monotonic()
        first = sampler.sample()
        # Long enough for the hog to run a while, however busy the machine's core 0 is.
        deadline = time.monotonic() + 10
        while (_schedstat(hog.pid)[0] - hog_cpu0 < 0.15e9
               and time.monotonic() < deadline) or time.monotonic() - t0 < 1.0:
            time.sleep(0.25)
        second = sampler.sample()
        wall = time.monotonic() - t0
        hog_cpu = (_schedstat(hog.pid)[0] - hog_cpu0) / 1e9
    finally:
        for p in (measured, idle, hog):
            if p is not None:
                p.kill()
                p.wait()
    wait = {pid: _by(second, semconv.METRIC_PROCESS_RUNQUEUE_WAIT)[pid]
            - _by(first, semconv.METRIC_PROCESS_RUNQUEUE_WAIT)[pid]
            for pid in (measured.pid, idle.pid)}
    cpu = (_by(second, semconv.METRIC_PROCESS_CPU)[measured.pid]
           - _by(first, semconv.METRIC_PROCESS_CPU)[measured.pid])
    if hog_cpu < 0.05:
        pytest.skip(f"core 0 is too busy: the hog ran {hog_cpu * 1e3:.0f} ms in {wall:.1f} s")
    assert wait[measured.pid] >= 0.8 * hog_cpu
    assert cpu + wait[measured.pid] == pytest.approx(wall, rel=0.15)
    assert wait[idle.pid] < 0.05  # asleep: never runnable, never waiting
    top = next(s for s in second.samples if s.metric == semconv.METRIC_PROCESS_THREAD_WAIT_MAX
               and s.labels["pid"] == str(measured.pid))
    assert top.value == pytest.approx(wait[measured.pid], rel=0.01)


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) not installed")
def test_a_thread_polling_with_sched_yield_is_not_the_thread_that_waited():
    """vLLM's engine processes spin on sched_yield between messages: such a thread is runnable
    all the time and gives its core away at once, so its run-queue wait is the other threads'
    turn, not work held up. The process sum keeps it; the thread that waited most (what the
    analysis attributes) leaves it out. A plain busy loop beside the same hog still counts."""
    poller = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c",
                               "import os\nwhile True: os.sched_yield()"])
    busy = _spinner(0)
    hog = None
    try:
        time.sleep(0.3)
        sampler = ss.SchedstatSampler("/proc", watch_attach=False,
                                      watch_pids=[f"p={poller.pid}", f"b={busy.pid}"])
        sampler.sample()
        hog = _spinner(0)
        time.sleep(0.2)
        hog_cpu0 = _schedstat(hog.pid)[0]
        first = sampler.sample()
        t0 = time.monotonic()
        deadline = t0 + 10
        while (_schedstat(hog.pid)[0] - hog_cpu0 < 0.15e9
               and time.monotonic() < deadline) or time.monotonic() - t0 < 1.0:
            time.sleep(0.25)
        second = sampler.sample()
        hog_cpu = (_schedstat(hog.pid)[0] - hog_cpu0) / 1e9
    finally:
        for p in (poller, busy, hog):
            if p is not None:
                p.kill()
                p.wait()
    if hog_cpu < 0.05:
        pytest.skip(f"core 0 is too busy: the hog ran {hog_cpu * 1e3:.0f} ms")
    waited = {pid: _by(second, semconv.METRIC_PROCESS_RUNQUEUE_WAIT)[pid]
              - _by(first, semconv.METRIC_PROCESS_RUNQUEUE_WAIT)[pid]
              for pid in (poller.pid, busy.pid)}
    top = {int(s.labels["pid"]): s.value for s in second.samples
           if s.metric == semconv.METRIC_PROCESS_THREAD_WAIT_MAX}
    assert waited[poller.pid] >= 0.5 * hog_cpu  # it did wait, by the kernel's count
    assert top[poller.pid] < 0.1 * waited[poller.pid]  # polling: not the thread that waited
    assert waited[busy.pid] >= 0.5 * hog_cpu
    assert top[busy.pid] == pytest.approx(waited[busy.pid], rel=0.01)


def test_collect_writes_cpu_waits_to_parquet_and_metrics(tmp_path):
    """`kvprof collect` end to end: a watched busy process's waits in Parquet, read back by
    the CPU-wait loader, interval by interval."""
    from kvprof.analysis.loaders.cpu_waits import load_cpu_waits
    from kvprof.collectors.prometheus_sink import LatestSamplesCollector, render_text

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        out = tmp_path / "samples"
        run = subprocess.run(
            [sys.executable, "-m", "kvprof", "collect", "--no-nvml", "--listen", "",
             "--output", str(out), "--interval", "0.1", "--duration", "3",
             "--no-watch-attach", "--watch-pid", f"client={busy.pid}",
             "--kubelet-socket", str(tmp_path / "none.sock")],
            capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        latest = LatestSamplesCollector()
        latest.update(ss.SchedstatSampler("/proc", watch_attach=False,
                                          watch_pids=[f"client={busy.pid}"]).sample())
        body = render_text(latest).decode()
    finally:
        busy.kill()
        busy.wait()
    waits = load_cpu_waits(out)
    mine = waits[waits["pid"] == busy.pid]
    # Several intervals (on a loaded 2-core machine the collector itself may get few ticks).
    assert len(mine) >= 2, waits
    assert set(mine["role"]) == {"client"} and set(mine["comm"]) == {Path(sys.executable).name[:15]}
    assert (mine["interval_ns"] > 0).all() and (mine["interval_ns"] < 3e9).all()
    assert mine["interval_ns"].sum() == pytest.approx(mine["time_ns"].max() - mine["time_ns"].min()
                                                      + mine["interval_ns"].iloc[0])
    # Always runnable: each interval is CPU time or run-queue wait.
    fill = (mine["cpu_ms"] + mine["runqueue_wait_ms"]) / (mine["interval_ns"] / 1e6)
    assert fill.median() == pytest.approx(1.0, abs=0.2)
    assert (mine["top_thread_wait_ms"] <= mine["runqueue_wait_ms"] + 1e-6).all()
    assert f"{semconv.METRIC_PROCESS_RUNQUEUE_WAIT}_total{{" in body
    assert f'pid="{busy.pid}"' in body and 'role="client"' in body


def test_cold_threads_wait_for_the_full_scan_and_nothing_is_lost(tmp_path):
    root = _tree(tmp_path)
    # Scan 1 in 3; a thread unchanged at one read goes cold.
    sampler = ss.SchedstatSampler(root, discover_every_s=0.3, interval_s=0.1,
                                  cold_after_s=0.1)
    wait = semconv.METRIC_PROCESS_RUNQUEUE_WAIT
    start = _by(sampler.sample(), wait)[ENGINE]  # full scan
    assert _by(sampler.sample(), wait)[ENGINE] == start  # nothing moved: threads go cold
    _bump(root, ENGINE, BUSY_TID, cpu_ns=0, wait_ns=7_000_000, switches=0)
    assert _by(sampler.sample(), wait)[ENGINE] == start  # cold: not read this tick
    assert _by(sampler.sample(), wait)[ENGINE] == pytest.approx(start + 0.007)  # full scan


def test_a_thread_quiet_for_less_than_the_grace_stays_hot_and_its_wait_comes_at_once(
        tmp_path):
    # An engine thread idles between two requests for a few ticks, then waits for a core:
    # the wait must come in the tick it happened, not at the next full scan (2 s later, in
    # another request's legs).
    root = _tree(tmp_path)
    sampler = ss.SchedstatSampler(root, discover_every_s=3600, interval_s=0.1,
                                  cold_after_s=1.0)
    wait = semconv.METRIC_PROCESS_RUNQUEUE_WAIT
    top = semconv.METRIC_PROCESS_THREAD_WAIT_MAX
    start = _by(sampler.sample(), wait)[ENGINE]  # full scan
    for _ in range(5):  # half a second without a change
        assert _by(sampler.sample(), wait)[ENGINE] == start
    _bump(root, ENGINE, BUSY_TID, cpu_ns=1_000_000, wait_ns=250_000_000, switches=0)
    got = sampler.sample()
    assert _by(got, wait)[ENGINE] == pytest.approx(start + 0.250)
    assert _by(got, top)[ENGINE] == pytest.approx(0.250)
    for _ in range(10):  # a second more: now it is cold, and read at full scans only
        sampler.sample()
    _bump(root, ENGINE, BUSY_TID, cpu_ns=0, wait_ns=7_000_000, switches=0)
    assert _by(sampler.sample(), wait)[ENGINE] == pytest.approx(start + 0.250)


def test_a_bad_watch_option_is_one_error_line_and_exit_2():
    run = subprocess.run([sys.executable, "-m", "kvprof", "collect", "--once", "--no-nvml",
                          "--watch-name", "client=("], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    assert run.stderr.startswith("Error: --watch-name 'client=('") and "Hint:" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_process_that_renames_itself_is_followed(tmp_path):
    root = _tree(tmp_path)
    sampler = ss.SchedstatSampler(root, watch_names=["client=aiperf[ ]profile"],
                                  discover_every_s=0.1, interval_s=0.1)
    sampler.sample()
    # aiperf's services call setproctitle after start ("aiperf worker_3").
    (root / str(CLIENT) / "comm").write_text("aiperf worker_3\n")
    names = {int(s.labels["pid"]): s.labels["process"] for s in sampler.sample().samples}
    assert names[CLIENT] == "aiperf worker_3" and names[ENGINE] == "python3"


def test_discovery_finds_new_processes_and_forgets_gone_ones(tmp_path):
    """Full scans look only at pids new since the last listing: a process that appears
    later is found, one that exits is dropped, and its pid reused by another program is
    looked at afresh (not watched when that program is not under kvprof attach)."""
    root = _tree(tmp_path)
    parked = tmp_path / "parked"
    parked.mkdir()
    (root / str(CLIENT_CHILD)).rename(parked / "child")
    sampler = ss.SchedstatSampler(root, watch_names=["client=aiperf[ ]profile"],
                                  discover_every_s=0.1, interval_s=0.1)  # a scan every tick
    wait = semconv.METRIC_PROCESS_RUNQUEUE_WAIT
    assert set(_by(sampler.sample(), wait)) == {ENGINE, CLIENT}
    (parked / "child").rename(root / str(CLIENT_CHILD))  # the client starts a worker
    assert set(_by(sampler.sample(), wait)) == {ENGINE, CLIENT, CLIENT_CHILD}
    (root / str(ENGINE)).rename(parked / "engine")  # the engine exits
    assert set(_by(sampler.sample(), wait)) == {CLIENT, CLIENT_CHILD}
    # Its pid comes back as an unrelated program (no KVPROF_ENABLED in its environment).
    shutil.copytree(root / str(OTHER), root / str(ENGINE))
    assert set(_by(sampler.sample(), wait)) == {CLIENT, CLIENT_CHILD}
    shutil.rmtree(root / str(ENGINE))  # that program exits too
    assert set(_by(sampler.sample(), wait)) == {CLIENT, CLIENT_CHILD}
    (parked / "engine").rename(root / str(ENGINE))  # and the pid comes back as an engine
    assert set(_by(sampler.sample(), wait)) == {ENGINE, CLIENT, CLIENT_CHILD}
