"""bench/gpu_check.py and tools/gpu_wheels.py without a GPU: the exit-4 line, the check's logic
over a fake NVML that replays recorded nvidia-smi values, the JSON it writes, the wheel list."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from fake_nvml import FakeNvml, parse_nvidia_smi_xml

from kvprof.collectors.base import NoData, Sample, SampleSet

ROOT = Path(__file__).resolve().parents[2]
NVIDIA = ROOT / "tests" / "fixtures" / "collectors" / "nvidia"


def _load(name: str, path: Path):
    sys.path.insert(0, str(path.parent))  # gpu_check imports its neighbour microbench_efficiency
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_wheels = _load("gpu_wheels", ROOT / "tools" / "gpu_wheels.py")


class RealClockNvml(FakeNvml):
    """The recorded GPUs with their counters running on the wall clock (the collector's thread
    reads them in real time, not on the fake's manual clock)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._t0 = time.monotonic()

    def nvmlDeviceGetFieldValues(self, h, field_ids):  # noqa: N802 - pynvml's name
        self.elapsed = time.monotonic() - self._t0
        return super().nvmlDeviceGetFieldValues(h, field_ids)

    def nvmlSystemGetDriverVersion(self):  # noqa: N802
        return "535.54.03"  # the A100 file's driver

    def nvmlDeviceGetClockInfo(self, h, kind):  # noqa: N802
        raise self.NVMLError(3)  # NVML_ERROR_NOT_SUPPORTED: reported as the reason


def _recorded_gpus():
    gpus = (parse_nvidia_smi_xml(NVIDIA / "telegraf_nvidia_smi_a100-sxm4-v12.xml")
            + parse_nvidia_smi_xml(NVIDIA / "telegraf_nvidia_smi_tesla-t4.xml"))
    return [replace(g, index=i) for i, g in enumerate(gpus)]  # one file each: both index 0


def test_without_a_gpu_it_says_so_in_one_line_and_exits_4(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out",
                           str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == gpu_check.EXIT_NO_GPU, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("gpu-check: no NVIDIA GPU here")
    assert "it would run: microbench 4000 tokens" in lines[0] and "--device cpu" in lines[0]
    assert not out.exists()  # nothing half-written


def test_dry_run_over_recorded_gpus_writes_every_phase(tmp_path):
    nvml = RealClockNvml(_recorded_gpus())
    rc = gpu_check.main(["--device", "cpu", "--tokens", "64", "--iters", "1", "--transports",
                         "copy,nonsense", "--hbm-gib", "0.01", "--collect-s", "1.5",
                         "--cost-ticks", "5", "--out", str(tmp_path)], nvml=nvml)
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["schema"] == gpu_check.SCHEMA and doc["dry_run"] is True
    phases = doc["phases"]
    for name in ("environment", "microbench", "efficiency", "hbm", "pcie", "nvml",
                 "collector_cost"):
        assert name in phases, (name, doc["errors"])
    # A transport that cannot run is a finding in its own entry; the other one still ran.
    assert rc == 0 and not doc["errors"]
    assert "error" in phases["microbench"]["nonsense"]
    copy = phases["microbench"]["copy"]
    assert copy["bytes_verified"] and copy["bytes"] == 64 * 131072
    assert phases["efficiency"]["bytes_verified"] and phases["hbm"]["bytes_verified"]
    env = phases["environment"]["nvml"]
    assert env["driver"] == "535.54.03"
    assert env["gpus"][0]["name"] == "NVIDIA A100-SXM4-80GB"
    assert env["gpus"][0]["sm_clock_mhz"].startswith("n/a:")  # the driver's reason, kept

    nv = phases["nvml"]
    present = nv["fields_present"]
    # The T4 recorded its utilisation; the A100 in MIG mode answered "N/A": absent, with why.
    assert "kvprof_gpu_utilization_ratio{gpu1}" in present
    absent = {(a["metric"], a["entity"]): a["reason"] for a in nv["fields_absent"]}
    assert ("kvprof_gpu_utilization_ratio", "gpu0") in absent
    assert absent[("kvprof_gpu_utilization_ratio", "gpu0")]
    # PCIe counters integrate the recorded rates on the wall clock: the mean rate the check
    # computes must come back as the recorded one (unit and rate arithmetic).
    for i, gpu in enumerate(nvml.gpus):
        tx = present[f"kvprof_gpu_pcie_tx_bytes{{gpu{i}}}"]
        assert tx["wraps"] == 0 and tx["unit"] == "B"
        assert tx["mean_rate_per_s"] == pytest.approx(gpu.pcie_tx_bps, rel=0.2, abs=1.0), (
            i, {k: v.get("mean_rate_per_s") for k, v in present.items() if "pcie" in k})
    assert "NVLink" in nv["nvlink"] and not nv["problems"], nv["problems"]
    cost = phases["collector_cost"]
    assert cost["ticks"] == 5 and cost["cpu_ms_per_tick"] > 0
    assert set(cost["wall_ms_per_tick_by_sampler"]) >= {"nvml", "nvlink"}
    text = (tmp_path / "gpu_check.txt").read_text()
    assert "GB/s" in text and "ms CPU per tick" in text and "absent kvprof_gpu_utilization" in text


def _set(collector, ts, samples=(), no_data=()):
    s = SampleSet(collector=collector, ts=ts)
    s.samples.extend(samples)
    s.no_data.extend(no_data)
    return s


def test_sample_summary_flags_wraps_insane_values_and_memory_overflow():
    labels = {"gpu": "0"}
    sets = [
        _set("nvml", 0.0, [Sample("kvprof_gpu_pcie_tx_bytes", 1000.0, "gpu0", labels, True),
                           Sample("kvprof_gpu_power_watts", 250.0, "gpu0", labels),
                           Sample("kvprof_gpu_memory_used_bytes", 90.0, "gpu0", labels),
                           Sample("kvprof_gpu_memory_total_bytes", 80.0, "gpu0", labels)]),
        _set("nvml", 1.0, [Sample("kvprof_gpu_pcie_tx_bytes", 3000.0, "gpu0", labels, True),
                           Sample("kvprof_gpu_power_watts", 5000.0, "gpu0", labels)],
             [NoData("gpu0", "kvprof_gpu_energy_joules", "Not Supported")]),
        _set("nvml", 2.0, [Sample("kvprof_gpu_pcie_tx_bytes", 500.0, "gpu0", labels, True)]),
    ]
    s = gpu_check.summarize_samples(sets)
    tx = s["fields_present"]["kvprof_gpu_pcie_tx_bytes{gpu0}"]
    assert tx["wraps"] == 1 and tx["max_rate_per_s"] == 2000.0
    assert s["fields_absent"] == [{"metric": "kvprof_gpu_energy_joules", "entity": "gpu0",
                                   "reason": "Not Supported"}]
    joined = " | ".join(s["problems"])
    assert "went backwards 1x" in joined and "kvprof_gpu_power_watts" in joined
    assert "memory used 90.0 > total 80.0" in joined
    assert "single GPU has no NVLink peer" in s["nvlink"]


def test_wheel_list_carries_what_the_check_imports_and_the_image_lacks(tmp_path):
    needed = gpu_wheels.needed_distributions()
    names = {gpu_wheels.normalise(n) for n in needed}
    assert {"torch", "nvidia-ml-py", "kvprof"} <= names
    resolved = gpu_wheels.requirement_closure()
    assert "nvidia-ml-py" in resolved and "nixl" not in resolved
    # The device image (recorded list) has torch and nvidia-ml-py: only kvprof's own wheel goes.
    have = gpu_wheels.image_packages(ROOT / "tools" / "gpu_image_packages.txt")
    assert gpu_wheels.to_carry(needed, have, resolved) == []
    # A bare PyTorch image lacks NVML's binding: it must travel; what was imported only
    # because it was installed here (nixl) must not.
    bare = tmp_path / "bare.txt"
    bare.write_text("torch==2.11.0\nnumpy\n# comment\n")
    carry = gpu_wheels.to_carry(needed, gpu_wheels.image_packages(bare), resolved)
    assert "nvidia-ml-py" in carry and not any(c.startswith("nixl") for c in carry)
    assert "torch" not in carry


def test_device_command_fits_the_device_tool():
    cmd = gpu_wheels.device_command()
    assert len(cmd) <= gpu_wheels.COMMAND_LIMIT
    assert "--target /tmp/kvprof-site" in cmd and "bench/gpu_check.py" in cmd
    assert "--no-index" in cmd  # no network there
