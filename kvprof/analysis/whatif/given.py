"""A what-if model given as inputs (a JSON file): deployments, service times, load, measured rows.

For deployments kvprof has no traces of, such as the seed's H200 cluster: every service time
is an input with its derivation and sources in the file (examples/whatif/seed-h200.json).
Schema ``kvprof.whatif/1``::

    {"schema": "kvprof.whatif/1",
     "load": {"levels": [1, 10, 100], "requests_per_level": 200, "warmup": 0,
              "isl": 4000, "isl_std": 100, "osl": 500, "osl_std": 50},
     "deployments": [{"name": "...", "kv_bytes_per_token": 131072,
                      "link": {"gbytes_per_s": 25, "handshake_ms": 500},
                      "overheads_ms": {"in": 5, "mid": 10, "kv_fixed": 5, "out": 5},
                      "groups": [{"role": "prefill", "count": 2, "tp": 1, "max_batch": 1,
                                  "token_budget": 7800, "kv_blocks": null (unbounded),
                                  "block_tokens": 16,
                                  "cost": {"base_ms": 0, "per_prefill_token_ms": 0.07,
                                           "per_decode_seq_ms": 0}}]}],
     "measured": {"<deployment name>": {"<level>": {"ttft_mean_ms": 177, "ttft_p99_ms": 213}}}}
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from kvprof.analysis.whatif.compare import Row, error_pct
from kvprof.analysis.whatif.simulate import (
    Deployment,
    Link,
    Load,
    Overheads,
    StepCost,
    WorkerGroup,
)
from kvprof.errors import BadInputError

SCHEMA = "kvprof.whatif/1"
EXPECTED = "a kvprof.whatif/1 JSON model (see examples/whatif/seed-h200.json)"


def _num(obj: dict, key: str, where: str, default: float | None = None,
         minimum: float = 0.0) -> float:
    from kvprof.inputs import finite_number

    if key not in obj:
        if default is None:
            raise BadInputError(f"{where}: no {key!r}", hint=f"Expected {EXPECTED}.")
        return default
    return finite_number(obj[key], f"{where}.{key}", minimum=minimum)


def _deployment(d: dict, i: int) -> Deployment:
    where = f"deployments[{i}]"
    if not isinstance(d, dict) or not isinstance(d.get("groups"), list):
        raise BadInputError(f"{where} has no list of groups", hint=f"Expected {EXPECTED}.")
    groups = []
    for j, g in enumerate(d["groups"]):
        gw = f"{where}.groups[{j}]"
        if not isinstance(g, dict) or not isinstance(g.get("cost"), dict):
            raise BadInputError(f"{gw} has no cost", hint=f"Expected {EXPECTED}.")
        c = g["cost"]
        groups.append(WorkerGroup(
            str(g.get("role")), int(_num(g, "count", gw)),
            StepCost(_num(c, "base_ms", gw + ".cost", 0.0),
                     _num(c, "per_prefill_token_ms", gw + ".cost", 0.0),
                     _num(c, "per_decode_seq_ms", gw + ".cost", 0.0)),
            int(_num(g, "tp", gw, 1)), int(_num(g, "max_batch", gw, 256)),
            int(_num(g, "token_budget", gw, 8192)),
            int(_num(g, "kv_blocks", gw)) if "kv_blocks" in g else None,
            int(_num(g, "block_tokens", gw, 16, minimum=1))))
    link = d.get("link") or {}
    ov = d.get("overheads_ms") or {}
    sample = tuple(_num(ov, k, where + ".overheads_ms", 0.0) for k in ("in", "mid", "kv_fixed",
                                                                        "out"))
    rate = link.get("gbytes_per_s")
    dep = Deployment(
        tuple(groups),
        Link(_num(link, "gbytes_per_s", where + ".link") if rate is not None else None,
             _num(link, "handshake_ms", where + ".link", 0.0), bool(link.get("prewarmed"))),
        Overheads((sample,)), _num(d, "kv_bytes_per_token", where, 0.0),
        str(d.get("router", "round_robin")), str(d.get("name", "")))
    dep.validate()
    return dep


def load_given(path: Path) -> dict[str, Any]:
    """The model file, checked: {'deployments': [Deployment], 'loads': [Load], 'measured',
    'doc' (the file itself)}."""
    from kvprof.inputs import load_json_file

    doc = load_json_file(path, "what-if model", EXPECTED)
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise BadInputError(f"{path} is not a {SCHEMA} file", hint=f"Expected {EXPECTED}.")
    load = doc.get("load")
    if not isinstance(load, dict) or not isinstance(load.get("levels"), list) \
            or not load["levels"]:
        raise BadInputError(f"{path}: load.levels missing", hint=f"Expected {EXPECTED}.")
    deps = doc.get("deployments")
    if not isinstance(deps, list) or not deps:
        raise BadInputError(f"{path}: no deployments", hint=f"Expected {EXPECTED}.")
    return {"deployments": [_deployment(d, i) for i, d in enumerate(deps)],
            "loads": loads_from(load), "measured": doc.get("measured") or {}, "doc": doc}


def loads_from(load: dict) -> list[Load]:
    """Requests with normally spread lengths (aiperf's --synthetic-input-tokens-stddev)."""
    n = int(_num(load, "requests_per_level", "load", minimum=1))
    rng = random.Random(int(load.get("seed", 0)))
    out = []
    for c in load["levels"]:
        isl = tuple(max(1, round(rng.gauss(_num(load, "isl", "load", minimum=1),
                                           _num(load, "isl_std", "load", 0.0)))) for _ in range(n))
        osl = tuple(max(1, round(rng.gauss(_num(load, "osl", "load", minimum=1),
                                           _num(load, "osl_std", "load", 0.0)))) for _ in range(n))
        out.append(Load(int(c), n, isl, osl, warmup=int(_num(load, "warmup", "load", 0.0))))
    return out


def measured_rows(measured: dict, name: str) -> dict[int, Row]:
    """The file's measured table for one deployment, as rows."""
    out = {}
    for level, m in (measured.get(name) or {}).items():
        if isinstance(m, dict):
            out[int(level)] = Row("measured", name, int(level), int(m.get("requests", 0)),
                                  m.get("ttft_mean_ms"), m.get("ttft_p50_ms"),
                                  m.get("ttft_p99_ms"))
    return out


def attach_errors(pred: dict[int, Row], meas: dict[int, Row]) -> None:
    for c, row in pred.items():
        if c in meas:
            row.error_mean_pct = error_pct(row.ttft_mean_ms, meas[c].ttft_mean_ms)
            row.error_p99_pct = error_pct(row.ttft_p99_ms, meas[c].ttft_p99_ms)
