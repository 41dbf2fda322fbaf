"""GPU and process samplers against a fake NVML replaying recorded nvidia-smi values."""

from __future__ import annotations

import pynvml
from collect_paths import A100_UUID, T4_UUID
from fake_nvml import FakeNvml

from kvprof import semconv
from kvprof.collectors.base import ALL_METRICS, WHOLE_COLLECTOR
from kvprof.collectors.nvml import GpuProcessSampler, GpuSampler, NvmlSession


def values(result, metric):
    return {s.labels["uuid"]: s.value for s in result.all_samples() if s.metric == metric}


def test_replays_recorded_values(fixture_gpus):
    fake = FakeNvml(fixture_gpus)
    result = GpuSampler(NvmlSession(fake)).sample()
    # Tesla T4 XML: 0 % util, 1032 / 15360 MiB, 26.78 W, 40 C
    assert values(result, semconv.METRIC_GPU_UTILIZATION)[T4_UUID] == 0.0
    assert values(result, semconv.METRIC_GPU_MEMORY_USED)[T4_UUID] == 1032 * 2**20
    assert values(result, semconv.METRIC_GPU_MEMORY_TOTAL)[T4_UUID] == 15360 * 2**20
    assert values(result, semconv.METRIC_GPU_POWER)[T4_UUID] == 26.78
    assert values(result, semconv.METRIC_GPU_TEMPERATURE)[T4_UUID] == 40.0
    # A100 XML (MIG mode): utilisation "N/A" -> no data with a reason, never 0
    assert A100_UUID not in values(result, semconv.METRIC_GPU_UTILIZATION)
    assert values(result, semconv.METRIC_GPU_POWER)[A100_UUID] == 67.03
    reasons = {(n.entity, n.metric): n.reason for n in result.no_data}
    assert reasons[("gpu1", semconv.METRIC_GPU_UTILIZATION)] == "not supported on this GPU"
    info = [s for s in result.all_samples() if s.metric == semconv.METRIC_GPU_INFO]
    assert {s.labels["pci_bus_id"] for s in info} == {"00000000:00:1E.0", "00000000:01:00.0"}
    assert {s.labels["name"] for s in info} == {"Tesla T4", "NVIDIA A100-SXM4-80GB"}
    assert result.ok


def test_pcie_and_energy_counters_advance(fixture_gpus):
    fake = FakeNvml(fixture_gpus)
    sampler = GpuSampler(NvmlSession(fake))
    sampler.sample()
    fake.advance(2.0)
    result = sampler.sample()
    tx = values(result, semconv.METRIC_GPU_PCIE_TX)
    # A100 recorded tx_util 4000 KB/s -> 8,000,000 bytes after 2 s
    assert tx[A100_UUID] == 8_000_000
    assert values(result, semconv.METRIC_GPU_ENERGY)[T4_UUID] == 26.78 * 2
    counters = {s.metric for s in result.all_samples() if s.counter}
    assert counters == {semconv.METRIC_GPU_PCIE_TX, semconv.METRIC_GPU_PCIE_RX,
                        semconv.METRIC_GPU_ENERGY}


def test_nvml_initialised_lazily_once(fixture_gpus):
    fake = FakeNvml(fixture_gpus)
    session = NvmlSession(fake)
    assert fake.initialised == 0
    sampler = GpuSampler(session)
    for _ in range(3):
        sampler.sample()
    GpuProcessSampler(session).sample()
    assert fake.initialised == 1
    assert fake.calls["nvmlDeviceGetUUID"] == 2  # identity read once per GPU


def test_real_library_absent_is_no_data():
    # The real nvidia-ml-py on a machine without the NVIDIA driver.
    session = NvmlSession()
    result = GpuSampler(session).sample()
    assert result.all_samples() == []
    (nd,) = result.no_data
    assert (nd.entity, nd.metric) == (WHOLE_COLLECTOR, ALL_METRICS)
    assert "NVML library not found" in nd.reason
    assert not result.ok


def test_error_on_one_gpu_keeps_the_others(fixture_gpus):
    fake = FakeNvml(fixture_gpus, errors={(0, "nvmlDeviceGetPowerUsage"):
                                          pynvml.NVML_ERROR_UNKNOWN})
    result = GpuSampler(NvmlSession(fake)).sample()
    assert T4_UUID not in values(result, semconv.METRIC_GPU_POWER)
    assert values(result, semconv.METRIC_GPU_TEMPERATURE)[T4_UUID] == 40.0
    assert values(result, semconv.METRIC_GPU_POWER)[A100_UUID] == 67.03
    assert any(n.entity == "gpu0" and n.metric == semconv.METRIC_GPU_POWER
               and "Unknown" in n.reason for n in result.no_data)


def test_lost_gpu_is_no_data_others_go_on(fixture_gpus):
    fake = FakeNvml(fixture_gpus, lost_gpus={0})
    result = GpuSampler(NvmlSession(fake)).sample()
    assert set(values(result, semconv.METRIC_GPU_MEMORY_USED)) == {A100_UUID}
    assert any(n.entity == "gpu0" and n.metric == ALL_METRICS and "lost" in n.reason
               for n in result.no_data)


def test_init_failure_is_no_data(fixture_gpus):
    fake = FakeNvml(fixture_gpus, init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    result = GpuSampler(NvmlSession(fake)).sample()
    assert result.all_samples() == [] and "Driver Not Loaded" in result.no_data[0].reason


def test_disabled_never_touches_nvml(fixture_gpus):
    fake = FakeNvml(fixture_gpus)
    result = GpuSampler(NvmlSession(fake, disabled="NVML disabled by --no-nvml")).sample()
    assert fake.calls == {} and result.no_data[0].reason == "NVML disabled by --no-nvml"


def test_processes_report_host_pids(fixture_gpus):
    fake = FakeNvml(fixture_gpus)
    sampler = GpuProcessSampler(NvmlSession(fake))
    result = sampler.sample()
    # The T4 XML lists Xorg (type G, pid 675) and python (type C, pid 5762): compute only.
    procs = [s for s in result.all_samples() if s.metric == semconv.METRIC_GPU_PROCESS]
    assert [(s.labels["uuid"], s.labels["pid"]) for s in procs] == [(T4_UUID, "5762")]
    mem = [s for s in result.all_samples() if s.metric == semconv.METRIC_GPU_PROCESS_MEMORY]
    assert mem[0].value == 1005 * 2**20
    assert sampler.pids_by_gpu == {T4_UUID: [5762], A100_UUID: []}


def test_not_supported_is_remembered_and_asked_again_later(fixture_gpus):
    # The MIG-mode A100 (gpu1) answers utilisation "N/A": asked once, reported every tick.
    fake = FakeNvml(fixture_gpus)
    sampler = GpuSampler(NvmlSession(fake))
    results = [sampler.sample() for _ in range(3)]
    assert fake.calls["nvmlDeviceGetUtilizationRates"] == 3 + 1  # T4 every tick, A100 once
    for result in results:
        assert ("gpu1", semconv.METRIC_GPU_UTILIZATION, "not supported on this GPU") in [
            tuple(n) for n in result.no_data]
        assert values(result, semconv.METRIC_GPU_UTILIZATION) == {T4_UUID: 0.0}
    again = FakeNvml(fixture_gpus)
    sampler = GpuSampler(NvmlSession(again))
    sampler.unsupported_retry_s = 0.0  # each retry period over by the next tick
    for _ in range(3):
        sampler.sample()
    assert again.calls["nvmlDeviceGetUtilizationRates"] == 3 + 3
    # a transient error (not "not supported") is never remembered
    flaky = FakeNvml(fixture_gpus, errors={(0, "nvmlDeviceGetPowerUsage"):
                                           pynvml.NVML_ERROR_TIMEOUT})
    sampler = GpuSampler(NvmlSession(flaky))
    sampler.sample()
    sampler.sample()
    assert flaky.calls["nvmlDeviceGetPowerUsage"] == 4
