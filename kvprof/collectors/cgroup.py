"""PID -> pod UID and container id from ``<proc>/<pid>/cgroup`` (cgroup v1 and v2 forms)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# kubelet names pod cgroups "pod<uid>" (cgroupfs driver, dashes) or
# "kubepods-<qos>-pod<uid with underscores>.slice" (systemd driver).
_POD_RE = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
)
# The last path element holds the container id: "<64 hex>", "docker-<id>.scope",
# "crio-<id>.scope", "cri-containerd-<id>.scope".
_CONTAINER_RE = re.compile(r"(?:^|[-/])([0-9a-f]{64})(?:\.scope)?$")


@dataclass(frozen=True, slots=True)
class CgroupIdentity:
    """What a process's cgroup path says about the pod and container it runs in."""

    pod_uid: str | None
    container_id: str | None


def parse_cgroup(text: str) -> CgroupIdentity:
    """Parse ``/proc/<pid>/cgroup`` content; v1 has one line per hierarchy, v2 one ``0::``."""
    pod_uid = container_id = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        path = parts[2].strip()
        if pod_uid is None:
            match = _POD_RE.search(path)
            if match:
                pod_uid = match.group(1).replace("_", "-")
        if container_id is None and "kubepods" in path:
            match = _CONTAINER_RE.search(path.rstrip("/"))
            if match:
                container_id = match.group(1)
        if pod_uid and container_id:
            break
    return CgroupIdentity(pod_uid, container_id)


def identity_of_pid(proc: Path | str, pid: int) -> CgroupIdentity | None:
    """The cgroup identity of a host PID, or None when the process is gone or unreadable."""
    try:
        text = (Path(proc) / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    return parse_cgroup(text)
