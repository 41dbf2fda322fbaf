"""List which devices the kubelet gave each container, over its pod-resources unix socket."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Resource names of GPUs handed out by the NVIDIA device plugin (whole GPUs and MIG slices).
GPU_RESOURCE_PREFIX = "nvidia.com/"


class PodResourcesUnavailable(Exception):
    """The kubelet pod-resources API could not be asked; the message is the reason."""


@dataclass(frozen=True, slots=True)
class ContainerDevice:
    """One device id (a GPU UUID for nvidia.com/gpu) assigned to one container."""

    namespace: str
    pod: str
    container: str
    resource_name: str
    device_id: str


def list_container_devices(socket_path: Path | str, timeout_s: float = 2.0
                           ) -> list[ContainerDevice]:
    """Call ``PodResourcesLister.List`` and flatten the answer to one row per device id."""
    import grpc

    from kvprof.collectors.podresources import api_pb2, api_pb2_grpc

    path = Path(socket_path)
    if not path.exists():
        raise PodResourcesUnavailable(
            f"kubelet pod-resources socket absent at {path} "
            "(mount /var/lib/kubelet/pod-resources into the pod)"
        )
    with grpc.insecure_channel(f"unix://{path}") as channel:
        stub = api_pb2_grpc.PodResourcesListerStub(channel)
        try:
            response = stub.List(api_pb2.ListPodResourcesRequest(), timeout=timeout_s)
        except grpc.RpcError as err:
            code = err.code().name if hasattr(err, "code") else "UNKNOWN"
            details = err.details() if hasattr(err, "details") else str(err)
            raise PodResourcesUnavailable(f"kubelet pod-resources List failed: {code}: "
                                          f"{details}") from err
    rows = []
    for pod in response.pod_resources:
        for container in pod.containers:
            for devices in container.devices:
                for device_id in devices.device_ids:
                    rows.append(ContainerDevice(pod.namespace, pod.name, container.name,
                                                devices.resource_name, device_id))
    return rows
