"""Link utilisation per transfer window on the golden scenario's collector samples."""

from __future__ import annotations

import pytest

from kvprof.analysis.breakdown import build_breakdown
from kvprof.analysis.links import link_timeline, transfer_links
from kvprof.analysis.loaders.samples import load_samples


@pytest.fixture(scope="module")
def links(golden, golden_spans):
    bd = build_breakdown(golden_spans.spans)
    return transfer_links(bd, golden_spans.spans, load_samples(golden.samples).samples), bd


def test_counters_show_which_link_carried_each_transfer(links):
    table, _ = links
    assert len(table) == 24
    assert (table["path"] == table["kv_path"]).all() and not table["path_mismatch"].any()
    tcp = table[table["path"] == "tcp"]
    assert set(tcp["pair"]) == {"prefill-1 -> decode-3"} and set(tcp["entity"]) == {"eth0"}
    ib = table[table["path"] == "infiniband"]
    assert set(ib["entity"]) == {"mlx5_0/1"} and len(ib) == 18


def test_bytes_and_rates_in_each_window(links):
    table, _ = links
    ib = table[table["path"] == "infiniband"]
    # kv.bytes over 20 ms = 26.2 GB/s; the counters (5 ms samples) see those bytes up to the
    # sampling resolution, against the 50 GB/s port rate the collector reported.
    assert ib["achieved_gbps"].to_numpy() == pytest.approx(26.2144)
    assert (ib["link_bytes"] / 524_288_000).to_numpy() == pytest.approx(1.0, abs=0.25)
    assert (ib["link_rate_gbps"] == 50.0).all() and (ib["rate_source"] == "collector").all()
    tcp = table[table["path"] == "tcp"]
    assert (tcp["link_bytes"] / 524_288_000).to_numpy() == pytest.approx(1.0, abs=0.02)
    # No NIC speed in the samples: the rate is nominal and labelled so.
    assert (tcp["rate_source"] == "nominal").all()


def test_timeline_has_traffic_only_where_transfers_ran(golden, links):
    _, bd = links
    tl = link_timeline(load_samples(golden.samples).samples, bd.skew.offsets_ns)
    assert set(tl["entity"]) == {"mlx5_0/1", "eth0"}
    peak = tl.groupby("entity")["gbps"].max()
    assert peak["mlx5_0/1"] == pytest.approx(26.2144, rel=0.05)
    assert peak["eth0"] == pytest.approx(1.2483, rel=0.05)
