"""Host samplers: real psutil / procfs values from this machine, and a --proc root parameter."""

from __future__ import annotations

import psutil

from kvprof import semconv
from kvprof.collectors.host import HostSampler, NicSampler, parse_net_dev

# /proc/net/dev of a Linux 2.6 host (counters glued to the colon) plus a modern line.
NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:  213970054   56162    0    0    0     0          0         0 213970054   56162    0    0    0     0       0          0
  eth0:1180939863   30221    0    0    0     0          0         0  1315109   14276    0    0    0     0       0          0
ens1f0np0: 98765432109876 1000 0 0 0 0 0 0 12345678901234 2000 0 0 0 0 0 0
"""  # noqa: E501 - the file's real width


def test_real_host_values():
    sampler = HostSampler()
    first = sampler.sample()
    assert any(n.metric == semconv.METRIC_HOST_CPU for n in first.no_data)  # no interval yet
    second = sampler.sample()
    cpu = [s.value for s in second.all_samples() if s.metric == semconv.METRIC_HOST_CPU]
    assert len(cpu) == 1 and 0.0 <= cpu[0] <= 1.0
    total = [s.value for s in second.all_samples()
             if s.metric == semconv.METRIC_HOST_MEMORY_TOTAL]
    assert total == [float(psutil.virtual_memory().total)]


def test_real_nic_values_match_psutil():
    sampler = NicSampler()
    result = sampler.sample()
    after = psutil.net_io_counters(pernic=True)
    rx = {s.entity: s.value for s in result.all_samples() if s.metric == semconv.METRIC_NIC_RX}
    tx = {s.entity: s.value for s in result.all_samples() if s.metric == semconv.METRIC_NIC_TX}
    assert set(rx) == set(tx) == set(after) - {"lo"}
    for nic, counters in after.items():
        if nic != "lo":  # read just before psutil: equal, or a few packets behind
            assert 0 <= counters.bytes_recv - rx[nic] < 10_000_000
            assert 0 <= counters.bytes_sent - tx[nic] < 10_000_000
    assert all(s.counter for s in result.all_samples())
    again = sampler.sample()  # the kept-open descriptor reads fresh values
    assert {s.entity for s in again.all_samples()} == set(rx)
    sampler.close()


def test_net_dev_parsing_and_large_files(tmp_path):
    assert parse_net_dev(NET_DEV) == [("eth0", 1180939863, 1315109),
                                      ("ens1f0np0", 98765432109876, 12345678901234)]
    # A node with hundreds of pod veths: more than one 64 KiB read.
    lines = NET_DEV.splitlines()[:2] + [
        f"veth{i:04x}: {i * 10} 1 0 0 0 0 0 0 {i * 20} 2 0 0 0 0 0 0" + " " * 80
        for i in range(700)]
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "dev").write_text("\n".join(lines) + "\n")
    assert (tmp_path / "net" / "dev").stat().st_size > 64 * 1024
    result = NicSampler(tmp_path).sample()
    rx = {s.entity: s.value for s in result.all_samples() if s.metric == semconv.METRIC_NIC_RX}
    assert len(rx) == 700 and rx["veth02bb"] == 0x2BB * 10


def test_proc_root_is_a_parameter(tmp_path):
    # An empty "procfs" has no /stat, /meminfo, /net/dev: every value is no data, no raise.
    result = HostSampler(tmp_path).sample()
    assert result.all_samples() == []
    assert {n.metric for n in result.no_data} >= {semconv.METRIC_HOST_MEMORY_USED}
    assert psutil.PROCFS_PATH == "/proc"  # restored
    nic = NicSampler(tmp_path).sample()
    assert nic.all_samples() == [] and not nic.ok
    assert "net/dev" in nic.no_data[0].reason
