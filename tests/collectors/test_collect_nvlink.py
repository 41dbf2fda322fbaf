"""NVLink samplers: batched field values per GPU, KiB -> bytes, state with the far-end bus id
(the 1 Hz state sampler), no-NVLink GPUs."""

from __future__ import annotations

from fake_nvml import FakeNvml, replicate

from kvprof import semconv
from kvprof.collectors.nvlink import NvlinkSampler, NvlinkStateSampler
from kvprof.collectors.nvml import NvmlSession


def test_links_bytes_state_and_remote(fixture_gpus):
    fake = FakeNvml(replicate(fixture_gpus, 8), nvlink_links=18, nvlink_kib_per_s=1000.0)
    sampler = NvlinkSampler(NvmlSession(fake))
    sampler.sample()
    calls_before = fake.calls["nvmlDeviceGetFieldValues"]
    fake.advance(0.5)
    result = sampler.sample()
    # one batched field-values call per GPU per tick (after discovery)
    assert fake.calls["nvmlDeviceGetFieldValues"] - calls_before == 8
    tx = {(s.labels["gpu"], s.labels["link"]): s.value
          for s in result.all_samples() if s.metric == semconv.METRIC_NVLINK_TX}
    assert len(tx) == 8 * 18
    # link 3 of gpu 2: 1000 KiB/s x (3 + 1) x 0.5 s = 2000 KiB = 2,048,000 bytes
    assert tx[("2", "3")] == 2000 * 1024
    assert {s.metric for s in result.all_samples()} == {semconv.METRIC_NVLINK_TX,
                                                        semconv.METRIC_NVLINK_RX}
    assert all(s.counter for s in result.all_samples())
    assert result.no_data == []
    state = NvlinkStateSampler(NvmlSession(fake))
    calls_before = fake.calls["nvmlDeviceGetFieldValues"]
    up = state.sample().all_samples()
    state_calls = fake.calls["nvmlDeviceGetFieldValues"] - calls_before
    assert state_calls == 8 + 8  # discovery (link count) + one batched call per GPU
    assert len(up) == 8 * 18 and {s.metric for s in up} == {semconv.METRIC_NVLINK_UP}
    assert all(s.value == 1.0 and not s.counter for s in up)
    assert {s.labels["remote_pci_bus_id"] for s in up if s.labels["gpu"] == "0"} == {
        f"00000000:{0xC0 + i:02X}:00.0" for i in range(5)}


def test_gpu_without_nvlink_is_no_data(fixture_gpus):
    # The recorded T4 / A100 fixtures carry no NVLink: NVML answers "not supported".
    for cls in (NvlinkSampler, NvlinkStateSampler):
        result = cls(NvmlSession(FakeNvml(fixture_gpus))).sample()
        assert result.all_samples() == []
        assert {n.entity for n in result.no_data} == {"gpu0", "gpu1"}
        assert all("NVLink" in n.reason for n in result.no_data)


def test_one_link_field_error_keeps_the_rest(fixture_gpus):
    import pynvml

    fake = FakeNvml(fixture_gpus[:1], nvlink_links=4, nvlink_kib_per_s=1.0,
                    field_errors={(0, pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX):
                                  pynvml.NVML_ERROR_NOT_SUPPORTED})
    result = NvlinkSampler(NvmlSession(fake)).sample()
    assert len([s for s in result.all_samples() if s.metric == semconv.METRIC_NVLINK_TX]) == 4
    assert len([n for n in result.no_data if n.metric == semconv.METRIC_NVLINK_RX]) == 4
