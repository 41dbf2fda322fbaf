"""Pods and nodes (kubectl JSON or the live API) -> worker roles, GPUs and node capabilities.

Worker table (``load_workers``): pod, namespace, node, phase, ready, role (prefill | decode |
aggregated | frontend | other), role_from (which label/arg decided), gpus, tp, graph
(Dynamo graph deployment or namespace), gpu_uuids, numa.
Node table (``load_nodes``): node, gpus, product, rdma (bool), ready.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvprof import semconv as sc
from kvprof.errors import BadInputError, ResourceAbsentError

log = logging.getLogger(__name__)

DYNAMO_COMPONENT_TYPE = "nvidia.com/dynamo-component-type"
DYNAMO_SUB_COMPONENT_TYPE = "nvidia.com/dynamo-sub-component-type"
DYNAMO_COMPONENT = "nvidia.com/dynamo-component"
DYNAMO_GRAPH = "nvidia.com/dynamo-graph-deployment-name"
GPU_RESOURCE = "nvidia.com/gpu"
# Node hints that RDMA (InfiniBand / RoCE) is usable by pods.
RDMA_RESOURCE_HINTS = ("rdma", "infiniband", "mellanox", "hostdev")
RDMA_LABELS = ("feature.node.kubernetes.io/rdma.available",
               "feature.node.kubernetes.io/rdma.capable",
               "network.nvidia.com/operator.mofed.wait")


@dataclass
class Worker:
    pod: str
    namespace: str
    node: str | None
    phase: str
    ready: bool
    role: str
    role_from: str
    gpus: int
    tp: int | None
    graph: str
    gpu_uuids: list[str]
    numa: list[str]
    rdma: bool = False  # requests an RDMA device (or host network / privileged)


@dataclass
class Node:
    node: str
    gpus: int
    product: str
    rdma: bool
    ready: bool


def _read_json(path: Path, what: str) -> Any:
    from kvprof.inputs import load_json_file, path_problem

    if path_problem(path) == "not found":
        raise BadInputError(f"{what} file not found: {path}",
                            hint=f"Save it: kubectl get {what} -o json > {path.name}")
    return load_json_file(path, f"{what} file", f"`kubectl get {what} -o json` output")


# The fields audit reads, and the JSON type each must have (kubectl's own schema).
_POD_SHAPE = {"metadata": dict, "spec": dict, "status": dict}
_META_SHAPE = {"labels": dict, "name": str, "namespace": str}
_SPEC_SHAPE = {"containers": list, "nodeName": str}
_CONTAINER_SHAPE = {"command": list, "args": list, "resources": dict, "securityContext": dict}
_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string"}


def _check_shape(obj: Any, shape: dict, where: str, path: str) -> None:
    for key, want in shape.items():
        value = obj.get(key)
        if value is not None and not isinstance(value, want):
            raise BadInputError(
                f"{where}: {path}.{key} is {type(value).__name__} {json.dumps(value)[:30]}, "
                f"expected {_TYPE_NAMES[want]}",
                hint="Expected `kubectl get pods -o json` / `kubectl get nodes -o json` output.")


def _check_item(item: dict, i: int, where: str) -> None:
    """Every field audit reads has kubectl's type: a clear error instead of a crash."""
    base = f"items[{i}]"
    _check_shape(item, _POD_SHAPE, where, base)
    _check_shape(item.get("metadata") or {}, _META_SHAPE, where, base + ".metadata")
    for key, value in ((item.get("metadata") or {}).get("labels") or {}).items():
        if not isinstance(value, str):
            raise BadInputError(f"{where}: {base}.metadata.labels.{key} is "
                                f"{json.dumps(value)[:30]}, expected a string",
                                hint="Expected `kubectl get ... -o json` output.")
    spec = item.get("spec") or {}
    _check_shape(spec, _SPEC_SHAPE, where, base + ".spec")
    for j, c in enumerate(spec.get("containers") or ()):
        cpath = f"{base}.spec.containers[{j}]"
        if not isinstance(c, dict):
            raise BadInputError(f"{where}: {cpath} is {type(c).__name__}, expected an object",
                                hint="Expected `kubectl get pods -o json` output.")
        _check_shape(c, _CONTAINER_SHAPE, where, cpath)
        _check_shape(c.get("resources") or {}, {"limits": dict, "requests": dict}, where,
                     cpath + ".resources")
    status = item.get("status") or {}
    _check_shape(status, {"conditions": list, "capacity": dict, "allocatable": dict,
                          "phase": str}, where, base + ".status")
    for j, cond in enumerate(status.get("conditions") or ()):
        if not isinstance(cond, dict):
            raise BadInputError(f"{where}: {base}.status.conditions[{j}] is "
                                f"{type(cond).__name__}, expected an object",
                                hint="Expected `kubectl get ... -o json` output.")


def _count(value: Any, where: str, what: str) -> int:
    """A GPU count; a value that is not a whole number counts 0, with a warning naming it."""
    try:
        n = int(str(value))
    except ValueError:
        n = -1
    if n < 0:
        log.warning("%s: %s = %s is not a GPU count (a whole number); counted as 0", where,
                    what, json.dumps(value)[:40])
        return 0
    return n


def _items(doc: Any, kind: str, path: str) -> list[dict]:
    if isinstance(doc, dict) and doc.get("kind") == kind:
        _check_item(doc, 0, path)
        return [doc]
    if isinstance(doc, dict) and isinstance(doc.get("items"), list):
        items = [i for i in doc["items"] if isinstance(i, dict)]
        # A List of other kinds (e.g. Services) is the wrong file.
        if all(i.get("kind", kind) == kind for i in items):
            for n, item in enumerate(items):
                _check_item(item, n, path)
            return items
    raise BadInputError(f"{path} is not a {kind} or {kind}List",
                        hint=f"Expected `kubectl get {kind.lower()}s -o json` output.")


def _container_args(pod: dict) -> list[str]:
    out: list[str] = []
    for c in (pod.get("spec") or {}).get("containers") or ():
        out += [str(a) for a in (c.get("command") or [])] + [str(a) for a in (c.get("args") or [])]
    return out


def _gpus(pod: dict, where: str = "") -> int:
    total = 0
    name = (pod.get("metadata") or {}).get("name", "?")
    for c in (pod.get("spec") or {}).get("containers") or ():
        res = c.get("resources") or {}
        value = (res.get("limits") or {}).get(GPU_RESOURCE) or (res.get("requests") or {}).get(
            GPU_RESOURCE)
        if value is not None:
            total += _count(value, where, f"pod {name} {GPU_RESOURCE}")
    return total


def _pod_rdma(pod: dict) -> bool:
    """Can this pod open the node's RDMA devices? (needed for NIXL over InfiniBand)"""
    spec = pod.get("spec") or {}
    if spec.get("hostNetwork"):
        return True
    for c in spec.get("containers") or ():
        res = c.get("resources") or {}
        names = list(res.get("limits") or {}) + list(res.get("requests") or {})
        if any(any(h in n.lower() for h in RDMA_RESOURCE_HINTS) for n in names):
            return True
        if ((c.get("securityContext") or {}).get("privileged")):
            return True
    return False


def _tp(args: list[str]) -> int | None:
    for i, a in enumerate(args):
        if a in ("--tensor-parallel-size", "-tp") and i + 1 < len(args):
            try:
                return int(args[i + 1])
            except ValueError:
                return None
        if a.startswith("--tensor-parallel-size="):
            try:
                return int(a.split("=", 1)[1])
            except ValueError:
                return None
    return None


def _role(labels: dict, args: list[str], role_label: str | None) -> tuple[str, str]:
    if role_label and labels.get(role_label):
        value = labels[role_label].lower()
        for role in sc.ROLES:
            if role in value:
                return role, f"label {role_label}"
        return "other", f"label {role_label}"
    sub = labels.get(DYNAMO_SUB_COMPONENT_TYPE, "").lower()
    if sub in (sc.ROLE_PREFILL, sc.ROLE_DECODE):
        return sub, f"label {DYNAMO_SUB_COMPONENT_TYPE}"
    ctype = labels.get(DYNAMO_COMPONENT_TYPE, "").lower()
    if ctype == sc.ROLE_FRONTEND:
        return sc.ROLE_FRONTEND, f"label {DYNAMO_COMPONENT_TYPE}"
    joined = " ".join(args)
    if "--is-prefill-worker" in args:
        return sc.ROLE_PREFILL, "arg --is-prefill-worker"
    if "kv_producer" in joined:
        return sc.ROLE_PREFILL, "kv_role kv_producer"
    if "kv_consumer" in joined:
        return sc.ROLE_DECODE, "kv_role kv_consumer"
    component = labels.get(DYNAMO_COMPONENT, "").lower()
    if "prefill" in component:
        return sc.ROLE_PREFILL, f"label {DYNAMO_COMPONENT}"
    if ctype == "worker" or "vllm" in joined or "dynamo." in joined:
        # A worker without a prefill marker: decode in a disaggregated graph, aggregated
        # otherwise; resolved once all pods of its graph are known.
        return "worker", f"label {DYNAMO_COMPONENT_TYPE}" if ctype else "vLLM command"
    return "other", "no role label or argument"


def workers_from_pods(doc: Any, where: str, role_label: str | None = None,
                      namespace: str | None = None) -> list[Worker]:
    """Parse a Pod / PodList document into workers."""
    out = []
    for pod in _items(doc, "Pod", where):
        meta = pod.get("metadata") or {}
        if namespace and meta.get("namespace") != namespace:
            continue
        labels = meta.get("labels") or {}
        args = _container_args(pod)
        role, role_from = _role(labels, args, role_label)
        status = pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in status.get("conditions") or ())
        out.append(Worker(
            pod=meta.get("name", "?"), namespace=meta.get("namespace", ""),
            node=(pod.get("spec") or {}).get("nodeName"), phase=status.get("phase", "Unknown"),
            ready=ready, role=role, role_from=role_from, gpus=_gpus(pod, where), tp=_tp(args),
            graph=labels.get(DYNAMO_GRAPH) or meta.get("namespace", ""),
            gpu_uuids=[], numa=[], rdma=_pod_rdma(pod)))
    graphs_with_prefill = {w.graph for w in out if w.role == sc.ROLE_PREFILL}
    for w in out:
        if w.role == "worker":
            w.role = sc.ROLE_DECODE if w.graph in graphs_with_prefill else sc.ROLE_AGGREGATED
    return out


def nodes_from_doc(doc: Any, where: str) -> list[Node]:
    """Parse a Node / NodeList document."""
    out = []
    for node in _items(doc, "Node", where):
        meta = node.get("metadata") or {}
        labels = meta.get("labels") or {}
        status = node.get("status") or {}
        cap = {**(status.get("capacity") or {}), **(status.get("allocatable") or {})}
        gpus = _count(cap.get(GPU_RESOURCE, "0"), where,
                      f"node {meta.get('name', '?')} {GPU_RESOURCE}")
        rdma = any(any(h in k.lower() for h in RDMA_RESOURCE_HINTS) and str(v) not in ("0", "")
                   for k, v in cap.items()) or any(
            str(labels.get(k, "")).lower() == "true" for k in RDMA_LABELS)
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in status.get("conditions") or ())
        out.append(Node(node=meta.get("name", "?"), gpus=gpus,
                        product=labels.get("nvidia.com/gpu.product", ""), rdma=rdma, ready=ready))
    return out


def load_offline(pods: Path, nodes: Path | None, role_label: str | None,
                 namespace: str | None) -> tuple[list[Worker], list[Node]]:
    """Workers and nodes from saved kubectl JSON files."""
    workers = workers_from_pods(_read_json(pods, "pods"), str(pods), role_label, namespace)
    node_list = nodes_from_doc(_read_json(nodes, "nodes"), str(nodes)) if nodes else []
    return workers, node_list


def load_live(kubeconfig: Path | None, role_label: str | None,
              namespace: str | None) -> tuple[list[Worker], list[Node]]:
    """Workers and nodes read (read-only) through the kubernetes client."""
    try:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException
    except ImportError:
        raise ResourceAbsentError("the kubernetes Python client is not installed",
                                  hint="pip install kubernetes") from None
    try:
        if kubeconfig:
            config.load_kube_config(config_file=str(kubeconfig))
        else:
            try:
                config.load_incluster_config()
            except ConfigException:
                config.load_kube_config()
    except (ConfigException, OSError, TypeError) as exc:
        raise ResourceAbsentError(f"no usable cluster configuration: {exc}",
                                  hint="Pass --kubeconfig PATH, or --pods/--nodes JSON files.") \
            from None
    api = client.CoreV1Api()
    ser = client.ApiClient().sanitize_for_serialization
    try:
        pods = (api.list_namespaced_pod(namespace) if namespace
                else api.list_pod_for_all_namespaces())
        node_list = api.list_node()
    except Exception as exc:  # urllib3 / ApiException: the cluster is unreachable or says no
        raise ResourceAbsentError(f"cannot list pods/nodes: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:200]}",
                                  hint="Check the cluster is reachable and RBAC allows "
                                  "get/list on pods and nodes.") from None
    pods_doc = {"kind": "PodList", "items": [dict(ser(p), kind="Pod") for p in pods.items]}
    nodes_doc = {"kind": "NodeList", "items": [dict(ser(n), kind="Node")
                                               for n in node_list.items]}
    return (workers_from_pods(pods_doc, "cluster", role_label, namespace),
            nodes_from_doc(nodes_doc, "cluster"))


def apply_placement_records(workers: list[Worker], records) -> None:
    """Fill GPU UUIDs / NUMA nodes (and missing nodes) from the collectors' placement rows."""
    by_pod: dict[str, list[dict]] = {}
    for rec in records.to_dict("records"):
        by_pod.setdefault(rec["pod"], []).append(rec)
    for w in workers:
        for rec in by_pod.get(w.pod, ()):
            if rec.get("gpu_uuid") and rec["gpu_uuid"] not in w.gpu_uuids:
                w.gpu_uuids.append(rec["gpu_uuid"])
            if rec.get("numa") and str(rec["numa"]) not in w.numa:
                w.numa.append(str(rec["numa"]))
            if not w.node and rec.get("node"):
                w.node = rec["node"]
