"""Engine step records and the NIXL transfer split, from hook events to spans to the loader."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pandas as pd
import pytest

from kvprof import semconv as sc
from kvprof.probes import events as ev
from kvprof.probes import hooks
from kvprof.probes.assembler import ProcessFacts, SpanAssembler


class Scheduler:
    """vLLM's Scheduler as the probes see it."""

    def __init__(self):
        self.kv_cache_manager = NS(block_pool=NS(free_block_queue=NS(num_free_blocks=90),
                                                 num_gpu_blocks=100))
        self.out = None

    def get_request_counts(self):
        return 2, 5

    def schedule(self):
        return self.out

    def update_from_output(self, scheduler_output, model_runner_output):
        return {}


IMPLEMENTATIONS = ["c", "python"]


@pytest.fixture(params=IMPLEMENTATIONS)
def step_impl(request, monkeypatch):
    """The step record's two implementations: C (kvprof/probes/_fastrec.c, where built) and
    Python (no compiler at install, or KVPROF_PURE_PYTHON); probes made inside the test use
    the chosen one."""
    if request.param == "c":
        if hooks._c_step_begin is None:
            pytest.skip("kvprof.probes._fastrec with the step record is not built here")
    else:
        monkeypatch.setattr(hooks, "_c_step_begin", None)
        monkeypatch.setattr(hooks, "_c_step_end", None)
    return request.param


def test_each_step_becomes_a_span_with_its_batch(step_impl):
    events = []
    hooks.set_emit(events.append)
    try:
        s = Scheduler()
        schedule = hooks.scheduler_schedule(Scheduler.schedule)
        update = hooks.scheduler_update_from_output(Scheduler.update_from_output)
        s.out = NS(scheduled_new_reqs=[], num_scheduled_tokens={"a": 512, "b": 1, "c": 1},
                   total_num_scheduled_tokens=514, preempted_req_ids={"d"},
                   kv_connector_metadata=NS(reqs_to_recv={"b": 1}))
        so = schedule(s)
        update(s, so, NS(kv_connector_output=NS(finished_recving={"b"})))
        s.out = NS(scheduled_new_reqs=[], num_scheduled_tokens={"b": 1},
                   total_num_scheduled_tokens=1, preempted_req_ids=None,
                   kv_connector_metadata=None)
        so = schedule(s)
        update(s, so, NS(kv_connector_output=None))
    finally:
        hooks.set_emit(None)
        hooks.reset_state()
    steps = [e for e in events if e[0] == ev.STEP]
    assert len(steps) == 2
    spans = SpanAssembler(ProcessFacts(engine_id="eng")).feed(events)
    spans = [x for x in spans if x.name == sc.SPAN_ENGINE_STEP]
    assert len(spans) == 2
    a = {k.removeprefix(sc.STEP_ATTR_PREFIX): v for k, v in spans[0].attributes.items()}
    assert (a["index"], a["prefill_tokens"], a["decode_seqs"], a["num_reqs"], a["tokens"]) == (
        0, 512, 2, 3, 514)
    assert a["request_ids"] == "a,b,c"
    assert (a["preempted"], a["running"], a["waiting"]) == (1, 2, 5)
    assert (a["kv_blocks_free"], a["kv_blocks_total"]) == (90, 100)
    assert (a["kv_loads_started"], a["kv_loads_finished"]) == (1, 1)
    assert a["schedule_ms"] >= 0 and a["execute_ms"] >= 0 and a["output_ms"] >= 0
    b = {k.removeprefix(sc.STEP_ATTR_PREFIX): v for k, v in spans[1].attributes.items()}
    assert b["index"] == 1 and "kv_loads_started" not in b and "kv_loads_finished" not in b

    # The loader reads them back from the span table, one row per step.
    from kvprof.analysis.loaders.steps import load_steps

    rows = []
    for x in spans:
        row = {"name": x.name, "start_ns": x.start_ns, "end_ns": x.end_ns,
               "service": "vllm-decode", "host": "h", "pid": 7.0, "role": "decode"}
        for k, v in x.attributes.items():
            if k.startswith(sc.STEP_ATTR_PREFIX):
                row["step_" + k.removeprefix(sc.STEP_ATTR_PREFIX)] = v
        rows.append(row)
    table = load_steps(pd.DataFrame(rows))
    assert list(table["step"]) == [0, 1]
    assert table["request_ids"].iloc[0] == ["a", "b", "c"]
    assert table["kv_usage"].iloc[0] == pytest.approx(0.1)
    assert table["kv_loads_started"].tolist() == [1, -1]
    assert (table["schedule_end_ns"] <= table["execute_end_ns"]).all()
    assert (table["execute_end_ns"] <= table["end_ns"]).all()


def _step_events(sched, outputs, mro_of) -> list[tuple]:
    """The events of one step per SchedulerOutput in `outputs` through the probes now made."""
    events = []
    hooks.set_emit(events.append)
    try:
        schedule = hooks.scheduler_schedule(type(sched).schedule)
        update = hooks.scheduler_update_from_output(type(sched).update_from_output)
        for out in outputs:
            sched.out = out
            so = schedule(sched)
            update(sched, so, mro_of(out))
        assert not hooks._STEP_START  # every step's start taken back
    finally:
        hooks.set_emit(None)
        hooks.reset_state()
    return events


def _untimed(events):
    """Events with their times (ints from the clock) replaced by their order."""
    out = []
    for e in events:
        if e[0] != ev.STEP:
            out.append(e[:2])  # (kind, request id): the rest are times
            continue
        _, info, t, t_end, so, kvo = e
        assert info is not None and info[0] <= info[1] <= t <= t_end
        out.append((ev.STEP, info[2:], so, kvo))
    return out


def test_the_c_step_record_is_the_python_one():
    """Same events from both implementations (times aside): a scheduler with KV blocks, one
    without (the step's timing alone), a model runner output without kv_connector_output,
    and more outputs than the start-time table keeps (shutdown: never passed back)."""
    if hooks._c_step_begin is None:
        pytest.skip("kvprof.probes._fastrec with the step record is not built here")
    outs = [NS(scheduled_new_reqs=[NS(req_id=f"r{i}")] if i == 1 else [],
               num_scheduled_tokens={f"r{i}": 1}, total_num_scheduled_tokens=1,
               preempted_req_ids=None, kv_connector_metadata=None) for i in range(3)]

    class Bare:  # no kv_cache_manager, no get_request_counts
        out = None

        def schedule(self):
            return self.out

        def update_from_output(self, scheduler_output, model_runner_output):
            return {}

    kvo = NS(finished_recving={"r0"})
    runs = {}
    for impl in IMPLEMENTATIONS:
        saved = hooks._c_step_begin, hooks._c_step_end
        if impl == "python":
            hooks._c_step_begin = hooks._c_step_end = None
        try:
            runs[impl] = (_step_events(Scheduler(), outs, lambda o: NS(kv_connector_output=kvo)),
                          _step_events(Bare(), outs, lambda o: object()))
        finally:
            hooks._c_step_begin, hooks._c_step_end = saved
    for c_events, py_events in zip(runs["c"], runs["python"], strict=True):
        assert _untimed(c_events) == _untimed(py_events)
    with_blocks, bare = (_untimed(x) for x in runs["c"])
    assert with_blocks[0] == (ev.STEP, (2, 5, 90, 100), outs[0], kvo)
    assert (ev.SCHEDULED, "r1") in with_blocks
    assert bare[0] == (ev.STEP, (-1, -1, -1, -1), outs[0], None)
    # Outputs never passed back: the table keeps the last 64, in C as in Python.
    sched = Scheduler()
    for impl in IMPLEMENTATIONS:
        saved = hooks._c_step_begin
        if impl == "python":
            hooks._c_step_begin = None
        try:
            schedule = hooks.scheduler_schedule(Scheduler.schedule)
            kept = []
            for i in range(70):
                sched.out = NS(scheduled_new_reqs=[], i=i)
                kept.append(sched.out)  # alive: distinct ids
                schedule(sched)
            assert list(hooks._STEP_START) == [id(o) for o in kept[-64:]], impl
        finally:
            hooks._c_step_begin = saved
            hooks.reset_state()


def test_no_step_spans_give_an_empty_table_with_every_column():
    from kvprof.analysis.loaders.steps import COLUMNS, load_steps

    table = load_steps(pd.DataFrame({"name": ["kv.transfer"], "start_ns": [1], "end_ns": [2]}))
    assert len(table) == 0 and list(table.columns) == list(COLUMNS)


def _load_events(telemetry: bool, t0: int = 1_000_000_000_000):
    """A KV load of request r1: start at t0, NIXL starts 2 ms later, moves 3 ms, is seen
    done; the worker reports it 4 ms after that. Mono clock = wall - 500 s."""
    off = 500 * 10**9
    out = [(ev.LOAD_START, "r1", t0, 4, "p1", "eng-p", "127.0.0.1", False),
           (ev.XFER_POLL, t0 + 3_000_000, ("r1",))]
    if telemetry:
        start_us = (t0 + 2_000_000 - off) // 1000
        out.append((ev.XFER_TELEMETRY, "r1", t0 + 5_100_000, t0 + 5_100_000 - off, start_us,
                    100, 3000, 4096, 8))
    out.append((ev.LOAD_DONE, "r1", t0 + 9_000_000, True))
    return out


def test_the_transfer_splits_into_post_wire_notice_from_nixl_telemetry():
    a = SpanAssembler(ProcessFacts(bytes_per_block=1024, profile="nixl"))
    spans = a.feed(_load_events(telemetry=True))
    spans += a.flush(10**13, final=True)
    by = {x.name: x for x in spans}
    xfer = by[sc.SPAN_KV_TRANSFER]
    post, wire, notice = by[sc.SPAN_KV_POST], by[sc.SPAN_KV_WIRE], by[sc.SPAN_KV_NOTICE]
    assert post.start_ns == xfer.start_ns and notice.end_ns == xfer.end_ns
    assert post.end_ns == wire.start_ns and wire.end_ns == notice.start_ns
    assert (post.end_ns - post.start_ns) == 2_000_000
    assert (wire.end_ns - wire.start_ns) == 3_000_000
    assert (notice.end_ns - notice.start_ns) == 4_000_000
    for x in (post, wire, notice):
        assert x.parent_id == xfer.span_id and x.trace_id == xfer.trace_id
    # GB/s from the wire alone; NIXL's own bytes; the poll that still saw it in flight.
    assert xfer.attributes[sc.ATTR_KV_GBPS] == pytest.approx(4096 / 3e-3 / 1e9)
    assert wire.attributes["nixl.bytes_transferred"] == 4096
    assert wire.attributes[sc.ATTR_NIXL_POLL_GAP_MS] == pytest.approx(2.0)


def test_without_telemetry_the_split_is_not_made_up():
    a = SpanAssembler(ProcessFacts(bytes_per_block=1024, profile="nixl"))
    spans = a.feed(_load_events(telemetry=False))
    spans += a.flush(10**13, final=True)
    names = {x.name for x in spans}
    assert sc.SPAN_KV_TRANSFER in names
    assert not names & set(sc.TRANSFER_SPLIT_SPANS)


def test_the_telemetry_probe_names_each_handle_by_its_request():
    events = []
    hooks.set_emit(events.append)

    class Worker:
        def __init__(self):
            self._recving_transfers = {"r1": [11], "r2": [12]}
            self.agent = Agent()

        def _pop_done_transfers(self, transfers):
            self.agent.get_xfer_telemetry(11)
            del transfers["r1"]
            return {"r1"}, set()

    class Agent:
        def get_xfer_telemetry(self, handle):
            return NS(startTime=5, postDuration=1, xferDuration=2, totalBytes=64, descCount=2)

    Worker._pop_done_transfers = hooks.nixl_pop_done_transfers(Worker._pop_done_transfers)
    Agent.get_xfer_telemetry = hooks.nixl_get_xfer_telemetry(Agent.get_xfer_telemetry)
    try:
        w = Worker()
        assert w._pop_done_transfers(w._recving_transfers) == ({"r1"}, set())
        w.agent.get_xfer_telemetry(12)  # outside a poll: no owner, nothing recorded
    finally:
        hooks.set_emit(None)
        hooks.reset_state()
    tele = [e for e in events if e[0] == ev.XFER_TELEMETRY]
    assert [(e[1], e[4:]) for e in tele] == [("r1", (5, 1, 2, 64, 2))]
    polls = [e for e in events if e[0] == ev.XFER_POLL]
    assert [p[2] for p in polls] == [("r2",)]


@pytest.mark.parametrize("poll, post_us, gap_ms", [
    (False, 100, 3.0),  # no poll saw it in flight: the whole wire may be the poll wait
    (False, 3000, None),  # done inside the post call: the wire is the bytes alone
])
def test_the_poll_gap_bounds_how_much_of_the_wire_was_the_wait_for_a_poll(poll, post_us,
                                                                          gap_ms):
    events = [e for e in _load_events(telemetry=True) if poll or e[0] != ev.XFER_POLL]
    events = [(*e[:5], post_us, *e[6:]) if e[0] == ev.XFER_TELEMETRY else e for e in events]
    a = SpanAssembler(ProcessFacts(bytes_per_block=1024, profile="nixl"))
    spans = a.feed(events) + a.flush(10**13, final=True)
    wire = next(x for x in spans if x.name == sc.SPAN_KV_WIRE)
    got = wire.attributes.get(sc.ATTR_NIXL_POLL_GAP_MS)
    assert got == (pytest.approx(gap_ms) if gap_ms is not None else None)
