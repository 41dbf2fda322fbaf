"""InfiniBand sampler against the recorded procfs sysfs tree, and every counter-file fault."""

from __future__ import annotations

import pytest

from kvprof import semconv
from kvprof.collectors.infiniband import (
    IbPortSampler,
    IbPortStateSampler,
    SysfsValueError,
    parse_rate_bytes_per_s,
)


def by(result, metric):
    return {s.entity: s.value for s in result.all_samples() if s.metric == metric}


def counters(ib_tree, dev="mlx4_0", port="1"):
    return ib_tree / "class" / "infiniband" / dev / "ports" / port / "counters"


def test_recorded_tree_words_times_four(ib_tree):
    result = IbPortSampler(ib_tree).sample()
    xmit = by(result, semconv.METRIC_IB_XMIT)
    assert set(xmit) == {"hfi1_0/1", "mlx4_0/1", "mlx4_0/2", "mlx5_0/1"}
    assert xmit["mlx4_0/1"] == 26509113295 * 4
    assert by(result, semconv.METRIC_IB_RCV)["mlx5_0/1"] == 18126345378 * 4
    assert by(result, semconv.METRIC_IB_XMIT_PACKETS)["hfi1_0/1"] == 568318856
    assert by(result, semconv.METRIC_IB_XMIT_WAIT)["mlx4_0/1"] == 3599
    assert result.no_data == []


def test_state_rate_errors(ib_tree):
    result = IbPortStateSampler(ib_tree).sample()
    rate = by(result, semconv.METRIC_IB_RATE)
    assert rate["mlx5_0/1"] == 25e9 / 8 and rate["hfi1_0/1"] == 100e9 / 8
    up = [s for s in result.all_samples() if s.metric == semconv.METRIC_IB_UP]
    assert all(s.value == 1.0 for s in up)
    # mlx4_0 port 2's link_layer file has an extra blank line in the fixture
    assert {s.labels["link_layer"] for s in up} == {"InfiniBand"}
    errors = [s for s in result.all_samples() if s.metric == semconv.METRIC_IB_ERRORS]
    assert {s.labels["counter"] for s in errors} >= {"symbol_error", "port_rcv_errors"}
    assert all(s.counter for s in errors)


@pytest.mark.parametrize("text,expected", [
    ("25 Gb/sec (1X EDR)", 3.125e9), ("40 Gb/sec (4X QDR)", 5e9),
    ("2.5 Gb/sec (1X SDR)", 2.5e9 / 8), ("400 Gb/sec (4X NDR)", 50e9),
])
def test_rate_parsing(text, expected):
    assert parse_rate_bytes_per_s(text) == expected


def test_rate_garbage_is_an_error():
    with pytest.raises(SysfsValueError):
        parse_rate_bytes_per_s("fast")


def test_counters_ext_64_preferred(ib_tree):
    ext = counters(ib_tree).parent / "counters_ext"
    ext.mkdir()
    (ext / "port_xmit_data_64").write_text("123456789012\n")
    result = IbPortSampler(ib_tree).sample()
    assert by(result, semconv.METRIC_IB_XMIT)["mlx4_0/1"] == 123456789012 * 4
    assert by(result, semconv.METRIC_IB_RCV)["mlx4_0/1"] == 2221223609 * 4  # legacy file


@pytest.mark.parametrize("fault,reason", [
    (lambda p: p.unlink(), "file missing"),
    (lambda p: p.write_text(""), "file empty"),
    (lambda p: p.write_text("N/A (no PMA)\n"), "not a number"),
])
def test_counter_file_faults(ib_tree, fault, reason):
    fault(counters(ib_tree) / "port_xmit_data")
    result = IbPortSampler(ib_tree).sample()
    assert "mlx4_0/1" not in by(result, semconv.METRIC_IB_XMIT)
    assert by(result, semconv.METRIC_IB_RCV)["mlx4_0/1"] == 2221223609 * 4  # rest goes on
    assert by(result, semconv.METRIC_IB_XMIT)["mlx4_0/2"] == 26540356890 * 4
    (nd,) = result.no_data
    assert nd.entity == "mlx4_0/1" and nd.metric == semconv.METRIC_IB_XMIT
    assert reason in nd.reason


def test_rate_from_two_samples_and_decrease_gives_no_rate(ib_tree):
    path = counters(ib_tree) / "port_xmit_data"
    sampler = IbPortSampler(ib_tree)
    first = sampler.sample()
    assert semconv.METRIC_IB_XMIT_RATE not in {s.metric for s in first.all_samples()}
    path.write_text(str(26509113295 + 250_000_000))  # +1 GB of words
    second = sampler.sample()
    rate = by(second, semconv.METRIC_IB_XMIT_RATE)["mlx4_0/1"]
    elapsed = second.ts - first.ts
    assert rate == pytest.approx(1e9 / elapsed)
    path.write_text("1000")  # reset / 32-bit wrap: the counter went down
    third = sampler.sample()
    assert "mlx4_0/1" not in by(third, semconv.METRIC_IB_XMIT_RATE)
    assert by(third, semconv.METRIC_IB_XMIT)["mlx4_0/1"] == 4000
    assert all(v >= 0 for v in by(third, semconv.METRIC_IB_XMIT_RATE).values())
    path.write_text("2000")
    fourth = sampler.sample()  # rates resume from the new base
    assert by(fourth, semconv.METRIC_IB_XMIT_RATE)["mlx4_0/1"] == pytest.approx(
        4000 / (fourth.ts - third.ts))


def test_no_infiniband_at_all(tmp_path):
    for sampler in (IbPortSampler(tmp_path), IbPortStateSampler(tmp_path)):
        result = sampler.sample()
        assert result.all_samples() == [] and not result.ok
        assert "no InfiniBand/RoCE devices" in result.no_data[0].reason


def test_state_file_garbage(ib_tree):
    (counters(ib_tree).parent / "rate").write_text("garbage")
    (counters(ib_tree) / "symbol_error").write_text("")
    result = IbPortStateSampler(ib_tree).sample()
    reasons = {(n.entity, n.metric): n.reason for n in result.no_data}
    assert "unrecognised rate" in reasons[("mlx4_0/1", semconv.METRIC_IB_RATE)]
    assert "file empty" in reasons[("mlx4_0/1", semconv.METRIC_IB_ERRORS)]
    assert by(result, semconv.METRIC_IB_RATE)["mlx4_0/2"] == 5e9
