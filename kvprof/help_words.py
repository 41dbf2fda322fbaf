"""Help placeholders in words (``--out FILE``, ``SOURCE``), not Typer's ``<path>`` / ``{src}``."""

from __future__ import annotations

from typing import Any

# By option name: what the value is, in one word a user would write in a man page.
_BY_NAME = {
    "traces": "FILE_DIR_OR_URL", "samples": "DIR", "aiperf": "DIR", "microbench": "FILE",
    "placement": "DIR", "service": "NAME", "lookback": "DURATION", "vllm_log": "FILE",
    "vllm_metrics": "FILE", "client_host": "HOST", "out": "PATH", "fmt": "FORMAT",
    "to": "FORMAT", "src": "SOURCE", "pods": "FILE", "nodes": "FILE", "kubeconfig": "FILE",
    "namespace": "NAME", "role_label": "LABEL", "tokens": "N", "model": "NAME",
    "baseline": "DIR", "candidate": "DIR", "gpus": "N", "baseline_name": "NAME",
    "candidate_name": "NAME", "output": "DIR", "grpc": "HOST:PORT", "http": "HOST:PORT",
    "max_bytes": "SIZE", "max_queue_bytes": "SIZE", "max_payload_bytes": "SIZE",
    "duration": "SECONDS", "ready_file": "FILE", "interval": "SECONDS", "pid": "PID",
    "exporter": "EXPORTER", "endpoint": "URL", "service_name": "NAME", "role": "ROLE",
    "proc": "DIR", "listen": "HOST:PORT", "rotate": "SECONDS", "sysfs": "DIR",
    "kubelet_socket": "SOCKET", "watch_pid": "[ROLE=]PID", "watch_name": "[ROLE=]REGEX",
    "kv_dtype": "DTYPE", "transport": "TRANSPORT", "device": "DEVICE", "sweep": "TOKENS",
}
_BY_TYPE = {"integer": "N", "float": "NUMBER", "path": "PATH", "text": "TEXT"}


def _word(param: Any) -> str:
    if param.name in _BY_NAME:
        return _BY_NAME[param.name]
    bare = getattr(param, "bare_type", None)  # Typer's own params carry no click type
    kind = bare() if bare else getattr(getattr(param, "type", None), "name", "")
    kind = {"int": "integer", "str": "text"}.get(str(kind).lower(), str(kind).lower())
    if "path" in kind:
        kind = "path"
    return _BY_TYPE.get(kind, (param.name or "value").upper())


def word_placeholders(command: Any) -> Any:
    """Give every option and argument of ``command`` (a click command tree) a metavar in
    words where it has none; required arguments show bare in the usage line (``SOURCE``)."""
    for param in getattr(command, "params", []):
        if getattr(param, "is_flag", False) or getattr(param, "count", False):
            continue
        if param.metavar is None:
            param.metavar = _word(param)
        if getattr(param, "param_type_name", "") == "argument":
            usage = param.metavar if param.required else f"[{param.metavar}]"
            # Typer wraps a required argument in braces ({SOURCE}); click's habit is bare.
            param.get_usage_pieces = lambda ctx, _u=usage: [_u]
            # ... and its help row would read "SOURCE <path>": the word is the whole name.
            param.display_type_rich = lambda ctx: None
    for sub in getattr(command, "commands", {}).values():
        word_placeholders(sub)
    return command
