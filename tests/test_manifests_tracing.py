"""Cluster tracing: Dynamo's, vLLM's and kvprof's spans from the dynamo-vllm overlays all reach
one OTLP endpoint (Jaeger, or `kvprof traces receive`), with a service name per component."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
K8S_VERSION = "1.32.0"
SERVICE_NAMES = {"Frontend": "dynamo-frontend", "VllmPrefillWorker": "vllm-prefill",
                 "VllmDecodeWorker": "vllm-decode"}
WORKERS = ("VllmPrefillWorker", "VllmDecodeWorker")
ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT")
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")


def render(target: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(MANIFESTS / target)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind
              and (name is None or d["metadata"]["name"] == name)]
    return doc


def containers(dgd: dict) -> dict[str, dict]:
    return {svc: spec["extraPodSpec"]["mainContainer"]
            for svc, spec in dgd["spec"]["services"].items()}


def env_of(main: dict) -> dict[str, dict]:
    names = [e["name"] for e in main["env"]]
    assert len(names) == len(set(names)), f"duplicate env: {names}"
    return {e["name"]: e for e in main["env"]}


def expanded(main: dict) -> dict[str, str]:
    """The env values the process sees, $(VAR) resolved as the kubelet does (earlier vars;
    downward-API values stand in as <fieldPath>)."""
    out: dict[str, str] = {}
    for e in main["env"]:
        if "valueFrom" in e:
            out[e["name"]] = "<" + e["valueFrom"]["fieldRef"]["fieldPath"] + ">"
        else:
            out[e["name"]] = VAR_REF.sub(lambda m: out.get(m.group(1), m.group(0)), e["value"])
    return out


def service_url(svc: dict, port_name: str) -> tuple[str, int]:
    """(cluster DNS name, port) of a Service's named port."""
    (port,) = [p["port"] for p in svc["spec"]["ports"] if p["name"] == port_name]
    return f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local", port


def check_endpoints(dgd: dict, svc: dict) -> None:
    """Frontend: OTLP/gRPC to the Service's otlp-grpc port; workers: OTLP/HTTP to otlp-http,
    and kvprof's probes resolve the same URL from the same environment."""
    from kvprof.probes.export import otlp_endpoint, otlp_protocol

    grpc_host, grpc_port = service_url(svc, "otlp-grpc")
    http_host, http_port = service_url(svc, "otlp-http")
    for name, main in containers(dgd).items():
        env = expanded(main)
        for var in ENDPOINT_VARS:
            url = urlsplit(env[var])
            if name == "Frontend":
                assert env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "grpc"
                assert (url.scheme, url.hostname, url.port) == ("http", grpc_host, grpc_port)
            else:
                signal = "traces" if "TRACES" in var else "logs"
                assert (url.scheme, url.hostname, url.port, url.path) == (
                    "http", http_host, http_port, f"/v1/{signal}"), var
        if name in WORKERS:
            # Dynamo, vLLM and the probes share the process env: one protocol, one URL.
            assert env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"
            assert otlp_protocol(env) == "http/protobuf"
            assert otlp_endpoint(env) == env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
            assert urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"]).hostname == http_host


def test_dynamo_tracing_env_on_every_component():
    (dgd,) = render("overlays/dynamo-vllm")
    jaeger = one(render("overlays/monitoring"), "Service", "jaeger")
    mains = containers(dgd)
    assert set(mains) == set(SERVICE_NAMES)
    for name, main in mains.items():
        env = env_of(main)
        values = expanded(main)
        assert values["OTEL_EXPORT_ENABLED"] == "true", name
        assert values["DYN_LOGGING_JSONL"] == "true", name  # Dynamo < 1.6 exports only so
        assert values["OTEL_SERVICE_NAME"] == SERVICE_NAMES[name]
        # the node's name reaches the resource (kvprof's clock: k8s.node.name, host.name)
        assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        assert "k8s.node.name=<spec.nodeName>" in values["OTEL_RESOURCE_ATTRIBUTES"].split(",")
        # every $(VAR) in env refers to a variable defined before it (else it stays literal)
        assert not any(VAR_REF.search(v) for v in values.values()), values
    assert "host.name=<spec.nodeName>" in expanded(mains["Frontend"])[
        "OTEL_RESOURCE_ATTRIBUTES"].split(",")
    check_endpoints(dgd, jaeger)


def test_vllm_workers_get_otlp_traces_endpoint():
    (dgd,) = render("overlays/dynamo-vllm")
    for name in WORKERS:
        main = containers(dgd)[name]
        args = main["args"]
        i = args.index("--otlp-traces-endpoint")
        (ref,) = VAR_REF.fullmatch(args[i + 1]).groups()
        assert ref == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" and ref in env_of(main)
    assert "args" not in containers(dgd)["Frontend"]


def test_probe_injection_kept_as_is():
    """components/dynamo-tracing only appends to what components/inject sets."""
    (dgd,) = render("overlays/dynamo-vllm")
    for name, role in (("VllmPrefillWorker", "prefill"), ("VllmDecodeWorker", "decode")):
        patch = yaml.safe_load((MANIFESTS / f"components/inject/inject-{role}.yaml").read_text())
        (inject_env,) = [op["value"] for op in patch if op["path"].endswith("/env")]
        env = containers(dgd)[name]["env"]
        assert env[: len(inject_env)] == inject_env
        added = {e["name"] for e in env[len(inject_env):]}
        assert added.isdisjoint({e["name"] for e in inject_env})
        assert not any(n.startswith("KVPROF_") for n in added)


@pytest.mark.parametrize("target", ["overlays/dynamo-vllm", "overlays/dynamo-vllm-receiver"])
def test_dgd_containers_validate(target):
    import kubernetes_validate

    dgd = one(render(target), "DynamoGraphDeployment")
    for name, main in containers(dgd).items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
               "spec": {"containers": [{**main, "name": "main"}]}}
        spec = dgd["spec"]["services"][name]["extraPodSpec"]
        if "volumes" in spec:
            pod["spec"]["volumes"] = spec["volumes"]
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_receiver_overlay_points_everything_at_the_receiver():
    import kubernetes_validate

    docs = render("overlays/dynamo-vllm-receiver")
    assert not [d for d in docs if d["kind"] == "ConfigMap"]  # local-config only
    svc = one(docs, "Service", "kvprof-traces")
    check_endpoints(one(docs, "DynamoGraphDeployment"), svc)
    assert "jaeger" not in yaml.safe_dump(one(docs, "DynamoGraphDeployment"))
    deploy = one(docs, "Deployment", "kvprof-traces")
    pvc = one(docs, "PersistentVolumeClaim", "kvprof-traces")
    for doc in (svc, deploy, pvc):
        assert doc["metadata"]["namespace"] == "kvprof"
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    pod = deploy["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"] == ["traces", "receive", "--grpc=0.0.0.0:4317", "--http=0.0.0.0:4318",
                         "--output=/data/traces"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"otlp-grpc": 4317, "otlp-http": 4318}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == set(ports)
    assert svc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"][
        "labels"].items()
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims[mounts["/data"]] == pvc["metadata"]["name"]
    assert deploy["spec"]["strategy"]["type"] == "Recreate"  # ReadWriteOnce: one writer
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_receiver_command_line_is_kvprofs():
    """The receiver's flags are the ones `kvprof traces receive` takes."""
    from typer.testing import CliRunner

    from kvprof.cli import app

    result = CliRunner().invoke(app, ["traces", "receive", "--help"])
    assert result.exit_code == 0
    for flag in ("--grpc", "--http", "--output"):
        assert flag in result.output
