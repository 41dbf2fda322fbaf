"""CPU-wait attribution: a leg gets the run-queue wait of its side's process inside its window."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from kvprof import semconv as sc
from kvprof.analysis import cpu_wait
from kvprof.analysis.loaders.cpu_waits import cpu_waits_from_samples

MS = 1_000_000


def _samples(pid: int, role: str, name: str, ticks: list[tuple[float, float, float]],
             service: str = ""):
    """Collector rows of one process: per tick (t_s, cumulative wait s, top thread wait s)."""
    rows = []
    labels = {"pid": str(pid), "process": name, "role": role, "service": service,
              "source": "pid"}
    for i, (t, cum, top) in enumerate(ticks):
        rows.append((t, sc.METRIC_PROCESS_RUNQUEUE_WAIT, cum, labels))
        rows.append((t, sc.METRIC_PROCESS_CPU, cum / 2, labels))
        rows.append((t, sc.METRIC_PROCESS_NONVOLUNTARY_SWITCHES, float(i), labels))
        if i:
            rows.append((t, sc.METRIC_PROCESS_THREAD_WAIT_MAX, top, {**labels, "thread": "w"}))
    return pd.DataFrame({"ts": [r[0] for r in rows], "node": "n", "collector": "schedstat",
                         "entity": f"pid{pid}", "metric": [r[1] for r in rows],
                         "value": [r[2] for r in rows],
                         "labels": [json.dumps(r[3], sort_keys=True) for r in rows]})


def test_loader_turns_counters_into_intervals():
    waits = cpu_waits_from_samples(_samples(7, "client", "aiperf",
                                            [(100.0, 1.0, 0), (100.1, 1.05, 0.04),
                                             (100.2, 1.05, 0.0)]))
    assert list(waits["interval_ns"]) == pytest.approx([0.1e9, 0.1e9], rel=1e-6)
    assert list(waits["runqueue_wait_ms"]) == pytest.approx([50.0, 0.0])
    assert list(waits["top_thread_wait_ms"]) == pytest.approx([40.0, 0.0])
    assert list(waits["nonvoluntary_switches"]) == [1.0, 1.0]
    assert set(waits["process"]) == {"aiperf"} and set(waits["role"]) == {"client"}


def _windows(legs: list[tuple[str, str, float, float]]) -> pd.DataFrame:
    """(key, side, start ms, end ms) on a clock starting at t=100 s."""
    return pd.DataFrame({
        "key": [x[0] for x in legs], "leg": [f"leg:{x[1]}.x" for x in legs],
        "leg_ms": [x[3] - x[2] for x in legs],
        "start_ns": [100e9 + x[2] * MS for x in legs], "end_ns": [100e9 + x[3] * MS for x in legs],
        "chain": "disaggregated", "side": [x[1] for x in legs]})


def test_a_leg_gets_its_process_wait_pro_rata_of_the_overlap():
    waits = pd.concat([
        # the client waited 80 ms in (100.1, 100.2], nothing before or after
        cpu_waits_from_samples(_samples(7, "client", "aiperf",
                                        [(100.0, 0, 0), (100.1, 0, 0), (100.2, 0.09, 0.08),
                                         (100.3, 0.09, 0.0)])),
        # two decode processes: the EngineCore waited 30 ms in (100.0, 100.1]
        cpu_waits_from_samples(_samples(8, "decode", "api", [(100.0, 0, 0), (100.1, 0, 0)])),
        cpu_waits_from_samples(_samples(9, "decode", "core", [(100.0, 0, 0), (100.1, 0.05,
                                                                                0.03)])),
    ], ignore_index=True)
    att = cpu_wait.attribute(_windows([
        ("r1", "client", 150, 200),   # half of the waiting interval -> 40 ms
        ("r2", "client", 100, 300),   # covers it -> 80 ms
        ("r3", "client", 250, 300),   # after it -> 0
        ("r4", "decode", 50, 100),    # half of the core's interval -> 15 ms, core not api
        ("r5", "client", 100, 105),   # 5 ms leg inside the waiting interval: 4 ms of it
        ("r6", "prefill", 0, 100),    # no prefill process watched: no row
    ]), waits).set_index("key")
    assert att.loc["r1", "wait_ms"] == pytest.approx(40.0)
    assert att.loc["r2", "wait_ms"] == pytest.approx(80.0)
    assert att.loc["r3", "wait_ms"] == pytest.approx(0.0, abs=1e-9)
    assert att.loc["r4", "wait_ms"] == pytest.approx(15.0)
    assert att.loc["r4", "process"] == "core" and att.loc["r4", "pid"] == 9
    assert att.loc["r5", "wait_ms"] == pytest.approx(4.0)  # 80 ms over 100 ms -> 4 of 5 ms
    assert "r6" not in att.index
    assert att.loc["r1", "thread"] == "w" and att.loc["r3", "thread"] == ""
    summary = cpu_wait.summarize(att.reset_index())
    top = summary["legs"][0]
    assert top["leg"] == "client.x" and top["process"] == "aiperf"
    assert top["cause"] == ("CPU contention (process aiperf (pid 7, thread w) waited "
                            f"{top['mean_wait_ms']:.1f} ms for a core)")
    assert summary["processes"][0]["pid"] == 7


def test_a_wait_longer_than_its_interval_lies_before_the_interval_end():
    # The kernel adds a wait to schedstat when the thread gets its core back: a CPU hog took
    # the decode worker's core for 250 ms in (100.0, 100.25], and the collector (20 ms ticks)
    # saw all of it in the tick that ended at 100.26. The leg it delayed ended at 100.252.
    ticks = [(100.0 + 0.02 * i, 0.0, 0.0) for i in range(14)]  # up to 100.26
    ticks[13] = (100.26, 0.25, 0.25)
    waits = cpu_waits_from_samples(_samples(9, "decode", "worker", ticks))
    att = cpu_wait.attribute(_windows([
        ("hit", "decode", -30, 252),   # the leg the hog delayed: nearly all of the wait
        ("next", "decode", 252, 400),  # the next leg: what lay after 100.252 only
    ]), waits).set_index("key")
    assert att.loc["hit", "wait_ms"] == pytest.approx(242.0)
    assert att.loc["next", "wait_ms"] == pytest.approx(8.0)


def test_leg_sides_follow_the_process_that_records_the_leg_end():
    assert cpu_wait.leg_side("client.first") == "client"
    assert cpu_wait.leg_side("router.recv") == "router"
    assert cpu_wait.leg_side("frontend.route.decode") == "router"
    assert cpu_wait.leg_side("prefill.first_token") == "prefill"
    assert cpu_wait.leg_side("kv.serialize.end") == "prefill"
    assert cpu_wait.leg_side("kv.transfer.end") == "decode"
    assert cpu_wait.leg_side("engine.scheduled") == "engine"


def test_leg_windows_come_from_the_breakdown_milestones():
    from kvprof.analysis import legs as lg

    chain = lg.CHAINS["aggregated"]
    n = len(chain)
    times = np.full((1, n), np.nan)
    times[0, 0] = 1000 * MS  # client.send
    first = [j for j, m in enumerate(chain) if m.id == "client.first"][0]
    times[0, first] = 1300 * MS
    req = pd.DataFrame({"key": ["k"], "leg:client.first": [300.0]})
    win = cpu_wait.leg_windows({"aggregated": (np.array(["k"]), times)}, req)
    assert len(win) == 1
    row = win.iloc[0]
    assert (row["start_ns"], row["end_ns"], row["side"]) == (1000 * MS, 1300 * MS, "client")


def test_the_request_own_engine_is_chosen_among_engines_of_one_role():
    waits = pd.concat([
        cpu_waits_from_samples(_samples(8, "decode", "decode-a", [(100.0, 0, 0),
                                                                   (100.1, 0.01, 0.01)])),
        cpu_waits_from_samples(_samples(9, "auto", "dynamo-decode", [(100.0, 0, 0),
                                                                      (100.1, 0.05, 0.05)])),
    ], ignore_index=True)
    windows = _windows([("r1", "decode", 0, 100), ("r2", "decode", 0, 100)])
    # Without span pids: the decode-role process that waited most (the 'auto' one counts as
    # decode by its service name).
    att = cpu_wait.attribute(windows, waits).set_index("key")
    assert list(att["pid"]) == [9, 9] and att.loc["r1", "wait_ms"] == pytest.approx(50.0)
    # r1's spans came from pid 8: its leg is charged to that engine only.
    att = cpu_wait.attribute(windows, waits, {("r1", "decode"): {8, 12345}}).set_index("key")
    assert att.loc["r1", "pid"] == 8 and att.loc["r1", "wait_ms"] == pytest.approx(10.0)
    assert att.loc["r2", "pid"] == 9


def test_a_process_without_spans_of_its_own_is_found_by_its_engine_service_name():
    waits = pd.concat([
        cpu_waits_from_samples(_samples(10, "decode", "python", [(100.0, 0, 0),
                                                                  (100.1, 0.02, 0.02)],
                                        service="vllm-decode")),
        cpu_waits_from_samples(_samples(11, "decode", "python", [(100.0, 0, 0),
                                                                  (100.1, 0.08, 0.08)],
                                        service="vllm-decode-2")),
    ], ignore_index=True)
    windows = _windows([("r1", "decode", 0, 100)])
    # The request's decode spans came from pid 99 (not watched) of service vllm-decode.
    att = cpu_wait.attribute(windows, waits, {("r1", "decode"): {99, "service:vllm-decode"}})
    assert list(att["pid"]) == [10] and att["wait_ms"].iloc[0] == pytest.approx(20.0)
