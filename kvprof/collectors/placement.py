"""Placement sampler: which pod/container holds which GPU on this node, and the GPU topology.

Joins three sources, each optional: the kubelet pod-resources API (GPU UUID -> container),
``<proc>/<pid>/cgroup`` of the GPUs' compute processes (PID -> pod UID, for GPUs used without
a device-plugin allocation), and the Kubernetes API (pod UID -> name, namespace, labels).
A record set is marked ``changed`` only when it differs from the previous one, so the Parquet
sink stores placement at start and on every change, each record with its timestamp.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

from kvprof import semconv
from kvprof.collectors.base import ALL_METRICS, NoData, Sample, SampleSet, timed_sample
from kvprof.collectors.cgroup import identity_of_pid
from kvprof.collectors.kubeapi import KubeApiUnavailable, KubePodSource, PodMeta
from kvprof.collectors.podresources.client import (
    GPU_RESOURCE_PREFIX,
    PodResourcesUnavailable,
    list_container_devices,
)
from kvprof.collectors.topology import gpu_topology, normalise_bus_id

# Pod labels that name a worker's role, most specific first (Dynamo operator, then generic).
ROLE_LABELS = (
    "kvprof.role",
    "nvidia.com/dynamo-sub-component-type",
    "nvidia.com/dynamo-component-type",
    "app.kubernetes.io/component",
    "role",
)


def role_of(pod: str, labels: dict[str, str]) -> str:
    """prefill / decode / aggregated / frontend from the pod's labels, else its name."""
    for key in ROLE_LABELS:
        value = labels.get(key, "").lower()
        if value in semconv.ROLES:
            return value
    lowered = pod.lower()
    for role in (semconv.ROLE_PREFILL, semconv.ROLE_DECODE, semconv.ROLE_FRONTEND):
        if role in lowered:
            return role
    return ""


def node_name() -> str:
    """The node this DaemonSet pod runs on (downward API ``NODE_NAME``), else the hostname."""
    return os.environ.get(semconv.ENV_NODE_NAME) or socket.gethostname()


class PlacementSampler:
    """Placement records ``kvprof_placement_info`` and topology ``kvprof_gpu_topology_info``."""

    name = "placement"

    def __init__(
        self,
        *,
        kubelet_socket: Path | str | None,
        proc: Path | str = "/proc",
        sysfs: Path | str = "/sys",
        node: str | None = None,
        pod_source: KubePodSource | None = None,
        gpu_pids: Callable[[], dict[str, list[int]]] | None = None,
        gpu_uuid_by_bus: Callable[[], dict[str, str]] | None = None,
    ):
        self.kubelet_socket = kubelet_socket
        self.proc = proc
        self.sysfs = sysfs
        self.node = node if node is not None else node_name()
        self.pod_source = pod_source
        self.gpu_pids = gpu_pids or dict
        self.gpu_uuid_by_bus = gpu_uuid_by_bus or dict
        self._last: frozenset | None = None

    def sample(self) -> SampleSet:
        result = timed_sample(self.name, self._sample)
        key = frozenset((s.metric, tuple(sorted(s.labels.items()))) for s in result.samples)
        key |= {(n.entity, n.metric, n.reason) for n in result.no_data}
        result.changed = key != self._last
        self._last = key
        return result

    def _pods(self, result: SampleSet) -> dict[str, PodMeta]:
        if self.pod_source is None:
            result.no_data.append(NoData("kubernetes", ALL_METRICS,
                                         "Kubernetes API lookups disabled"))
            return {}
        try:
            return {p.uid: p for p in self.pod_source.pods_on_node(self.node)}
        except KubeApiUnavailable as err:
            result.no_data.append(NoData("kubernetes", ALL_METRICS, str(err)))
            return {}

    def _sample(self, result: SampleSet) -> None:
        pods = self._pods(result)
        by_name = {(p.namespace, p.name): p for p in pods.values()}
        uuid_by_bus = {normalise_bus_id(k): v for k, v in self.gpu_uuid_by_bus().items()}
        self._from_kubelet(result, by_name)
        self._from_processes(result, pods)
        for topo in gpu_topology(self.sysfs):
            labels = {
                "pci_bus_id": topo.pci_bus_id,
                "gpu_uuid": uuid_by_bus.get(topo.pci_bus_id, ""),
                "numa_node": "" if topo.numa_node is None else str(topo.numa_node),
                "closest_ib": ",".join(topo.closest_ib),
                "ib_affinity": topo.ib_affinity,
                "node": self.node,
            }
            result.samples.append(Sample(semconv.METRIC_GPU_TOPOLOGY_INFO, 1.0,
                                         topo.pci_bus_id, labels))

    def _from_kubelet(self, result: SampleSet, by_name: dict[tuple[str, str], PodMeta]) -> None:
        if self.kubelet_socket is None:
            result.no_data.append(NoData("kubelet", ALL_METRICS, "kubelet socket not configured"))
            return
        try:
            rows = list_container_devices(self.kubelet_socket)
        except PodResourcesUnavailable as err:
            result.no_data.append(NoData("kubelet", ALL_METRICS, str(err)))
            return
        for row in rows:
            if not row.resource_name.startswith(GPU_RESOURCE_PREFIX):
                continue
            meta = by_name.get((row.namespace, row.pod))
            labels = {
                "pod": row.pod,
                "namespace": row.namespace,
                "node": self.node,
                "gpu_uuid": row.device_id,
                "role": role_of(row.pod, meta.labels if meta else {}),
                "container": row.container,
                "pod_uid": meta.uid if meta else "",
                "source": "kubelet",
                "pid": "",
            }
            result.samples.append(Sample(semconv.METRIC_PLACEMENT_INFO, 1.0, row.device_id,
                                         labels))

    def _from_processes(self, result: SampleSet, pods: dict[str, PodMeta]) -> None:
        for uuid, pids in sorted(self.gpu_pids().items()):
            for pid in pids:
                ident = identity_of_pid(self.proc, pid)
                if ident is None:
                    result.no_data.append(NoData(f"pid{pid}", semconv.METRIC_PLACEMENT_INFO,
                                                 f"{self.proc}/{pid}/cgroup unreadable "
                                                 "(process gone, or host /proc not mounted)"))
                    continue
                if ident.pod_uid is None:
                    continue  # a host process (e.g. a benchmark run outside Kubernetes)
                meta = pods.get(ident.pod_uid)
                labels = {
                    "pod": meta.name if meta else "",
                    "namespace": meta.namespace if meta else "",
                    "node": self.node,
                    "gpu_uuid": uuid,
                    "role": role_of(meta.name, meta.labels) if meta else "",
                    "container": "",
                    "pod_uid": ident.pod_uid,
                    "source": "process",
                    "pid": str(pid),
                }
                result.samples.append(Sample(semconv.METRIC_PLACEMENT_INFO, 1.0, uuid, labels))
