"""Which of kvprof's hooked vLLM methods exist in the vLLM of this venv, and their signatures.

    .venv-dynamo/bin/python -m demo.dynamo.hook_inventory > inv-031.json   # vLLM 0.31
    .venv/bin/python -m demo.dynamo.hook_inventory > inv-032.json          # vLLM 0.32
    python -m demo.dynamo.hook_inventory --diff inv-031.json inv-032.json

Reads kvprof's own target list (VllmInstrumentor.targets() and hooks.PROFILES), so it follows
kvprof as it changes; imports vLLM modules but starts no engine. Also checks the internal
attribute names the hooks read, by searching vLLM's source files.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import sys
from pathlib import Path

# Attributes the hook bodies read off vLLM objects (kvprof/probes/hooks.py, api_hooks.py),
# with the vLLM source file that should define them.
NIXL = "distributed/kv_transfer/kv_connector/v1/nixl"
INTERNALS = {
    "nixl metadata reqs_to_recv": (NIXL, r"reqs_to_recv"),
    "nixl worker _remote_agents": (NIXL, r"_remote_agents\b"),
    "nixl ReqMeta.local_block_ids": (NIXL, r"local_block_ids"),
    "nixl ReqMeta.remote (RemoteMeta)": (NIXL, r"\bremote\s*[:=]"),
    "nixl stats bytes_transferred": (NIXL, r"bytes_transferred"),
    "nixl stats num_descriptors": (NIXL, r"num_descriptors"),
    "nixl stats transfer_duration": (NIXL, r"transfer_duration"),
    "nixl expired-lease log": (NIXL, r"_reap_expired_send_leases"),
    "Request.arrival_time": ("v1/request.py", r"self\.arrival_time"),
    "Request.num_prompt_tokens": ("v1/request.py", r"num_prompt_tokens"),
    "Request.kv_transfer_params": ("v1/request.py", r"kv_transfer_params"),
    "Request.trace_headers": ("v1/request.py", r"trace_headers"),
    "EngineCoreRequest.trace_headers": ("v1/engine/__init__.py", r"trace_headers"),
    "SchedulerOutput.scheduled_new_reqs": ("v1/core/sched/output.py", r"scheduled_new_reqs"),
    "NewRequestData.block_ids": ("v1/core/sched/output.py", r"block_ids"),
    "KVConnectorOutput.finished_recving": ("v1/outputs.py", r"finished_recving"),
    "AsyncLLM.generate trace_headers": ("v1/engine/async_llm.py", r"trace_headers"),
    "vllm.v1.engine.utils.get_engine_zmq_addresses (dynamo needs)": (
        "v1/engine/utils.py", r"def get_engine_zmq_addresses"),
}


def _sig(obj) -> str | None:
    func = obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj
    try:
        return str(inspect.signature(func))
    except (TypeError, ValueError):
        return None


def _where(owner, name: str) -> str | None:
    for klass in getattr(owner, "__mro__", ()):
        if name in vars(klass):
            return klass.__name__
    return None


def inventory() -> dict:
    import vllm

    from kvprof.probes import hooks
    from kvprof.probes.instrumentor import VllmInstrumentor

    out: dict = {"vllm": vllm.__version__, "targets": {}, "connectors": {}, "internals": {}}
    for target in VllmInstrumentor().targets():
        label = f"{target.module}.{target.path}"
        entry: dict = {"module": target.module, "path": target.path}
        try:
            owner = importlib.import_module(target.module)
            parts = target.path.split(".")
            for part in parts[:-1]:
                owner = getattr(owner, part)
            raw = inspect.getattr_static(owner, parts[-1])
            entry.update(exists=True, signature=_sig(raw), defined_in=_where(owner, parts[-1]))
        except Exception as exc:  # absent module, class or method
            entry.update(exists=False, error=f"{type(exc).__name__}: {exc}")
        out["targets"][label] = entry

    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    registry = getattr(KVConnectorFactory, "_registry", {})
    for name in ("NixlConnector", "ExampleConnector"):
        entry = {}
        try:
            loader = registry[name]
            cls = loader() if callable(loader) and not isinstance(loader, type) else loader
            profile = hooks.connector_profile(cls)
            entry = {"class": f"{cls.__module__}.{cls.__qualname__}", "profile": profile,
                     "mro": [c.__name__ for c in cls.__mro__][:6], "methods": {}}
            for meth in hooks.PROFILES[profile]:
                try:
                    raw = inspect.getattr_static(cls, meth)
                    entry["methods"][meth] = {"exists": True, "signature": _sig(raw),
                                              "defined_in": _where(cls, meth)}
                except AttributeError:
                    entry["methods"][meth] = {"exists": False}
        except Exception as exc:
            entry = {"error": f"{type(exc).__name__}: {exc}"}
        out["connectors"][name] = entry

    root = Path(vllm.__file__).parent
    for label, (rel, pattern) in INTERNALS.items():
        path = root / rel
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        hits = [str(f.relative_to(root)) for f in files
                if f.exists() and re.search(pattern, f.read_text(errors="replace"))]
        out["internals"][label] = hits
    return out


def diff(a: dict, b: dict) -> dict:
    """What differs between two inventories (a = older vLLM, b = newer)."""
    rows = {}
    keys = sorted(set(a["targets"]) | set(b["targets"]))
    for k in keys:
        ea, eb = a["targets"].get(k, {}), b["targets"].get(k, {})
        rows[k] = {a["vllm"]: ea.get("exists"), b["vllm"]: eb.get("exists"),
                   "same_signature": ea.get("signature") == eb.get("signature"),
                   **({} if ea.get("signature") == eb.get("signature") else
                      {f"sig {a['vllm']}": ea.get("signature"),
                       f"sig {b['vllm']}": eb.get("signature")})}
    conns = {}
    for name in sorted(set(a["connectors"]) | set(b["connectors"])):
        ca, cb = a["connectors"].get(name, {}), b["connectors"].get(name, {})
        meths = {}
        for m in sorted(set(ca.get("methods", {})) | set(cb.get("methods", {}))):
            ma, mb = ca.get("methods", {}).get(m, {}), cb.get("methods", {}).get(m, {})
            meths[m] = {a["vllm"]: ma.get("exists"), b["vllm"]: mb.get("exists"),
                        "same_signature": ma.get("signature") == mb.get("signature")}
        conns[name] = {"class": {a["vllm"]: ca.get("class"), b["vllm"]: cb.get("class")},
                       "methods": meths}
    internals = {k: {a["vllm"]: a["internals"].get(k), b["vllm"]: b["internals"].get(k)}
                 for k in sorted(set(a["internals"]) | set(b["internals"]))}
    return {"targets": rows, "connectors": conns, "internals": internals}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diff", nargs=2, type=Path, metavar=("OLD", "NEW"))
    args = p.parse_args(argv)
    if args.diff:
        a, b = (json.loads(x.read_text()) for x in args.diff)
        print(json.dumps(diff(a, b), indent=1))
        return
    print(json.dumps(inventory(), indent=1))


if __name__ == "__main__":
    sys.exit(main())
