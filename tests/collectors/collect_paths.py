"""Paths and ids of the recorded fixtures the collector tests use."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "collectors"
T4_XML = FIXTURES / "nvidia" / "telegraf_nvidia_smi_tesla-t4.xml"
A100_XML = FIXTURES / "nvidia" / "telegraf_nvidia_smi_a100-sxm4-v12.xml"
IB_SYSFS = FIXTURES / "sysfs_ib"
K8S = FIXTURES / "k8s"
T4_UUID = "GPU-d37e67a5-91dd-3774-a5cb-99096249601a"
A100_UUID = "GPU-513536b6-7d19-9063-b049-1e69664bb298"
