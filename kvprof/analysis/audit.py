"""`kvprof audit`: where prefill and decode pods run and which path each KV hand-off takes."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvprof import semconv as sc
from kvprof.analysis.placement import Node, Worker, load_live, load_offline
from kvprof.analysis.views.render import esc, html_page, html_table, md_table
from kvprof.errors import UsageError
from kvprof.model import NOMINAL_LINKS, link_cost_ms, resolve_geometry

# The nominal link each expected path is costed on (an estimate: nothing is measured here).
PATH_LINK = {
    "nvlink": "nvlink-h100/h200 (450 GB/s)",
    "pcie": "pcie-gen5-x16 (63 GB/s)",
    "infiniband": "ib-ndr-400 (50 GB/s)",
    "tcp": "tcp-25gbe (3.1 GB/s)",
}
FORMATS = ("md", "json", "html")


def expected_path(p: Worker, d: Worker, nodes: dict[str, Node]) -> tuple[str, str]:
    """The KV path a prefill -> decode pair must take, and why."""
    if not p.node or not d.node:
        return "unknown", "a pod is not scheduled"
    if p.node == d.node:
        node = nodes.get(p.node)
        product = node.product if node else ""
        if "SXM" in product.upper() or "HGX" in product.upper():
            return "nvlink", f"same node, {product} GPUs sit on NVSwitch"
        if node is None:
            return "nvlink", "same node (node unknown: assuming NVLink; PCIe otherwise)"
        return "pcie", f"same node, {product or 'GPU model unknown'}: no NVLink assumed"
    pn, dn = nodes.get(p.node), nodes.get(d.node)
    if pn and dn and pn.rdma and dn.rdma:
        if p.rdma and d.rdma:
            return "infiniband", "different nodes, both advertise RDMA and the pods request it"
        return "tcp", ("different nodes with RDMA, but the pods request no RDMA device "
                       "(nor host network): NIXL/UCX inside them falls back to TCP")
    if not pn or not dn:
        return "tcp", "different nodes, RDMA unknown (node missing from nodes JSON): " \
                      "TCP fallback assumed"
    return "tcp", "different nodes without an RDMA resource or label: NIXL falls back to TCP"


def suggest_placement(workers: list[Worker], nodes: list[Node]) -> dict[str, Any]:
    """Greedy: each prefill worker on the emptiest node, then decode workers beside it."""
    free = {n.node: n.gpus for n in nodes if n.gpus > 0}
    prefill = sorted((w for w in workers if w.role == sc.ROLE_PREFILL), key=lambda w: -w.gpus)
    decode = sorted((w for w in workers if w.role == sc.ROLE_DECODE), key=lambda w: -w.gpus)
    if not free or not prefill or not decode:
        return {"placement": {}, "same_node_pairs": 0, "pairs": 0,
                "note": "needs prefill and decode workers and node GPU capacities"}
    plan: dict[str, list[str]] = {n: [] for n in free}
    per_prefill = -(-len(decode) // len(prefill))  # ceil: decodes to seat beside each prefill
    where: dict[str, str] = {}
    queue = list(decode)
    for p in prefill:
        node = max(free, key=lambda n: free[n])
        if free[node] < p.gpus:
            break
        plan[node].append(p.pod)
        free[node] -= p.gpus
        where[p.pod] = node
        seated = 0
        for d in list(queue):
            if seated < per_prefill and free[node] >= d.gpus:
                plan[node].append(d.pod)
                free[node] -= d.gpus
                where[d.pod] = node
                queue.remove(d)
                seated += 1
    for d in list(queue):  # leftovers: beside any prefill with room, else anywhere
        hosts = [where[p.pod] for p in prefill if p.pod in where]
        options = [n for n in hosts if free[n] >= d.gpus] or [n for n in free if free[n] >= d.gpus]
        if options:
            node = max(options, key=lambda n: free[n])
            plan[node].append(d.pod)
            free[node] -= d.gpus
            where[d.pod] = node
            queue.remove(d)
    pairs = [(p, d) for p in prefill for d in decode]
    same = sum(1 for p, d in pairs if where.get(p.pod) and where.get(p.pod) == where.get(d.pod))
    return {"placement": {n: pods for n, pods in plan.items() if pods},
            "same_node_pairs": same, "pairs": len(pairs), "unplaced": [d.pod for d in queue],
            "note": "Dynamo's router may pair any prefill with any decode worker; only pairs on "
                    "one node use NVLink. Pin pods with node affinity, or route prefill->decode "
                    "within a node."}


def audit(workers: list[Worker], nodes: list[Node], tokens: int, model: str) -> dict[str, Any]:
    """Every prefill -> decode pair with its path and cost, warnings and a suggestion."""
    geometry = resolve_geometry(tokens=tokens, model=model)
    node_map = {n.node: n for n in nodes}
    prefill = [w for w in workers if w.role == sc.ROLE_PREFILL]
    decode = [w for w in workers if w.role == sc.ROLE_DECODE]
    pairs = []
    for p in prefill:
        for d in decode:
            path, why = expected_path(p, d, node_map)
            link = PATH_LINK.get(path)
            pairs.append({
                "prefill": p.pod, "decode": d.pod, "prefill_node": p.node, "decode_node": d.node,
                "same_node": bool(p.node and p.node == d.node),
                "prefill_gpus": ", ".join(p.gpu_uuids) or None,
                "decode_gpus": ", ".join(d.gpu_uuids) or None,
                "numa": (f"{','.join(p.numa) or '?'} -> {','.join(d.numa) or '?'}"
                         if p.numa or d.numa else None),
                "path": path, "why": why, "link": link,
                "cost_ms": (link_cost_ms(geometry.total_bytes, NOMINAL_LINKS[link])
                            if link else None),
            })
    warnings: list[str] = []
    p_nodes = {w.node for w in prefill if w.node}
    d_nodes = {w.node for w in decode if w.node}
    if p_nodes and d_nodes and not p_nodes & d_nodes:
        warnings.append(f"all prefill workers on {', '.join(sorted(p_nodes))}, all decode on "
                        f"{', '.join(sorted(d_nodes))}: every KV transfer crosses the network")
    by_graph: dict[str, list[Worker]] = {}
    for w in workers:
        if w.gpus:
            by_graph.setdefault(w.graph, []).append(w)
    for graph, ws in sorted(by_graph.items()):
        used = sorted({w.node for w in ws if w.node})
        if len(used) > 1:
            gpus = sum(w.gpus for w in ws)
            caps = ", ".join(f"{n} ({node_map[n].gpus} GPUs)" if n in node_map else n
                             for n in used)
            warnings.append(f"{graph}: {gpus} GPUs split across {len(used)} nodes ({caps})")
    for w in workers:
        if not w.ready:
            warnings.append(f"pod {w.namespace}/{w.pod} is not Ready (phase {w.phase})")
        if w.gpus and w.node and w.node not in node_map and nodes:
            warnings.append(f"pod {w.pod} runs on {w.node}, which the nodes JSON lacks")
        if w.tp and w.gpus and w.tp > w.gpus:
            warnings.append(f"pod {w.pod}: --tensor-parallel-size {w.tp} > {w.gpus} GPUs")
    if not prefill or not decode:
        warnings.append(f"found {len(prefill)} prefill and {len(decode)} decode workers among "
                        f"{len(workers)} pods: no prefill->decode pair to audit (roles come from "
                        "Dynamo labels, --is-prefill-worker / kv_role args, or --role-label)")
    tcp = [p for p in pairs if p["path"] == "tcp"]
    if tcp:
        warnings.append(f"{len(tcp)} of {len(pairs)} pairs would use TCP fallback "
                        f"(no RDMA seen): {tcp[0]['prefill']} -> {tcp[0]['decode']} "
                        f"costs ~{tcp[0]['cost_ms']:.0f} ms per {tokens}-token request (estimate)")
    return {
        "geometry": {"model": model, "tokens": tokens, "total_bytes": geometry.total_bytes,
                     "kv_dtype": geometry.kv_dtype},
        "workers": [asdict(w) for w in workers],
        "nodes": [asdict(n) for n in nodes],
        "pairs": pairs,
        "warnings": warnings,
        "suggestion": suggest_placement(workers, nodes),
        "costs_note": "cost_ms = KV bytes / the path's nominal link rate: an estimate of the "
                      "bytes alone, without handshake or setup costs.",
    }


def _tables(a: dict) -> dict[str, tuple[list[str], list[list]]]:
    return {
        "workers": (["pod", "namespace", "role", "role from", "node", "GPUs", "TP", "ready"],
                    [[w["pod"], w["namespace"], w["role"], w["role_from"], w["node"], w["gpus"],
                      w["tp"], w["ready"]] for w in a["workers"]]),
        "nodes": (["node", "GPUs", "GPU product", "RDMA", "ready"],
                  [[n["node"], n["gpus"], n["product"] or None, n["rdma"], n["ready"]]
                   for n in a["nodes"]]),
        "pairs": (["prefill", "decode", "prefill node", "decode node", "same node", "GPUs",
                   "NUMA", "expected path", f"cost of {a['geometry']['tokens']} tokens ms "
                   "(estimate)", "why"],
                  [[p["prefill"], p["decode"], p["prefill_node"], p["decode_node"],
                    p["same_node"], (f"{p['prefill_gpus']} -> {p['decode_gpus']}"
                                     if p["prefill_gpus"] or p["decode_gpus"] else None),
                    p["numa"], p["path"], p["cost_ms"], p["why"]] for p in a["pairs"]]),
        "suggestion": (["node", "pods"], [[n, ", ".join(pods)] for n, pods in
                                          a["suggestion"]["placement"].items()]),
    }


def render_audit(a: dict, fmt_name: str) -> str:
    """The audit as Markdown, JSON or HTML."""
    if fmt_name == "json":
        return json.dumps(a, indent=1)
    t = _tables(a)
    g = a["geometry"]
    head = (f"KV per request: {g['tokens']} tokens of {g['model']} ({g['kv_dtype']}) = "
            f"{g['total_bytes']:,} bytes.")
    sug = a["suggestion"]
    sug_line = (f"Suggested: {sug['same_node_pairs']} of {sug['pairs']} prefill->decode pairs "
                f"on one node. {sug['note']}")
    if fmt_name == "md":
        out = ["# kvprof placement audit", "", head, "", "## Warnings", ""]
        out += [f"- {w}" for w in a["warnings"]] or ["- none"]
        for title, key in (("Workers", "workers"), ("Nodes", "nodes"),
                           ("Prefill -> decode pairs", "pairs"),
                           ("Suggested placement", "suggestion")):
            out += ["", f"## {title}", "", md_table(*t[key]) if t[key][1] else "none"]
        out += ["", sug_line, "", a["costs_note"]]
        return "\n".join(out) + "\n"
    warn = "".join(f'<div class="warn">{esc(w)}</div>' for w in a["warnings"]) or "<p>none</p>"
    sections = [("Warnings", warn), ("Workers", html_table(*t["workers"])),
                ("Nodes", html_table(*t["nodes"])),
                ("Prefill → decode pairs", html_table(*t["pairs"])
                 + f'<p class="note">{esc(a["costs_note"])}</p>'),
                ("Suggested placement", html_table(*t["suggestion"]) + f"<p>{esc(sug_line)}</p>")]
    return html_page("kvprof placement audit", head, sections)


def run_audit_command(pods: Path | None, nodes: Path | None, kubeconfig: Path | None,
                      namespace: str | None, placement: Path | None, role_label: str | None,
                      tokens: int, model: str, fmt: str | None,
                      out: Path | None) -> tuple[str | None, str]:
    """The body of `kvprof audit`: (text for stdout or None, one-line summary); ``fmt`` None:
    from ``out``'s suffix, else md."""
    from kvprof.analysis.views.outputs import resolve_output, write_public

    out, fmt_name = resolve_output(out, fmt, FORMATS, "md", None)
    if out is not None:
        from kvprof.outputs import check_output

        check_output(out, "--out")
    if pods and kubeconfig:
        raise UsageError("give either --pods/--nodes files or --kubeconfig, not both")
    if pods:
        workers, node_list = load_offline(pods, nodes, role_label, namespace)
    elif nodes:
        raise UsageError("--nodes needs --pods", hint="kubectl get pods -o json > pods.json")
    else:
        workers, node_list = load_live(kubeconfig, role_label, namespace)
    if placement:
        from kvprof.analysis.loaders.samples import load_samples, placement_records
        from kvprof.analysis.placement import apply_placement_records

        apply_placement_records(workers, placement_records(load_samples(placement).samples))
    a = audit(workers, node_list, tokens, model)
    text = render_audit(a, fmt_name)
    summary = (f"{len(workers)} pods, {len(a['pairs'])} prefill->decode pairs, "
               f"{len(a['warnings'])} warnings")
    if out is None:
        return text, summary
    write_public(out, text)
    return None, f"Wrote {out}: " + summary
