"""Placement: cgroup PID -> pod, kubelet pod-resources over real gRPC, Kubernetes API faults."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from collect_paths import A100_UUID, K8S, T4_UUID

from kvprof import semconv
from kvprof.collectors.cgroup import parse_cgroup
from kvprof.collectors.kubeapi import KubeApiUnavailable, KubePodSource
from kvprof.collectors.placement import PlacementSampler, role_of
from kvprof.collectors.podresources.client import (
    PodResourcesUnavailable,
    list_container_devices,
)
from kvprof.collectors.topology import gpu_topology, normalise_bus_id

SPEC = json.loads((K8S / "elastic_apm_container_metadata_discovery.json").read_text())
NODE = "gke-k9s-default-pool-0fa2fb89-lbtf"
P1_UID = "91bb1cf2-2c03-11ea-883f-42010a800044"


@pytest.mark.parametrize("case", sorted(SPEC))
def test_cgroup_pod_uid_v1_and_v2(case):
    lines = SPEC[case]["files"].get("/proc/self/cgroup")
    if lines is None:
        pytest.skip("case has only mountinfo (a container looking at itself)")
    ident = parse_cgroup("\n".join(lines) + "\n")
    assert ident.pod_uid == SPEC[case]["podId"]
    if SPEC[case]["podId"]:  # Kubernetes cases: the container id is in the same path
        assert ident.container_id == SPEC[case]["containerId"]


def test_kubelet_list_over_real_grpc(kubelet_socket):
    rows = list_container_devices(kubelet_socket)
    gpus = {(r.pod, r.container, r.device_id) for r in rows if r.resource_name == "nvidia.com/gpu"}
    assert gpus == {("nginx-7fb78fb6d8-2w75j", "nginx", T4_UUID), ("sleep", "sleep", A100_UUID)}


def test_kubelet_socket_absent(tmp_path):
    with pytest.raises(PodResourcesUnavailable, match="socket absent"):
        list_container_devices(tmp_path / "nope.sock")
    sampler = PlacementSampler(kubelet_socket=tmp_path / "nope.sock", sysfs=tmp_path,
                               node=NODE, pod_source=None)
    result = sampler.sample()
    assert any(n.entity == "kubelet" and "socket absent" in n.reason for n in result.no_data)


def test_kubelet_socket_not_answering(tmp_path):
    import socket

    path = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))  # exists, nobody listens
    try:
        with pytest.raises(PodResourcesUnavailable, match="List failed: UNAVAILABLE"):
            list_container_devices(path, timeout_s=1.0)
    finally:
        s.close()


def test_kube_api_pod_list(api_server):
    server = api_server(200)
    pods = server.pod_source().pods_on_node(NODE)
    assert {p.name for p in pods} == {"nginx-7fb78fb6d8-2w75j", "sleep"}
    assert "fieldSelector=spec.nodeName" in server.requests[0]
    nginx = next(p for p in pods if p.name.startswith("nginx"))
    assert nginx.uid == P1_UID and nginx.labels["app"] == "nginx"


@pytest.mark.parametrize("status,needle", [(403, "403"), (500, "500")])
def test_kube_api_errors(api_server, status, needle):
    source = api_server(status).pod_source()
    with pytest.raises(KubeApiUnavailable, match=needle) as err:
        source.pods_on_node(NODE)
    if status == 403:
        assert "get/list/watch on pods" in str(err.value)


def test_kube_api_timeout(api_server):
    source = api_server(200, delay_s=2.0).pod_source(timeout_s=0.3)
    with pytest.raises(KubeApiUnavailable, match="timeout"):
        source.pods_on_node(NODE)


def test_not_in_cluster(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeApiUnavailable, match="not running in a Kubernetes pod"):
        KubePodSource().pods_on_node(NODE)


def test_placement_joins_kubelet_api_and_processes(kubelet_socket, api_server, tmp_path):
    proc = tmp_path / "proc"
    (proc / "5762").mkdir(parents=True)
    # cgroup v1, cgroupfs driver: the pod of the recorded nginx pod (p1.json)
    (proc / "5762" / "cgroup").write_text(
        f"12:memory:/kubepods/besteffort/pod{P1_UID}/" + "a" * 64 + "\n")
    sampler = PlacementSampler(kubelet_socket=kubelet_socket, proc=proc, sysfs=tmp_path,
                               node=NODE, pod_source=api_server(200).pod_source(),
                               gpu_pids=lambda: {T4_UUID: [5762, 999999]})
    result = sampler.sample()
    records = [s.labels for s in result.samples if s.metric == semconv.METRIC_PLACEMENT_INFO]
    kubelet = {r["gpu_uuid"]: r for r in records if r["source"] == "kubelet"}
    assert set(kubelet) == {T4_UUID, A100_UUID}  # example.com/fpga filtered out
    assert kubelet[T4_UUID]["pod"] == "nginx-7fb78fb6d8-2w75j"
    assert kubelet[T4_UUID]["pod_uid"] == P1_UID and kubelet[T4_UUID]["node"] == NODE
    (process,) = [r for r in records if r["source"] == "process"]
    assert (process["pod"], process["pid"], process["gpu_uuid"]) == (
        "nginx-7fb78fb6d8-2w75j", "5762", T4_UUID)
    assert any(n.entity == "pid999999" for n in result.no_data)
    assert result.changed
    assert not sampler.sample().changed  # the same placement again is not a new record


def test_placement_api_forbidden_still_reports_kubelet(kubelet_socket, api_server, tmp_path):
    sampler = PlacementSampler(kubelet_socket=kubelet_socket, sysfs=tmp_path, node=NODE,
                               pod_source=api_server(403).pod_source())
    result = sampler.sample()
    pods = {s.labels["pod"] for s in result.samples}
    assert pods == {"nginx-7fb78fb6d8-2w75j", "sleep"}
    assert any(n.entity == "kubernetes" and "403" in n.reason for n in result.no_data)


def test_role_from_labels_then_name():
    assert role_of("x", {"nvidia.com/dynamo-sub-component-type": "prefill"}) == "prefill"
    assert role_of("qwen32b-disagg-vllmdecodeworker-7c9f", {}) == "decode"
    assert role_of("nginx", {"app": "nginx"}) == ""


def _pci_device(sysfs, chain, vendor, klass, numa):
    devdir = sysfs / "devices" / chain
    devdir.mkdir(parents=True)
    (devdir / "vendor").write_text(vendor + "\n")
    (devdir / "class").write_text(klass + "\n")
    (devdir / "numa_node").write_text(f"{numa}\n")
    link = sysfs / "bus" / "pci" / "devices" / chain.rsplit("/", 1)[1]
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(devdir, link)
    return devdir


def test_topology_numa_and_closest_ib(tmp_path):
    sysfs = tmp_path / "sys"
    # GPU 0 and mlx5_0 under one PCIe switch on root complex 0; GPU 1 alone on root 1,
    # sharing only NUMA node 1 with mlx5_1 (on root 2).
    _pci_device(sysfs, "pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0/0000:03:00.0",
                "0x10de", "0x030200", 0)
    _pci_device(sysfs, "pci0000:40/0000:40:01.0/0000:41:00.0", "0x10de", "0x030200", 1)
    ib0 = _pci_device(sysfs, "pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:01.0/0000:04:00.0",
                      "0x15b3", "0x020700", 0)
    ib1 = _pci_device(sysfs, "pci0000:80/0000:80:01.0/0000:81:00.0", "0x15b3", "0x020700", 1)
    for name, dev in (("mlx5_0", ib0), ("mlx5_1", ib1)):
        (sysfs / "class" / "infiniband" / name).mkdir(parents=True)
        os.symlink(dev, sysfs / "class" / "infiniband" / name / "device")
    topo = {t.pci_bus_id: t for t in gpu_topology(sysfs)}
    assert set(topo) == {"0000:03:00.0", "0000:41:00.0"}  # the NICs are not GPUs
    assert topo["0000:03:00.0"].closest_ib == ("mlx5_0",)
    assert topo["0000:03:00.0"].ib_affinity == "pcie-switch"
    assert topo["0000:41:00.0"].numa_node == 1
    assert topo["0000:41:00.0"].closest_ib == ("mlx5_1",)
    assert topo["0000:41:00.0"].ib_affinity == "numa"
    assert normalise_bus_id("00000000:03:00.0") == "0000:03:00.0"


def test_podresources_stubs_carry_no_runtime_version_pin():
    # Generated by grpcio-tools 1.62.3 (see podresources/__init__.py) so that they import on
    # protobuf >= 4.25 / grpcio >= 1.62, the versions vLLM images pin; a regeneration with a
    # newer generator would add a check that fails there at import time.
    from kvprof.collectors import podresources

    folder = Path(podresources.__file__).parent
    assert "ValidateProtobufRuntimeVersion" not in (folder / "api_pb2.py").read_text()
    assert "GRPC_GENERATED_VERSION" not in (folder / "api_pb2_grpc.py").read_text()
    assert "grpcio-tools==1.62.3" in podresources.__doc__
