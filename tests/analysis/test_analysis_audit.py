"""`kvprof audit` on the seed's deployment, on real kubectl JSON, and on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FIXTURES, run_kvprof

from kvprof.analysis.audit import audit
from kvprof.analysis.placement import load_offline, workers_from_pods

SEED = Path(__file__).resolve().parents[2] / "examples" / "seed_deployment"


def seed_audit(pods="pods.json"):
    workers, nodes = load_offline(SEED / pods, SEED / "nodes.json", None, None)
    return workers, audit(workers, nodes, tokens=4000, model="qwen3-32b")


def test_seed_deployment_roles_gpus_and_paths():
    workers, a = seed_audit()
    roles = sorted(w.role for w in workers)
    assert roles == ["decode"] * 4 + ["frontend"] + ["prefill"] * 2
    assert sum(w.gpus for w in workers) == 10
    assert {w.tp for w in workers if w.role == "decode"} == {2}
    assert len(a["pairs"]) == 8 and not any(p["same_node"] for p in a["pairs"])
    # The nodes offer RDMA, the pods request none: NIXL falls back to TCP on every pair.
    assert {p["path"] for p in a["pairs"]} == {"tcp"}
    # 524,288,000 B over the 3.125 GB/s nominal 25 GbE link.
    assert a["pairs"][0]["cost_ms"] == pytest.approx(524_288_000 / 3.125e9 * 1e3)
    text = " | ".join(a["warnings"])
    assert "every KV transfer crosses the network" in text
    assert "10 GPUs split across 2 nodes" in text and "TCP fallback" in text


def test_seed_suggestion_keeps_pairs_on_a_node():
    _, a = seed_audit()
    sug = a["suggestion"]
    assert sug["same_node_pairs"] == 4 and sug["pairs"] == 8 and not sug["unplaced"]
    for pods in sug["placement"].values():
        assert sum("prefill" in p for p in pods) == 1 and sum("decode" in p for p in pods) == 2


def test_rdma_requesting_pods_get_infiniband_and_same_node_nvlink(tmp_path):
    doc = json.loads((SEED / "pods.json").read_text())
    for pod in doc["items"]:
        for c in pod["spec"]["containers"]:
            if c["resources"]:
                c["resources"]["limits"]["rdma/rdma_shared_device_a"] = "1"
    doc["items"][3]["spec"]["nodeName"] = "gpu-node-2"  # decode-0 beside the prefills
    (tmp_path / "pods.json").write_text(json.dumps(doc))
    workers, nodes = load_offline(tmp_path / "pods.json", SEED / "nodes.json", None, None)
    paths = {(p["prefill"][-1], p["decode"][-1]): p["path"]
             for p in audit(workers, nodes, 4000, "qwen3-32b")["pairs"]}
    assert paths[("0", "0")] == "nvlink" and paths[("1", "0")] == "nvlink"
    assert paths[("0", "1")] == "infiniband"


def test_aggregated_deployment_and_role_sources():
    workers, a = seed_audit("pods_agg.json")
    assert sorted(w.role for w in workers) == ["aggregated"] * 5 + ["frontend"]
    assert a["pairs"] == [] and any("no prefill->decode pair" in w for w in a["warnings"])
    # Without Dynamo labels the worker args decide; --role-label overrides both.
    doc = json.loads((SEED / "pods.json").read_text())
    for pod in doc["items"]:
        pod["metadata"]["labels"] = {"app.kubernetes.io/role": pod["metadata"]["name"]}
    by_args = workers_from_pods(doc, "x")
    assert sorted(w.role for w in by_args if w.gpus) == ["decode"] * 4 + ["prefill"] * 2
    assert {w.role_from for w in by_args if w.role == "prefill"} == {"arg --is-prefill-worker"}
    by_label = workers_from_pods(doc, "x", role_label="app.kubernetes.io/role")
    assert {w.role_from for w in by_label} == {"label app.kubernetes.io/role"}


def test_real_kubectl_pod_and_node_json():
    workers, nodes = load_offline(FIXTURES / "k9s_render_testdata_p1.json",
                                  FIXTURES / "k9s_render_testdata_no.json", None, None)
    assert workers[0].pod == "nginx-7fb78fb6d8-2w75j" and workers[0].role == "other"
    assert workers[0].node == "gke-k9s-default-pool-0fa2fb89-lbtf"
    assert nodes[0].node == "minikube" and nodes[0].ready


def test_cli_audit_formats(tmp_path):
    args = ["audit", "--pods", SEED / "pods.json", "--nodes", SEED / "nodes.json"]
    r = run_kvprof(*args)
    assert r.returncode == 0 and "## Prefill -> decode pairs" in r.stdout
    r = run_kvprof(*args, "--json")
    assert json.loads(r.stdout)["suggestion"]["same_node_pairs"] == 4
    r = run_kvprof(*args, "--format", "html", "--out", tmp_path / "a.html")
    html = (tmp_path / "a.html").read_text()
    assert r.returncode == 0 and "<table>" in html and "crosses the network" in html


@pytest.mark.parametrize("pods, nodes, code, words", [
    ("missing.json", None, 3, "not found"),
    ("garbage.json", None, 3, "not JSON"),
    ("nodes", None, 3, "not a Pod or PodList"),
    ("pods", "pods", 3, "not a Node or NodeList"),
])
def test_cli_audit_bad_input(tmp_path, pods, nodes, code, words):
    (tmp_path / "garbage.json").write_text("{")
    files = {"nodes": SEED / "nodes.json", "pods": SEED / "pods.json"}
    args = ["audit", "--pods", files.get(pods, tmp_path / pods)]
    if nodes:
        args += ["--nodes", files[nodes]]
    r = run_kvprof(*args)
    assert r.returncode == code and words in r.stderr and "Traceback" not in r.stderr


def test_cli_audit_live_without_a_cluster(tmp_path):
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\n")
    r = run_kvprof("audit", "--kubeconfig", kubeconfig)
    assert r.returncode == 4 and r.stderr.startswith("Error:") and "Hint:" in r.stderr


def test_placement_records_add_gpus_and_numa(tmp_path):
    import pandas as pd

    rows = [{"ts": 1.0, "node": "gpu-node-2", "collector": "placement", "entity": pod,
             "metric": "kvprof_placement_info", "value": 1.0,
             "labels": json.dumps({"pod": pod, "namespace": "bhamm-qwen32b-disagg",
                                   "node": "gpu-node-2", "gpu_uuid": uuid, "role": "prefill",
                                   "numa_node": numa})}
            for pod, uuid, numa in (("qwen32b-disagg-vllmprefillworker-0", "GPU-aaa", 0),
                                    ("qwen32b-disagg-vllmprefillworker-1", "GPU-bbb", 1))]
    pd.DataFrame(rows).to_parquet(tmp_path / "placement.parquet")
    r = run_kvprof("audit", "--pods", SEED / "pods.json", "--nodes", SEED / "nodes.json",
                   "--placement", tmp_path, "--json")
    assert r.returncode == 0, r.stderr
    pairs = json.loads(r.stdout)["pairs"]
    first = next(p for p in pairs if p["prefill"].endswith("worker-1"))
    assert first["prefill_gpus"] == "GPU-bbb" and first["numa"] == "1 -> ?"
