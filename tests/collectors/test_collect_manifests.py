"""Manifests: every kustomization renders, validates against the Kubernetes schema, and is safe."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
K8S_VERSION = "1.32.0"
CRDS = {("nvidia.com/v1alpha1", "DynamoGraphDeployment"),
        ("monitoring.coreos.com/v1", "ServiceMonitor")}
READ_ONLY_HOST_PATHS = {"/sys", "/proc", "/var/lib/kubelet/pod-resources"}

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")


def render(target: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(MANIFESTS / target)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("target", ["base", "overlays/monitoring", "overlays/dynamo-vllm",
                                    "overlays/dynamo-vllm-receiver"])
def test_renders_and_validates(target):
    import kubernetes_validate

    docs = render(target)
    assert docs
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue  # no published schema: checked structurally below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_base_security_rules():
    docs = render("base")
    (role,) = by_kind(docs, "ClusterRole")
    for rule in role["rules"]:
        assert set(rule["verbs"]) <= {"get", "list", "watch"}
        assert set(rule["resources"]) <= {"pods", "nodes"}
    assert not by_kind(docs, "Role") and not by_kind(docs, "Secret")
    (ds,) = by_kind(docs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert not pod.get("hostPID") and not pod.get("hostIPC")
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    # Every capability dropped; added back only the two that reading another user's
    # /proc/<pid>/environ needs (CPU-wait discovery; test_collector_caps_find_attach_processes)
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(sc["capabilities"]["add"]) == ["DAC_READ_SEARCH", "SYS_PTRACE"]
    assert "nvidia.com/gpu" not in str(c["resources"])  # GPU access without requesting one
    assert c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    ports = [p["containerPort"] for p in c["ports"]]
    assert 9400 not in ports and 9402 in ports  # dcgm-exporter owns 9400
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert READ_ONLY_HOST_PATHS <= set(host_paths.values())
    for name, path in host_paths.items():
        if path in READ_ONLY_HOST_PATHS:
            assert mounts[name].get("readOnly") is True, name
    assert mounts["proc"]["mountPath"] == "/host/proc"
    assert "--proc=/host/proc" in c["args"]
    (svc,) = by_kind(docs, "Service")
    assert svc["spec"]["ports"][0]["port"] == 9402


def test_monitoring_overlay_servicemonitor_and_jaeger():
    docs = render("overlays/monitoring")
    (sm,) = by_kind(docs, "ServiceMonitor")
    (svc,) = [d for d in by_kind(docs, "Service") if d["metadata"]["name"] == "kvprof-collector"]
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (jaeger_svc,) = [d for d in by_kind(docs, "Service") if d["metadata"]["name"] == "jaeger"]
    assert {p["port"] for p in jaeger_svc["spec"]["ports"]} == {4317, 4318, 16686}
    assert by_kind(docs, "Deployment")[0]["metadata"]["name"] == "jaeger"


def test_dynamo_overlay_injects_probes_into_seed_workers():
    (dgd,) = render("overlays/dynamo-vllm")
    seed = yaml.safe_load(
        (MANIFESTS / "overlays/dynamo-vllm/qwen32b-disagg-deployment.yaml").read_text())
    assert dgd["kind"] == "DynamoGraphDeployment" and dgd["apiVersion"] == "nvidia.com/v1alpha1"
    assert set(dgd["spec"]["services"]) == {"Frontend", "VllmPrefillWorker", "VllmDecodeWorker"}
    for service, role in (("VllmPrefillWorker", "prefill"), ("VllmDecodeWorker", "decode")):
        spec = dgd["spec"]["services"][service]["extraPodSpec"]
        main = spec["mainContainer"]
        seed_main = seed["spec"]["services"][service]["extraPodSpec"]["mainContainer"]
        # the worker itself is the seed's: same command and vLLM arguments, moved to the
        # Dynamo runtime that exports spans (components/dynamo-runtime: image, examples
        # folder, 1.6.1's role flags; their parsing is tested in tests/dynamo), plus vLLM's
        # own tracing flag (components/dynamo-tracing; tests/test_manifests_tracing.py)
        assert main["command"] == seed_main["command"]
        assert seed_main["image"].endswith(":0.5.0")
        assert main["image"] == seed_main["image"].replace(":0.5.0", ":1.6.1")
        assert main["workingDir"] == "/workspace/examples/backends/vllm"
        seed_args = [a for a in seed_main["args"] if a != "--is-prefill-worker"]
        assert main["args"] == [*seed_args, "--disaggregation-mode", role,
                                "--kv-transfer-config",
                                '{"kv_connector":"NixlConnector","kv_role":"kv_both"}',
                                "--otlp-traces-endpoint", "$(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)"]
        (init,) = spec["initContainers"]
        assert {m["mountPath"] for m in init["volumeMounts"]} == {"/kvprof"}
        assert "/opt/kvprof/site" in " ".join(init["command"])
        assert {v["name"] for v in spec["volumes"]} == {"backend-config", "kvprof"}
        assert main["volumeMounts"] == [{"name": "kvprof", "mountPath": "/kvprof",
                                         "readOnly": True}]
        env = {e["name"]: e.get("value") for e in main["env"]}
        assert env["PYTHONPATH"] == "/kvprof/site" and env["KVPROF_ENABLED"] == "1"
        assert env["KVPROF_ROLE"] == role
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(":4318")
        # validate the injected pieces against the core Container schema
        import kubernetes_validate

        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
               "spec": {"initContainers": spec["initContainers"],
                        "containers": [{**main, "name": "main"}],
                        "volumes": spec["volumes"]}}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    # the frontend gets only tracing env (components/dynamo-tracing), no probes, and the
    # runtime the workers run
    frontend = dgd["spec"]["services"]["Frontend"]
    main = frontend["extraPodSpec"]["mainContainer"]
    env_names = {e["name"] for e in main.pop("env")}
    assert "OTEL_EXPORT_ENABLED" in env_names and "KVPROF_ENABLED" not in env_names
    assert main.pop("image").endswith("vllm-runtime:1.6.1")
    seed_frontend = seed["spec"]["services"]["Frontend"]
    del seed_frontend["extraPodSpec"]["mainContainer"]["image"]
    assert frontend == seed_frontend


def test_dockerfile_has_no_torch():
    text = (REPO / "Dockerfile").read_text()
    runs = " ".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "FROM python:3.11-slim" in text
    assert "torch" not in runs and "vllm" not in runs.lower() and "[bench" not in runs


def _discovered(caps: list[str], hostproc: Path, pid: int) -> bool:
    """Whether the schedstat sampler, run as the DaemonSet runs it (uid 0 with only `caps`,
    in a PID namespace of its own, the node's procfs mounted read-only elsewhere), finds
    `pid` as a process started under kvprof attach."""
    bounding = ",".join(["-all", *(f"+{c.lower()}" for c in caps)])
    code = ("import sys; from kvprof.collectors.schedstat import SchedstatSampler; "
            "s = SchedstatSampler(sys.argv[1], interval_s=0.1); s.sample(); "
            "print(int(sys.argv[2]) in s.procs)")
    inner = ["unshare", "--pid", "--fork", "--mount-proc", "--",
             "setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--",
             sys.executable, "-c", code, str(hostproc), str(pid)]
    script = 'mount --bind -o ro /proc "$1" && shift && exec "$@"'
    out = subprocess.run(["unshare", "--mount", "--", "sh", "-c", script, "sh", str(hostproc),
                          *inner], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() == "True"


@pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("unshare") and
                                               shutil.which("setpriv")),
                    reason="needs root, unshare and setpriv (util-linux)")
def test_collector_caps_find_attach_processes(tmp_path):
    """The DaemonSet's capabilities are what CPU-wait discovery needs, measured on this
    kernel: with them the sampler finds another user's `kvprof attach` process through the
    node's procfs from its own PID namespace (so no hostPID), without either one it does not."""
    (ds,) = by_kind(render("base"), "DaemonSet")
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    caps = c["securityContext"]["capabilities"].get("add") or []
    try:
        probe = subprocess.run(["unshare", "--mount", "--pid", "--fork", "true"],
                               capture_output=True, timeout=30)
    except OSError:
        probe = None
    if probe is None or probe.returncode != 0:
        pytest.skip("cannot make namespaces here (unshare failed)")
    hostproc = tmp_path / "hostproc"
    hostproc.mkdir()
    tmp_path.chmod(0o755)
    # Another user's engine: uid 65534, started under kvprof attach (its environment).
    target = subprocess.Popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "120"],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KVPROF_ENABLED": "1",
             "KVPROF_ROLE": "decode"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{target.pid}/comm").read_text().strip() != "sleep":
            assert time.monotonic() < deadline, "the target process did not start"
            time.sleep(0.02)
        assert _discovered(caps, hostproc, target.pid), (
            f"with the DaemonSet's capabilities {caps} the sampler does not find another "
            "user's kvprof attach process")
        for missing in ("SYS_PTRACE", "DAC_READ_SEARCH"):
            assert not _discovered([x for x in caps if x != missing], hostproc, target.pid), (
                f"found without {missing}: the manifest asks for more than it needs")
    finally:
        target.kill()
        target.wait()
