"""The what-if simulator against closed-form queueing results and its own invariants."""

from __future__ import annotations

import statistics
from dataclasses import replace

import pytest

from kvprof.analysis.whatif.simulate import (
    AGGREGATED,
    DECODE,
    PREFILL,
    Deployment,
    Link,
    Load,
    Overheads,
    Simulator,
    StepCost,
    WorkerGroup,
)
from kvprof.errors import UsageError


def _single_server(service_ms: float, isl: int = 100) -> Deployment:
    # Prefill is the whole job (osl 1): one deterministic server, one request per step.
    cost = StepCost(0.0, per_prefill_token_ms=service_ms / isl)
    return Deployment((WorkerGroup(AGGREGATED, 1, cost, max_batch=1, token_budget=isl),))


def test_closed_loop_single_server_response_time_is_users_times_service():
    # Closed network, one deterministic server: throughput 1/s, Little's law R = C*s; the
    # first C requests see s, 2s, ..., C*s.
    c, s = 4, 10.0
    res = Simulator(_single_server(s)).run(Load(c, 40, (100,), (1,)))
    ttft = [r.ttft_ms for r in sorted(res.requests, key=lambda r: r.sent_ms)]
    assert ttft[:c] == pytest.approx([s * (i + 1) for i in range(c)])
    assert ttft[c:] == pytest.approx([c * s] * (40 - c))
    assert res.duration_ms == pytest.approx(40 * s)
    assert res.busy_fraction["aggregated[0]"] == pytest.approx(1.0)


def test_poisson_arrivals_match_pollaczek_khinchine():
    # M/D/1: mean wait = rho*s / (2(1-rho)); TTFT = wait + s.
    s, rho = 10.0, 0.7
    rate = rho / (s / 1e3)
    load = Load(1, 40000, (100,), (1,), arrival_rate_per_s=rate)
    res = Simulator(_single_server(s), seed=3).run(load)
    expected = s + rho * s / (2 * (1 - rho))
    assert statistics.fmean(res.ttft()) == pytest.approx(expected, rel=0.05)


def test_decode_batch_sets_inter_token_time():
    # C users on one decode worker: once all are running every step decodes C sequences, so
    # a request of osl tokens lasts about osl * (base + per_seq * C).
    base, per_seq, c, osl = 5.0, 1.0, 8, 50
    dep = Deployment((
        WorkerGroup(PREFILL, 1, StepCost(0.0), max_batch=64),
        WorkerGroup(DECODE, 1, StepCost(base, per_decode_seq_ms=per_seq), max_batch=64),
    ))
    res = Simulator(dep).run(Load(c, 200, (10,), (osl,)))
    steady = [r.latency_ms for r in res.requests[50:]]
    assert statistics.fmean(steady) == pytest.approx(osl * (base + per_seq * c), rel=0.1)


def test_max_batch_caps_decode_batch_and_queues_the_rest():
    dep = Deployment((
        WorkerGroup(PREFILL, 1, StepCost(0.0)),
        WorkerGroup(DECODE, 1, StepCost(10.0), max_batch=2),
    ))
    res = Simulator(dep).run(Load(4, 4, (10,), (5,)))
    ttft = sorted(r.ttft_ms for r in res.requests)
    # Two start at once (first token after one step); the other two wait for 5 steps.
    assert ttft == pytest.approx([10.0, 10.0, 60.0, 60.0])


NO_OVERHEADS = Overheads(())


def _disagg(link: Link, overheads: Overheads = NO_OVERHEADS) -> Deployment:
    return Deployment((
        WorkerGroup(PREFILL, 1, StepCost(0.0, per_prefill_token_ms=0.01), max_batch=8,
                    token_budget=100000),
        WorkerGroup(DECODE, 1, StepCost(2.0), max_batch=8),
    ), link=link, overheads=overheads, kv_bytes_per_token=1e6)


def test_link_is_fifo_and_handshake_is_paid_once_per_pair():
    # 1000 tokens * 1 MB at 10 GB/s = 100 ms each; two requests prefilled in one 20 ms step
    # cross the one link one after the other; the first also pays the 50 ms handshake.
    link = Link(10.0, handshake_ms=50.0)
    res = Simulator(_disagg(link)).run(Load(2, 2, (1000,), (1,)))
    ttft = sorted(r.ttft_ms for r in res.requests)
    assert ttft == pytest.approx([20 + 50 + 100 + 2, 20 + 50 + 200 + 2])
    warm = Simulator(_disagg(Link(10.0, handshake_ms=50.0, prewarmed=True)))
    ttft = sorted(r.ttft_ms for r in warm.run(Load(2, 2, (1000,), (1,))).requests)
    assert ttft == pytest.approx([20 + 100 + 2, 20 + 200 + 2])


def test_handshake_state_persists_across_levels():
    sim = Simulator(_disagg(Link(10.0, handshake_ms=50.0)))
    first = sim.run(Load(1, 1, (1000,), (1,))).requests[0].ttft_ms
    second = sim.run(Load(1, 1, (1000,), (1,))).requests[0].ttft_ms
    assert first - second == pytest.approx(50.0)


def test_overheads_add_to_ttft_and_warmup_is_left_out():
    ov = Overheads(((3.0, 4.0, 5.0, 6.0),))
    res = Simulator(_disagg(Link(None), ov)).run(Load(1, 3, (1000,), (1,), warmup=1))
    assert len(res.ttft()) == 3 and len(res.requests) == 4
    # in 3 + prefill 10 + mid 4 + transfer fixed 5 + decode step 2 + out 6
    assert res.ttft() == pytest.approx([30.0] * 3)


def test_aggregated_prefill_stalls_running_decodes():
    # One aggregated engine: a new prompt's prefill joins the running decodes' step, so the
    # step that carries it is long (no chunked prefill) and the first token waits for it.
    cost = StepCost(1.0, per_prefill_token_ms=0.1, per_decode_seq_ms=0.0)
    dep = Deployment((WorkerGroup(AGGREGATED, 1, cost, max_batch=8, token_budget=10000),))
    res = Simulator(dep).run(Load(2, 2, (100,), (3,)))
    ttft = sorted(r.ttft_ms for r in res.requests)
    assert ttft == pytest.approx([21.0, 21.0])  # both prompts in one step: 1 + 0.1*200


@pytest.mark.parametrize("groups, words", [
    ((), "zero workers"),
    ((WorkerGroup(PREFILL, 0, StepCost(1)), WorkerGroup(DECODE, 0, StepCost(1))), "zero workers"),
    ((WorkerGroup(PREFILL, 2, StepCost(1)),), "needs decode workers"),
    ((WorkerGroup(AGGREGATED, 1, StepCost(1)), WorkerGroup(DECODE, 1, StepCost(1))),
     "not both"),
    ((WorkerGroup(AGGREGATED, 1, StepCost(1), max_batch=0),), "must be positive"),
])
def test_impossible_deployments_are_refused(groups, words):
    with pytest.raises(UsageError, match=words):
        Simulator(Deployment(groups))


def test_aggregated_step_costs_its_prefill_and_its_decodes_together():
    # Token budget 101: one 100-token prompt per step. Step 1 (t=0..11) prefills A; step 2
    # decodes A and prefills B together: 1 + 0.1*100 + 0.5*1 = 11.5 ms, so B's first token
    # comes at 22.5 ms.
    cost = StepCost(1.0, per_prefill_token_ms=0.1, per_decode_seq_ms=0.5)
    dep = Deployment((WorkerGroup(AGGREGATED, 1, cost, max_batch=8, token_budget=101),))
    res = Simulator(dep).run(Load(2, 2, (100,), (3,)))
    assert sorted(r.ttft_ms for r in res.requests) == pytest.approx([11.0, 22.5])


def test_step_ratios_scale_the_steps_as_measured():
    # Every step drawn at twice its cost: the closed-loop single server doubles its times;
    # ratios of 1 and 3 average to the same doubling of the mean response time.
    c, s = 4, 10.0
    base = _single_server(s)
    res = Simulator(replace(base, step_ratios=(2.0,))).run(Load(c, 40, (100,), (1,)))
    assert [r.ttft_ms for r in res.requests[c:]] == \
        pytest.approx([2 * c * s] * (40 - c))
    mixed = Simulator(replace(base, step_ratios=(1.0, 3.0)), seed=1).run(
        Load(c, 4000, (100,), (1,)))
    assert mixed.duration_ms == pytest.approx(4000 * 2 * s, rel=0.05)


def test_prefill_holds_kv_blocks_until_the_decode_side_pulled_them():
    # One block of 1000 tokens on the prefill engine: the second prompt waits until the
    # first one's KV has crossed (100 ms fixed transfer), then prefills: a kv.hold stall.
    ov = Overheads(((0.0, 0.0, 100.0, 0.0),))
    groups = (WorkerGroup(PREFILL, 1, StepCost(0.0, per_prefill_token_ms=0.01), max_batch=8,
                          token_budget=100000, kv_blocks=1, block_tokens=1000),
              WorkerGroup(DECODE, 1, StepCost(2.0), max_batch=8))
    res = Simulator(Deployment(groups, Link(None), ov)).run(Load(2, 2, (999,), (1,)))
    assert sorted(r.ttft_ms for r in res.requests) == pytest.approx([111.99, 221.98])
    unbounded = tuple(replace(g, kv_blocks=None) for g in groups)
    res = Simulator(Deployment(unbounded, Link(None), ov)).run(Load(2, 2, (999,), (1,)))
    assert sorted(r.ttft_ms for r in res.requests) == pytest.approx([121.98, 121.98])


def test_simulated_legs_add_up_to_each_requests_ttft():
    # The per-leg prediction (helper 20c): every simulated request's legs (overheads, queues,
    # steps, handshake, link wait, wire) sum to its TTFT, disaggregated and aggregated, with
    # queues forming (8 users on engines of 2 sequences, a slow link, a handshake).
    ov = Overheads(((3.0, 5.0, 7.0, 11.0), (1.0, 2.0, 0.5, 4.0)))
    groups = (WorkerGroup(PREFILL, 1, StepCost(2.0, per_prefill_token_ms=0.1), max_batch=2,
                          token_budget=250),
              WorkerGroup(DECODE, 1, StepCost(30.0, per_decode_seq_ms=10.0), max_batch=2))
    dis = Deployment(groups, Link(1e-4, handshake_ms=40.0), ov, kv_bytes_per_token=10.0)
    agg = Deployment((WorkerGroup(AGGREGATED, 1, StepCost(1.0, 0.1, 1.0), max_batch=2),),
                     overheads=ov)
    for dep, legs in ((dis, {"kv.link_wait", "decode.queue", "prefill.queue"}),
                      (agg, {"aggregated.queue"})):
        res = Simulator(dep, seed=3).run(Load(8, 40, (100, 200), (4,), warmup=2))
        assert len(res.requests) == 42
        for r in res.requests:
            assert sum(r.legs.values()) == pytest.approx(r.ttft_ms)
        for leg in legs:  # the queues the load must form
            assert max(r.legs[leg] for r in res.requests) > 0, leg
