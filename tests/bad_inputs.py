"""A corpus of malformed inputs for every kvprof command, and the contract each must meet.

Each `Case` builds its inputs in its own folder, runs the real `python -m kvprof` in a
subprocess (time-bounded) and checks the contract of issue 21: exit 3 (bad input) or 2 (bad
usage) with exactly one `Error:` and one `Hint:` line, or exit 0 with the bad part named in a
warning and everything else right; never a traceback, an `internal error`, a signal, a hang,
a `.tmp` or a 0-byte/partial output. `python tests/bad_inputs.py` prints the counts per class.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "analysis"
SEED_AIPERF = REPO / "examples" / "seed_aiperf"
SEED_DEPLOY = REPO / "examples" / "seed_deployment"
MB_SMALL = ["--model", "qwen3-0.6b", "--iters", "1", "--warmup", "0", "--transport", "copy",
            "--quiet"]


@dataclass
class Env:
    """Shared, read-only inputs of the corpus: a golden scenario and its baseline report."""

    root: Path
    golden: Path
    baseline: dict
    ro_dir: Path | None  # a read-only filesystem (root only), else None
    tiny_fs: Path | None  # a 64 KiB tmpfs (root only), else None


@dataclass
class Case:
    name: str
    klass: str
    build: Callable[[Path, Env], list[str]]
    expect: str = "error"  # error | warn | either | fail (non-zero, Error/Hint, any code)
    needle: str | None = None  # what a warning (or the error) must name
    outputs: tuple[str, ...] = ()  # paths (relative to the case folder) whole or absent
    timeout: float = 60.0
    fsize: int | None = None  # RLIMIT_FSIZE for the child (a full disk without root)
    check: Callable[[Path, Env, subprocess.CompletedProcess], str | None] | None = None
    during: Callable[[Path, subprocess.Popen], None] | None = None  # e.g. send spans
    needs: str | None = None  # "ro" or "tinyfs": skipped without that filesystem
    codes: tuple[int, ...] = (2, 3)  # the exit codes an "error" case may end with


# --- builders ---------------------------------------------------------------------------------

def _golden_copy(d: Path, env: Env, what: str = "traces") -> Path:
    dst = d / what
    src = env.golden / what
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    return dst


def _report(d: Path, env: Env, traces: Path | str | None = None, *extra: str,
            out: str = "report.json") -> list[str]:
    return ["report", "--traces", str(traces or env.golden / "traces"), "--format", "json",
            "--out", str(d / out), *extra]


def _deep(depth: int) -> str:
    return '{"resourceSpans":' + "[" * depth + "]" * depth + "}"


def _otlp_line(spans_value, resource_attrs=None) -> str:
    return json.dumps({"resourceSpans": [{"resource": {"attributes": resource_attrs or []},
                                          "scopeSpans": [{"spans": spans_value}]}]})


def _span(**over) -> dict:
    s = {"traceId": "0" * 31 + "1", "spanId": "0" * 15 + "1", "name": "x",
         "startTimeUnixNano": "1761000000000000000", "endTimeUnixNano": "1761000000100000000",
         "attributes": []}
    s.update(over)
    return s


def _traces_plus(d: Path, env: Env, name: str, text: str | bytes) -> Path:
    t = _golden_copy(d, env)
    p = t / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return t


def _same_summary(d: Path, env: Env, r) -> str | None:
    """The report of the good part must equal the baseline's."""
    try:
        doc = json.loads((d / "report.json").read_text())
    except (OSError, ValueError) as exc:
        return f"no report.json ({exc})"
    base = env.baseline["summary"]
    for key in ("requests", "requests_with_ttft", "ttft_mean_ms", "stacked_mean_ms",
                "unaccounted_mean_ms"):
        a, b = doc["summary"].get(key), base.get(key)
        if a != b and not (isinstance(a, float) and isinstance(b, float) and abs(a - b) < 1e-6):
            return f"summary.{key} = {a!r}, baseline {b!r}"
    return None


def _aiperf_with(d: Path, env: Env, field: str, value, raw: str | None = None) -> Path:
    a = _golden_copy(d, env, "aiperf")
    p = a / "profile_export.jsonl"
    lines = p.read_text().splitlines()
    rec = json.loads(lines[0])
    rec["metrics"][field] = {"value": value, "unit": "ms"}
    lines[0] = raw if raw is not None else json.dumps(rec).replace('"NAN"', "NaN").replace(
        '"INF"', "Infinity")
    p.write_text("\n".join(lines) + "\n")
    return a


def _aiperf_report(d: Path, env: Env, field: str, value, raw: str | None = None) -> list[str]:
    a = _aiperf_with(d, env, field, value, raw)
    return _report(d, env, None, "--aiperf", str(a))


def _one_ttft_dropped(d: Path, env: Env, r) -> str | None:
    """The bad client TTFT is left out (that request's TTFT then comes from its spans): every
    request is there and no TTFT figure is absurd."""
    try:
        doc = json.loads((d / "report.json").read_text())
    except (OSError, ValueError) as exc:
        return f"no report.json ({exc})"
    s, base = doc["summary"], env.baseline["summary"]
    if s["requests"] != 24:
        return f"requests={s['requests']}, expected 24"
    for key in ("ttft_mean_ms", "ttft_p50_ms", "ttft_p99_ms"):
        v = s.get(key)
        if not isinstance(v, (int, float)) or not 0 < v <= 2 * base[key]:
            return f"summary.{key} = {v!r} (baseline {base[key]!r})"
    return None


def _microbench_doc(env: Env) -> dict:
    return json.loads((env.golden / "microbench.json").read_text())


def _mb_with(d: Path, env: Env, mutate) -> list[str]:
    doc = _microbench_doc(env)
    mutate(doc)
    p = d / "mb.json"
    p.write_text(json.dumps(doc).replace('"NAN"', "NaN").replace('"INF"', "Infinity"))
    return _report(d, env, None, "--microbench", str(p))


def _tree(d: Path, src: Path, name: str) -> Path:
    dst = d / name
    shutil.copytree(src, dst)
    return dst


def _compare(d: Path, base: Path, cand: Path, *extra: str) -> list[str]:
    return ["compare", "--baseline", str(base), "--candidate", str(cand), "--out",
            str(d / "cmp"), *extra]


def _aiperf_json_with(d: Path, mutate) -> list[str]:
    b = _tree(d, SEED_AIPERF / "agg", "agg")
    p = b / "c1" / "profile_export_aiperf.json"
    doc = json.loads(p.read_text())
    mutate(doc)
    p.write_text(json.dumps(doc).replace('"NAN"', "NaN").replace('"INF"', "Infinity"))
    return _compare(d, b, SEED_AIPERF / "disagg")


def _pods_with(d: Path, mutate, nodes: bool = True) -> list[str]:
    doc = json.loads((SEED_DEPLOY / "pods.json").read_text())
    mutate(doc)
    p = d / "pods.json"
    p.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    argv = ["audit", "--pods", str(p)]
    return argv + (["--nodes", str(SEED_DEPLOY / "nodes.json")] if nodes else [])


def _set_gpus(doc, value):
    for item in doc["items"]:
        for c in item["spec"].get("containers", []):
            lim = (c.get("resources") or {}).get("limits") or {}
            if "nvidia.com/gpu" in lim:
                lim["nvidia.com/gpu"] = value


def _unschedule(doc):
    for item in doc["items"]:
        item["spec"].pop("nodeName", None)
        item["status"] = {"phase": "Pending"}


def _config(d: Path, text: str | bytes) -> Path:
    p = d / "config.json"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


QWEN_CFG = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024,
            "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
            "num_hidden_layers": 28, "torch_dtype": "bfloat16"}


def _cfg_with(**over) -> str:
    cfg = dict(QWEN_CFG)
    cfg.update(over)
    return json.dumps(cfg, ensure_ascii=False).replace('"NAN"', "NaN").replace('"INF"',
                                                                               "Infinity")


def _fifo(d: Path) -> Path:
    p = d / "pipe.jsonl"
    os.mkfifo(p)
    return p


def _sock(d: Path) -> Path:
    p = d / "sock.jsonl"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    s.close()
    return p


def _loop(d: Path) -> Path:
    a, b = d / "loop-a.jsonl", d / "loop-b.jsonl"
    a.symlink_to(b)
    b.symlink_to(a)
    return a


def _file(d: Path, name: str = "afile") -> Path:
    p = d / name
    p.write_text("not a folder\n")
    return p


def _dup_file(d: Path, env: Env) -> list[str]:
    t = _golden_copy(d, env)
    shutil.copy(t / "decode-0.jsonl", t / "decode-0-copy.jsonl")
    return _report(d, env, t)


def _jaeger_dup(d: Path, env: Env) -> list[str]:
    t = _golden_copy(d, env)
    # A Jaeger conversion of the same spans saved into the traces folder (the case).
    r = _kvprof(["traces", "convert", str(env.golden / "traces" / "prefill-0.jsonl"),
                 "--to", "jaeger", "--out", str(t / "prefill-0-jaeger.json")])
    if r.returncode != 0:
        raise RuntimeError(f"convert failed: {r.stderr}")
    return _report(d, env, t)


def _receive_and_send(d: Path, proc: subprocess.Popen) -> None:
    ready = d / "ready.json"
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    if not ready.exists():
        return
    doc = json.loads(ready.read_text())
    http = doc.get("http") or next((v for k, v in doc.items() if "http" in k), None)
    url = f"http://{http}/v1/traces" if not str(http).startswith("http") else f"{http}/v1/traces"
    body = Path(FIX / "dynamo_disagg" / "traces" / "received" /
                "received-23522-0000.jsonl").read_text().splitlines()
    for line in body[:40]:
        req = urllib.request.Request(url, data=line.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with contextlib.suppress(OSError):
            urllib.request.urlopen(req, timeout=5).read()


def _receive(d: Path, *extra: str, output: Path | None = None) -> list[str]:
    return ["traces", "receive", "--output", str(output or d / "recv"), "--grpc", "off",
            "--http", "127.0.0.1:0", "--ready-file", str(d / "ready.json"), *extra]


def _collect(d: Path, *extra: str) -> list[str]:
    return ["collect", "--no-nvml", "--listen", "", *extra]


# ClickHouse (kvprof.analysis.clickhouse): one chDB-backed server per corpus run, holding the
# golden traces in the exporter's otel_traces table plus an "other" and an "endless" table.
_CH: dict = {}
_CH_LOCK = threading.Lock()


def _clickhouse(env: Env, table: str = "otel_traces", *opts: str) -> str:
    """clickhouse:// URL of ``table`` on the corpus's server (tests/clickhouse_server.py),
    started on first use and stopped by corpus_env (or when this process's pipe closes)."""
    with _CH_LOCK:
        if "proc" not in _CH:
            proc = subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "clickhouse_server.py"), "--traces",
                 str(env.golden / "traces")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                text=True, start_new_session=True)
            _CH["proc"], _CH["port"] = proc, int(proc.stdout.readline().split()[1])
    q = "&".join((f"table={table}", *opts))
    return f"clickhouse://127.0.0.1:{_CH['port']}/otel?{q}"


def _stop_clickhouse() -> None:
    proc = _CH.pop("proc", None)
    if proc is not None:
        proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        proc.stdout.close()


def _closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the corpus -------------------------------------------------------------------------------

def cases() -> list[Case]:
    c: list[Case] = []
    add = c.append
    bad_types = {
        "resourceSpans-string": '{"resourceSpans": "x"}',
        "resourceSpans-object": '{"resourceSpans": {"a": 1}}',
        "scopeSpans-number": '{"resourceSpans": [{"scopeSpans": 5}]}',
        "spans-object": _otlp_line({"a": 1}),
        "span-list": _otlp_line([[1, 2]]),
        "start-list": _otlp_line([_span(startTimeUnixNano=[1])]),
        "attributes-number": _otlp_line([_span(attributes=5)]),
        "attribute-value-list": _otlp_line([_span(attributes=[{"key": "a", "value": [1]}])]),
        "resource-attrs-string": _otlp_line([_span()], resource_attrs="x"),
        "traceId-number": _otlp_line([_span(traceId=12)]),
        "jaeger-data-string": '{"data": "x"}',
        "jaeger-spans-number": '{"data": [{"traceID": "a", "spans": 3, "processes": {}}]}',
    }
    # deep nesting
    for depth in (2_000, 200_000):
        add(Case(f"report-traces-deep-{depth}-alone", "deep_nesting",
                 lambda d, e, depth=depth: _report(d, e, _traces_plus(d, e, "deep.jsonl",
                                                                      _deep(depth)) / "deep.jsonl"),
                 needle="deep.jsonl", outputs=("report.json",), timeout=90))
        add(Case(f"report-traces-deep-{depth}-in-dir", "deep_nesting",
                 lambda d, e, depth=depth: _report(d, e, _traces_plus(d, e, "deep.jsonl",
                                                                      _deep(depth))),
                 expect="warn", needle="deep.jsonl", outputs=("report.json",),
                 check=_same_summary, timeout=90))
    add(Case("convert-deep", "deep_nesting",
             lambda d, e: ["traces", "convert", str(_traces_plus(d, e, "deep.jsonl",
                                                                 _deep(200_000)) / "deep.jsonl"),
                           "--to", "jaeger", "--out", str(d / "out.json")],
             needle="deep.jsonl", outputs=("out.json",), timeout=90))
    add(Case("audit-pods-deep", "deep_nesting",
             lambda d, e: ["audit", "--pods", str(_config(d, "[" * 200_000 + "]" * 200_000))],
             needle="config.json"))
    add(Case("microbench-config-deep", "deep_nesting",
             lambda d, e: ["microbench", "--model-config",
                           str(_config(d, '{"a":' + "[" * 200_000 + "]" * 200_000 + "}")),
                           "--tokens", "16", *MB_SMALL], needle="config.json"))
    add(Case("report-microbench-deep", "deep_nesting",
             lambda d, e: _report(d, e, None, "--microbench",
                                  str(_config(d, "[" * 200_000 + "]" * 200_000))),
             needle="config.json", outputs=("report.json",)))
    add(Case("report-aiperf-deep", "deep_nesting",
             lambda d, e: _aiperf_report(d, e, "time_to_first_token", 0,
                                         raw='{"metadata":' + "[" * 200_000 + "]" * 200_000
                                         + "}"),
             expect="either", needle="profile_export.jsonl", outputs=("report.json",)))
    # wrong JSON types in traces: the bad file is skipped with a warning, the rest is right
    for name, text in bad_types.items():
        add(Case(f"report-traces-{name}", "wrong_json_types",
                 lambda d, e, text=text: _report(d, e, _traces_plus(d, e, "bad.jsonl", text)),
                 expect="warn", needle="bad.jsonl", outputs=("report.json",),
                 check=_same_summary))
    add(Case("convert-traces-wrong-types", "wrong_json_types",
             lambda d, e: ["traces", "convert", str(_config(d, bad_types["start-list"])),
                           "--to", "perfetto", "--out", str(d / "o.json")],
             needle="config.json", outputs=("o.json",)))
    add(Case("report-microbench-field-string", "wrong_json_types",
             lambda d, e: _mb_with(d, e, lambda m: m["steps"].__setitem__("transfer", "fast")),
             expect="either", needle="mb.json", outputs=("report.json",)))
    add(Case("report-microbench-geometry-list", "wrong_json_types",
             lambda d, e: _mb_with(d, e, lambda m: m.__setitem__("geometry", [1])),
             expect="either", needle="mb.json", outputs=("report.json",)))
    add(Case("report-microbench-links-string", "wrong_json_types",
             lambda d, e: _mb_with(d, e, lambda m: m.__setitem__("links", "ib")),
             expect="either", needle="mb.json", outputs=("report.json",)))
    add(Case("report-aiperf-metrics-string", "wrong_json_types",
             lambda d, e: _aiperf_report(d, e, "time_to_first_token", "fast"),
             expect="warn", needle="profile_export.jsonl", outputs=("report.json",),
             check=_one_ttft_dropped))
    add(Case("compare-aiperf-ttft-string", "wrong_json_types",
             lambda d, e: _aiperf_json_with(d, lambda j: j.__setitem__("time_to_first_token",
                                                                       "fast")),
             expect="either", needle="c1", outputs=("cmp/compare.json",)))
    add(Case("audit-pods-items-string", "wrong_json_types",
             lambda d, e: _pods_with(d, lambda p: p.__setitem__("items", "x"))))
    add(Case("audit-pods-spec-list", "wrong_json_types",
             lambda d, e: _pods_with(d, lambda p: p["items"][1].__setitem__("spec", [1])),
             expect="either", needle="pods.json"))
    add(Case("audit-pods-containers-string", "wrong_json_types",
             lambda d, e: _pods_with(d, lambda p: p["items"][1]["spec"].__setitem__(
                 "containers", "x")), expect="either", needle="pods.json"))
    add(Case("audit-pods-metadata-string", "wrong_json_types",
             lambda d, e: _pods_with(d, lambda p: p["items"][1].__setitem__("metadata", "x")),
             expect="either", needle="pods.json"))
    add(Case("audit-gpus-not-number", "wrong_json_types",
             lambda d, e: _pods_with(d, lambda p: _set_gpus(p, "many")),
             expect="warn", needle="many"))
    add(Case("microbench-config-wrong-type", "wrong_json_types",
             lambda d, e: ["microbench", "--model-config",
                           str(_config(d, _cfg_with(num_key_value_heads="big"))), "--tokens",
                           "16", *MB_SMALL], needle="num_key_value_heads"))
    add(Case("microbench-config-list", "wrong_json_types",
             lambda d, e: ["microbench", "--model-config", str(_config(d, "[1, 2]")),
                           "--tokens", "16", *MB_SMALL], needle="config.json"))
    # numbers out of range
    for label, value in (("nan", "NAN"), ("inf", "INF"), ("negative", -5.0), ("huge", 1e300)):
        add(Case(f"report-aiperf-ttft-{label}", "bad_numbers",
                 lambda d, e, value=value: _aiperf_report(
                     d, e, "time_to_first_token", value,
                     raw=None if not isinstance(value, str) else None),
                 expect="warn", needle="time_to_first_token", outputs=("report.json",),
                 check=_one_ttft_dropped))
        add(Case(f"report-microbench-gbps-{label}", "bad_numbers",
                 lambda d, e, value=value: _mb_with(
                     d, e, lambda m: m["steps"]["transfer"].__setitem__("gbps", value)),
                 expect="either", needle="gbps", outputs=("report.json",)))
        add(Case(f"compare-aiperf-ttft-{label}", "bad_numbers",
                 lambda d, e, value=value: _aiperf_json_with(
                     d, lambda j: j["time_to_first_token"].__setitem__("avg", value)),
                 expect="either", needle="time_to_first_token", outputs=("cmp/compare.json",)))
        add(Case(f"microbench-config-{label}", "bad_numbers",
                 lambda d, e, value=value: [
                     "microbench", "--model-config",
                     str(_config(d, _cfg_with(num_hidden_layers=value))), "--tokens", "16",
                     *MB_SMALL], needle="num_hidden_layers"))
    for label, num in (("huge", "1e300"), ("nan", "nan"), ("negative", "-3.5")):
        add(Case(f"report-vllm-log-{label}", "bad_numbers",
                 lambda d, e, num=num: _report(d, e, None, "--vllm-log", str(_config(
                     d, "KV Transfer metrics: Num successful transfers=3, Avg xfer time (ms)="
                     f"{num}, P90 xfer time (ms)=1.0, Avg post time (ms)=1.0, P90 post time "
                     "(ms)=1.0, Avg MB per transfer=70.0, Throughput (MB/s)=" + num +
                     ", Avg number of descriptors=56.0\n"))),
                 expect="either", needle="config.json", outputs=("report.json",)))
        add(Case(f"report-vllm-metrics-{label}", "bad_numbers",
                 lambda d, e, num=num: _report(d, e, None, "--vllm-metrics", str(_config(
                     d, f'vllm:nixl_xfer_time_seconds_sum{{engine="0"}} {num}\n'
                     'vllm:nixl_xfer_time_seconds_count{engine="0"} 3\n'
                     f'vllm:nixl_bytes_transferred_sum{{engine="0"}} {num}\n'
                     'vllm:nixl_bytes_transferred_count{engine="0"} 3\n'))),
                 expect="either", needle="config.json", outputs=("report.json",)))
    add(Case("report-traces-time-1e300", "bad_numbers",
             lambda d, e: _report(d, e, _traces_plus(d, e, "bad.jsonl", _otlp_line(
                 [_span(startTimeUnixNano="1e300", endTimeUnixNano="1e301")]))),
             expect="warn", needle="bad.jsonl", outputs=("report.json",), check=_same_summary))
    add(Case("report-traces-negative-time", "bad_numbers",
             lambda d, e: _report(d, e, _traces_plus(d, e, "bad.jsonl", _otlp_line(
                 [_span(startTimeUnixNano="-5", endTimeUnixNano="-1")]))),
             expect="warn", needle="bad.jsonl", outputs=("report.json",), check=_same_summary))
    add(Case("compare-folder-c0", "bad_numbers",
             lambda d, e: _compare(d, _ren(_tree(d, SEED_AIPERF / "agg", "agg"), "c1", "c0"),
                                   SEED_AIPERF / "disagg"),
             expect="either", needle="c0", outputs=("cmp/compare.json",)))
    add(Case("compare-folder-c-huge", "bad_numbers",
             lambda d, e: _compare(d, _ren(_tree(d, SEED_AIPERF / "agg", "agg"), "c1",
                                           "c" + "9" * 200), SEED_AIPERF / "disagg"),
             expect="either", needle="c999", outputs=("cmp/compare.json",)))
    add(Case("compare-concurrency-nan", "bad_numbers",
             lambda d, e: _aiperf_json_with(d, lambda j: j["input_config"]["phases"][0]
                                            .__setitem__("concurrency", "NAN")),
             expect="either", needle="concurrency", outputs=("cmp/compare.json",)))
    # Parquet
    add(Case("report-samples-truncated", "parquet",
             lambda d, e: _report(d, e, None, "--samples", str(_truncated_samples(d, e))),
             expect="warn", needle="gpu-node-1.parquet", outputs=("report.json",)))
    add(Case("report-samples-all-truncated", "parquet",
             lambda d, e: _report(d, e, None, "--samples", str(_truncated_samples(d, e, True))),
             needle="parquet", outputs=("report.json",)))
    for col, kind in (("value", "str"), ("ts", "str"), ("labels", "int"), ("node", "int")):
        add(Case(f"report-samples-{col}-as-{kind}", "parquet",
                 lambda d, e, col=col, kind=kind: _report(
                     d, e, None, "--samples", str(_retyped_samples(d, e, col, kind))),
                 expect="either", needle="gpu-node-1.parquet", outputs=("report.json",)))
    add(Case("audit-placement-truncated", "parquet",
             lambda d, e: _pods_with(d, lambda p: None) + [
                 "--placement", str(_truncated_samples(d, e, True))], needle="parquet"))
    # non-UTF-8
    add(Case("microbench-config-latin1", "non_utf8",
             lambda d, e: ["microbench", "--model-config",
                           str(_config(d, _cfg_with(model_type="caf\u00e9").encode("latin-1"))),
                           "--tokens", "16", *MB_SMALL], needle="config.json"))
    add(Case("report-traces-binary-file", "non_utf8",
             lambda d, e: _report(d, e, _traces_plus(d, e, "bin.jsonl", b"\xff\xfe\x00\x81" * 64)),
             expect="warn", needle="bin.jsonl", outputs=("report.json",), check=_same_summary))
    add(Case("report-dynamo-log-binary", "non_utf8",
             lambda d, e: _report(d, e, None, "--dynamo-log",
                                  str(_config(d, b"\xff\xfe\x81" * 50))),
             needle="request_end", outputs=("report.json",)))
    add(Case("report-dynamo-log-not-records", "non_utf8",
             lambda d, e: _report(d, e, None, "--dynamo-log", str(_config(
                 d, '{"schema": "dynamo.request.trace.v1", "request": 5}\nnot json\n'))),
             needle="request_end", outputs=("report.json",)))
    add(Case("report-vllm-log-binary", "non_utf8",
             lambda d, e: _report(d, e, None, "--vllm-log", str(_config(d, b"\xff\xfe\x81" * 50))),
             expect="either", needle="config.json", outputs=("report.json",)))
    add(Case("audit-pods-latin1", "non_utf8",
             lambda d, e: ["audit", "--pods", str(_config(d, b'{"items": [{"kind": "Pod", '
                                                             b'"metadata": {"name": '
                                                             b'"caf\xe9"}}]}'))],
             expect="either", needle="config.json"))
    # path kinds (inputs)
    for label, mk in (("fifo", _fifo), ("socket", _sock), ("symlink-loop", _loop)):
        add(Case(f"report-traces-{label}", "path_kinds",
                 lambda d, e, mk=mk: _report(d, e, mk(d)), outputs=("report.json",),
                 needle=str(label.split("-")[0]) if label != "symlink-loop" else "symbolic",
                 timeout=30))
        add(Case(f"report-microbench-{label}", "path_kinds",
                 lambda d, e, mk=mk: _report(d, e, None, "--microbench", str(mk(d))),
                 outputs=("report.json",), timeout=30))
        add(Case(f"microbench-config-{label}", "path_kinds",
                 lambda d, e, mk=mk: ["microbench", "--model-config", str(mk(d)), "--tokens",
                                      "16", *MB_SMALL], timeout=30))
        add(Case(f"audit-pods-{label}", "path_kinds",
                 lambda d, e, mk=mk: ["audit", "--pods", str(mk(d))], timeout=30))
        add(Case(f"convert-src-{label}", "path_kinds",
                 lambda d, e, mk=mk: ["traces", "convert", str(mk(d)), "--to", "otlp",
                                      "--out", str(d / "o.json")], outputs=("o.json",),
                 timeout=30))
        add(Case(f"report-vllm-log-{label}", "path_kinds",
                 lambda d, e, mk=mk: _report(d, e, None, "--vllm-log", str(mk(d))),
                 outputs=("report.json",), timeout=30))
        add(Case(f"report-dynamo-log-{label}", "path_kinds",
                 lambda d, e, mk=mk: _report(d, e, None, "--dynamo-log", str(mk(d))),
                 outputs=("report.json",), timeout=30))
    add(Case("report-traces-dev-stdin", "path_kinds",
             lambda d, e: _report(d, e, "/dev/stdin"), outputs=("report.json",), timeout=30))
    add(Case("microbench-config-dev-stdin", "path_kinds",
             lambda d, e: ["microbench", "--model-config", "/dev/stdin", "--tokens", "16",
                           *MB_SMALL], timeout=30))
    add(Case("report-microbench-is-dir", "path_kinds",
             lambda d, e: _report(d, e, None, "--microbench", str(d)), needle="director",
             outputs=("report.json",)))
    add(Case("microbench-config-is-dir", "path_kinds",
             lambda d, e: ["microbench", "--model-config", str(d), "--tokens", "16", *MB_SMALL],
             needle="director"))
    add(Case("report-samples-is-file", "path_kinds",
             lambda d, e: _report(d, e, None, "--samples", str(_file(d))), needle="afile",
             outputs=("report.json",)))
    add(Case("report-aiperf-is-file", "path_kinds",
             lambda d, e: _report(d, e, None, "--aiperf", str(_file(d))), expect="either",
             needle="afile", outputs=("report.json",)))
    add(Case("compare-baseline-is-file", "path_kinds",
             lambda d, e: _compare(d, _file(d), SEED_AIPERF / "disagg"), needle="afile"))
    add(Case("report-traces-under-file", "path_kinds",
             lambda d, e: _report(d, e, _file(d) / "traces"), needle="afile",
             outputs=("report.json",)))
    add(Case("audit-pods-under-file", "path_kinds",
             lambda d, e: ["audit", "--pods", str(_file(d) / "pods.json")], needle="afile"))
    add(Case("check-proc-is-file", "path_kinds",
             lambda d, e: ["check", "--proc", str(_file(d))], expect="either", needle="afile"))
    add(Case("check-proc-missing", "path_kinds",
             lambda d, e: ["check", "--proc", str(d / "nope")], expect="either", needle="nope"))
    # outputs that cannot be written
    outs = {
        "report": lambda d, e, o: ["report", "--traces", str(e.golden / "traces"), "--out", o],
        "convert": lambda d, e, o: ["traces", "convert", str(e.golden / "traces"), "--to",
                                    "jaeger", "--out", o],
        "audit": lambda d, e, o: _pods_with(d, lambda p: None) + ["--out", o],
        "microbench": lambda d, e, o: ["microbench", "--tokens", "16", *MB_SMALL, "--json", o],
        "compare": lambda d, e, o: ["compare", "--baseline", str(SEED_AIPERF / "agg"),
                                    "--candidate", str(SEED_AIPERF / "disagg"), "--out", o],
    }
    for cmd, argv in outs.items():
        if cmd != "compare":
            add(Case(f"{cmd}-out-is-dir", "unwritable_output",
                     lambda d, e, argv=argv: (d / "existing").mkdir() or argv(
                         d, e, str(d / "existing")), needle="existing"))
        add(Case(f"{cmd}-out-under-file", "unwritable_output",
                 lambda d, e, argv=argv: argv(d, e, str(_file(d) / "out" / "x.json")),
                 needle="afile"))
        add(Case(f"{cmd}-out-read-only", "unwritable_output",
                 lambda d, e, argv=argv: argv(d, e, str(e.ro_dir / d.name / "x.json")),
                 needle="read-only", needs="ro"))
        add(Case(f"{cmd}-full-disk-fsize", "full_disk",
                 lambda d, e, argv=argv: argv(d, e, str(d / "out" / "x.json")),
                 expect="fail", outputs=("out/x.json", "out"), fsize=4096))
        add(Case(f"{cmd}-full-disk-tmpfs", "full_disk",
                 lambda d, e, argv=argv: argv(d, e, str(_tiny_sub(e, d) / "x.json")),
                 expect="fail", needs="tinyfs"))
    add(Case("compare-out-is-file", "unwritable_output",
             lambda d, e: ["compare", "--baseline", str(SEED_AIPERF / "agg"), "--candidate",
                           str(SEED_AIPERF / "disagg"), "--out", str(_file(d))], needle="afile"))
    add(Case("collect-output-is-file", "unwritable_output",
             lambda d, e: _collect(d, "--output", str(_file(d)), "--duration", "1"),
             needle="afile", timeout=30))
    add(Case("collect-output-under-file", "unwritable_output",
             lambda d, e: _collect(d, "--output", str(_file(d) / "s"), "--duration", "1"),
             needle="afile", timeout=30))
    add(Case("collect-output-read-only", "unwritable_output",
             lambda d, e: _collect(d, "--output", str(e.ro_dir / "s"), "--duration", "1"),
             needle="read-only", timeout=30, needs="ro"))
    add(Case("collect-full-disk-fsize", "full_disk",
             lambda d, e: _collect(d, "--output", str(d / "s"), "--duration", "3",
                                   "--rotate", "1", "--interval", "0.05"),
             expect="fail", fsize=2048, timeout=40))
    add(Case("receive-output-is-file", "unwritable_output",
             lambda d, e: _receive(d, "--duration", "1", output=_file(d)), needle="afile",
             timeout=30))
    add(Case("receive-output-under-file", "unwritable_output",
             lambda d, e: _receive(d, "--duration", "1", output=_file(d) / "r"), needle="afile",
             timeout=30))
    add(Case("receive-full-disk-drops-spans", "full_disk",
             lambda d, e: _receive(d, "--duration", "6"), expect="fail", fsize=4096,
             during=_receive_and_send, timeout=40))
    add(Case("attach-output-is-file", "unwritable_output",
             lambda d, e: ["attach", "--exporter", "file", "--output", str(_file(d)), "--",
                           sys.executable, "-c", "pass"], needle="afile", timeout=60))
    # duplicates
    add(Case("report-duplicate-file", "duplicates", _dup_file, expect="warn",
             needle="decode-0-copy.jsonl", outputs=("report.json",), check=_same_summary))
    add(Case("report-duplicate-jaeger-conversion", "duplicates", _jaeger_dup, expect="warn",
             needle="prefill-0-jaeger.json", outputs=("report.json",), check=_same_summary))
    add(Case("convert-into-source-folder", "duplicates",
             lambda d, e: ["traces", "convert", str(_golden_copy(d, e)), "--to", "jaeger",
                           "--out", str(d / "traces" / "all.json")], needle="traces",
             outputs=("traces/all.json",)))
    # concurrency folders
    add(Case("compare-concurrency-folder-is-file", "concurrency_folders",
             lambda d, e: _compare(d, _file_for(_tree(d, SEED_AIPERF / "agg", "agg"), "c5"),
                                   SEED_AIPERF / "disagg"),
             expect="warn", needle="c5", outputs=("cmp/compare.json",)))
    add(Case("compare-concurrency-folder-empty", "concurrency_folders",
             lambda d, e: _compare(d, _empty_for(_tree(d, SEED_AIPERF / "agg", "agg"), "c5"),
                                   SEED_AIPERF / "disagg"),
             expect="warn", needle="c5", outputs=("cmp/compare.json",)))
    add(Case("audit-all-pods-unscheduled", "silent_warnings",
             lambda d, e: _pods_with(d, _unschedule), expect="warn", needle="schedul"))
    # numeric options
    opts = [
        ("collect", ["--duration", "nan"]), ("collect", ["--duration", "inf"]),
        ("collect", ["--duration", "-1"]), ("collect", ["--interval", "nan"]),
        ("collect", ["--interval", "0"]), ("collect", ["--rotate", "nan"]),
        ("collect", ["--rotate", "-5"]),
        ("receive", ["--duration", "nan"]), ("receive", ["--duration", "-1"]),
        ("receive", ["--max-bytes", "nan"]), ("receive", ["--max-bytes", "-5"]),
        ("receive", ["--max-queue-bytes", "0"]),
        ("microbench", ["--tokens", "0"]), ("microbench", ["--tokens", "-4"]),
        ("microbench", ["--iters", "0"]), ("microbench", ["--warmup", "-1"]),
        ("microbench", ["--block-size", "0"]), ("microbench", ["--decode-tp", "0"]),
        ("microbench", ["--sweep", "nan,16"]), ("microbench", ["--sweep", "16,-1"]),
        ("microbench", ["--tokens", "10000000000000"]),
        ("audit", ["--tokens", "-5"]), ("audit", ["--tokens", "0"]),
        ("compare", ["--gpus", "0", "--gpus", "2"]), ("compare", ["--gpus", "-1", "--gpus", "2"]),
        ("attach", ["--pid", "1", "--duration", "nan"]), ("attach", ["--pid", "1", "--rate", "0"]),
        ("attach", ["--pid", "-5"]), ("report", ["--lookback", "nan"]),
    ]
    for cmd, extra in opts:
        def build(d, e, cmd=cmd, extra=extra):
            if cmd == "collect":
                return _collect(d, "--output", str(d / "s"), *extra)
            if cmd == "receive":
                return _receive(d, *extra)
            if cmd == "microbench":
                base = ["microbench", *MB_SMALL]
                return base + (["--tokens", "16"] if "--tokens" not in extra
                               and "--sweep" not in extra else []) + extra
            if cmd == "audit":
                return _pods_with(d, lambda p: None) + extra
            if cmd == "compare":
                return ["compare", "--baseline", str(SEED_AIPERF / "agg"), "--candidate",
                        str(SEED_AIPERF / "disagg"), "--out", str(d / "cmp"), *extra]
            if cmd == "attach":
                return ["attach", *extra]
            return ["report", "--traces", "http://127.0.0.1:9/", "--service", "x",
                    "--out", str(d / "r.html"), *extra]
        add(Case(f"{cmd}{''.join(extra).replace('--', '-')}", "numeric_options", build,
                 expect="error", timeout=30))
    # Ctrl-C: "Interrupted." and exit 130, no half-written output
    add(Case("report-sigint", "signals", _big_report, expect="interrupted",
             outputs=("report.json",), during=_sigint_while_reading("big")))
    add(Case("compare-sigint", "signals", lambda d, e: _many_levels_compare(d),
             expect="interrupted", outputs=("cmp/compare.json",),
             during=_sigint_while_reading("big")))
    add(Case("microbench-decode-tp-too-large", "numeric_options",
             lambda d, e: ["microbench", *MB_SMALL, "--tokens", "16", "--decode-tp", "100000"],
             needle="--decode-tp", codes=(2, 3, 4), timeout=60))
    # Traces where fleets keep them (issue 24): ClickHouse unreachable, not there, of another
    # schema, too slow; --engine chdb meets malformed files as the pandas loader does.
    add(Case("report-clickhouse-unreachable", "clickhouse",
             lambda d, e: _report(d, e, f"clickhouse://127.0.0.1:{_closed_port()}/otel"),
             needle="cannot reach ClickHouse", codes=(4,), outputs=("report.json",)))
    add(Case("report-clickhouse-no-database-in-url", "clickhouse",
             lambda d, e: _report(d, e, "clickhouse://127.0.0.1:8123"),
             needle="no database", codes=(3,), outputs=("report.json",)))
    add(Case("report-clickhouse-no-such-table", "clickhouse",
             lambda d, e: _report(d, e, _clickhouse(e, "nope")),
             needle="has no table otel.nope", codes=(3,), outputs=("report.json",)))
    add(Case("report-clickhouse-other-schema", "clickhouse",
             lambda d, e: _report(d, e, _clickhouse(e, "other")),
             needle="not the OpenTelemetry Collector ClickHouse exporter's", codes=(3,),
             outputs=("report.json",)))
    add(Case("report-clickhouse-query-timeout", "clickhouse",
             lambda d, e: _report(d, e, _clickhouse(e, "endless", "timeout=1")),
             needle="did not finish reading", codes=(4,), outputs=("report.json",)))
    add(Case("report-clickhouse-empty-window", "clickhouse",
             lambda d, e: _report(d, e, _clickhouse(e), "--service", "no-such-service"),
             needle="no span kvprof reads", codes=(3,), outputs=("report.json",)))
    add(Case("report-clickhouse-table", "clickhouse",
             lambda d, e: _report(d, e, _clickhouse(e)), expect="warn", needle="Wrote",
             outputs=("report.json",), check=_same_summary))
    add(Case("report-engine-unknown", "clickhouse",
             lambda d, e: _report(d, e, None, "--engine", "spark"), needle="--engine",
             codes=(2,), outputs=("report.json",)))
    for name in ("start-list", "traceId-number", "resourceSpans-string", "jaeger-data-string"):
        add(Case(f"report-chdb-traces-{name}", "clickhouse",
                 lambda d, e, text=bad_types[name]: _report(
                     d, e, _traces_plus(d, e, "bad.jsonl", text), "--engine", "chdb"),
                 expect="warn", needle="bad.jsonl", outputs=("report.json",),
                 check=_same_summary))
    return c


def _ren(tree: Path, old: str, new: str) -> Path:
    (tree / old).rename(tree / new)
    return tree


def _file_for(tree: Path, name: str) -> Path:
    shutil.rmtree(tree / name)
    (tree / name).write_text("oops\n")
    return tree


def _empty_for(tree: Path, name: str) -> Path:
    shutil.rmtree(tree / name)
    (tree / name).mkdir()
    return tree


def _truncated_samples(d: Path, env: Env, all_files: bool = False) -> Path:
    s = _golden_copy(d, env, "samples")
    for p in sorted(s.glob("*.parquet")):
        if all_files or p.name == "gpu-node-1.parquet":
            p.write_bytes(p.read_bytes()[:400])
    return s


def _retyped_samples(d: Path, env: Env, col: str, kind: str) -> Path:
    import pandas as pd

    s = _golden_copy(d, env, "samples")
    p = s / "gpu-node-1.parquet"
    df = pd.read_parquet(p)
    df[col] = df[col].astype(str) if kind == "str" else range(len(df))
    df.to_parquet(p)
    return s


def _tiny_sub(env: Env, d: Path) -> Path:
    sub = env.tiny_fs / d.name
    sub.mkdir(exist_ok=True)
    # Fill the filesystem but for a few KiB, so the output fails part-way.
    # Fill the filesystem to the last byte: the output cannot be written.
    filler = env.tiny_fs / f".fill-{d.name}"
    with contextlib.suppress(OSError), filler.open("wb") as fh:
        fh.write(b"\0" * (1 << 20))
    return sub


# --- running ----------------------------------------------------------------------------------

def _kvprof(argv: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvprof", *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=kw.get("cwd"), errors="replace")


def _mount(target: Path, opts: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    target.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)],
                       capture_output=True)
    return r.returncode == 0


@contextlib.contextmanager
def corpus_env(root: Path | None = None):
    """The shared inputs (a golden scenario, its baseline report, root-only filesystems)."""
    from kvprof.analysis.scenario import write_scenario

    own = root is None
    root = Path(tempfile.mkdtemp(prefix="kvprof-bad-")) if own else root
    golden = root / "golden"
    write_scenario(golden)
    base = _kvprof(["report", "--traces", str(golden / "traces"), "--format", "json",
                    "--out", str(root / "baseline.json")])
    if base.returncode != 0:
        raise RuntimeError(f"baseline report failed: {base.stderr}")
    baseline = json.loads((root / "baseline.json").read_text())
    ro = root / "ro"
    ro_ok = _mount(ro, "ro,size=64k")
    tiny = root / "tiny"
    tiny_ok = _mount(tiny, "size=256k")
    try:
        yield Env(root=root, golden=golden, baseline=baseline, ro_dir=ro if ro_ok else None,
                  tiny_fs=tiny if tiny_ok else None)
    finally:
        _stop_clickhouse()
        for m, ok in ((ro, ro_ok), (tiny, tiny_ok)):
            if ok:
                subprocess.run(["umount", "-l", str(m)], capture_output=True)
        if own:
            shutil.rmtree(root, ignore_errors=True)


def _limit(fsize: int | None):
    def pre():
        # A shell's background job ignores SIGINT, and exec keeps that: undo it.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return pre


def _big_report(d: Path, env: Env) -> list[str]:
    """A report with enough spans (2,000 requests) that it is still working when Ctrl-C comes."""
    from kvprof.analysis.scenario import ScenarioSpec, write_scenario

    write_scenario(d / "big", ScenarioSpec(requests=2000), samples=False)
    return _report(d, env, d / "big" / "traces", "--aiperf", str(d / "big" / "aiperf"))


def _many_levels_compare(d: Path) -> list[str]:
    """A comparison of 1,500 concurrency levels a side: still reading its inputs when Ctrl-C
    comes (the seed's 7 levels took 0.9 s in all, and a fixed 0.8 s sleep raced its end)."""
    for side in ("agg", "disagg"):
        src = (SEED_AIPERF / side / "c1" / "profile_export_aiperf.json").read_bytes()
        for c in range(1, 1501):
            level = d / "big" / side / f"c{c}"
            level.mkdir(parents=True)
            (level / "profile_export_aiperf.json").write_bytes(src)
    return _compare(d, d / "big" / "agg", d / "big" / "disagg")


def _sigint_while_reading(subdir: str, timeout: float = 60.0):
    """Ctrl-C once the command has one of its input files open: its work is under way, so the
    signal tests the interrupt path, not a race with start-up or with a run already done
    (a fixed sleep did both on machines of other speeds)."""
    def during(d: Path, proc: subprocess.Popen) -> None:
        inputs = str(d / subdir)
        fds = Path(f"/proc/{proc.pid}/fd")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                if any(os.readlink(fd).startswith(inputs) for fd in fds.iterdir()):
                    break
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
    return during


def _leftovers(d: Path) -> list[str]:
    bad = []
    for p in d.rglob("*"):
        n = p.name
        if n.endswith(".tmp") or ".tmp." in n or (n.startswith(".") and "tmp" in n):
            bad.append(str(p.relative_to(d)))
    return bad


def run_case(case: Case, env: Env, d: Path) -> list[str]:
    """Run one case; the list of contract violations (empty: met)."""
    d.mkdir(parents=True, exist_ok=True)
    if case.needs == "ro" and env.ro_dir is None or case.needs == "tinyfs" and env.tiny_fs is None:
        return ["SKIP"]
    try:
        argv = case.build(d, env)
    except Exception as exc:  # a corpus bug must not hide the other cases
        return [f"corpus: cannot build the case ({type(exc).__name__}: {exc})"]
    before = {o: (d / o).exists() for o in case.outputs}
    cmd = [sys.executable, "-m", "kvprof", *argv]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", stdin=subprocess.DEVNULL, cwd=d,
                            preexec_fn=_limit(case.fsize), start_new_session=True)
    if case.during:
        case.during(d, proc)
    try:
        out, err = proc.communicate(timeout=case.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        return [f"hang (> {case.timeout:.0f} s)"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
    took = time.monotonic() - started
    r = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    problems: list[str] = []
    text = out + err
    if r.returncode < 0:
        problems.append(f"crash (signal {-r.returncode})")
    if "Traceback" in text:
        problems.append("traceback")
    if "internal error" in text:
        problems.append("internal error: " + next(
            (ln for ln in err.splitlines() if "internal error" in ln), "")[:160])
    errors = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    hints = [ln for ln in err.splitlines() if ln.startswith("Hint:")]
    contract_error = len(errors) == 1 and len(hints) == 1
    named = case.needle is None or case.needle.lower() in text.lower()
    if case.expect == "error":
        if r.returncode not in case.codes or not contract_error:
            problems.append(f"expected exit 2/3 with one Error+Hint, got rc={r.returncode}, "
                            f"{len(errors)} Error, {len(hints)} Hint")
    elif case.expect == "fail":
        if r.returncode == 0 or not contract_error:
            problems.append(f"expected non-zero exit with one Error+Hint, got "
                            f"rc={r.returncode}, {len(errors)} Error, {len(hints)} Hint")
    elif case.expect == "warn":
        if r.returncode != 0:
            problems.append(f"expected exit 0 with a warning, got rc={r.returncode}")
        elif not named:
            problems.append(f"exit 0 without naming {case.needle!r}")
    elif case.expect == "interrupted":
        if r.returncode == 0:
            pass  # finished before the signal came: the outputs are checked below
        elif r.returncode != 130 or "Interrupted." not in err:
            problems.append(f"Ctrl-C: expected exit 130 and 'Interrupted.', got "
                            f"rc={r.returncode}")
    elif case.expect == "either":
        if r.returncode == 0:
            if not named:
                problems.append(f"exit 0 without naming {case.needle!r} (silent)")
        elif r.returncode not in (2, 3) or not contract_error:
            problems.append(f"rc={r.returncode}, {len(errors)} Error, {len(hints)} Hint")
    if case.expect in ("error", "fail") and r.returncode != 0 and case.needle and not named:
        problems.append(f"error does not name {case.needle!r}")
    problems += [f"left behind: {p}" for p in _leftovers(d)]
    if env.tiny_fs is not None:
        problems += [f"left behind on tmpfs: {p}" for p in _leftovers(env.tiny_fs / d.name)
                     if (env.tiny_fs / d.name).exists()]
    for o in case.outputs:
        p = d / o
        if p.is_file() and not before[o]:
            if r.returncode != 0:
                problems.append(f"failed but wrote {o}")
            elif p.stat().st_size == 0:
                problems.append(f"0-byte {o}")
    if r.returncode == 0 and case.check and not problems:
        why = case.check(d, env, r)
        if why:
            problems.append("wrong answer: " + why)
    if problems:
        tail = " | ".join(err.strip().splitlines()[-3:])[:400]
        problems.append(f"[rc={r.returncode} {took:.1f}s] {tail}")
    return problems


def main(argv: list[str]) -> int:
    """Run the corpus (or cases whose name contains argv[0]); print counts per class."""
    from concurrent.futures import ThreadPoolExecutor

    only = argv[0] if argv else ""
    todo = [c for c in cases() if only in c.name or only == c.klass]
    per: dict[str, list[int]] = {}
    with corpus_env() as env, ThreadPoolExecutor(max_workers=int(os.environ.get("J", "3"))) as pool:
        def one(c: Case) -> tuple[Case, list[str]]:
            probs = run_case(c, env, env.root / "cases" / c.name)
            print(("FAIL " if probs and probs != ["SKIP"] else "ok   ") + c.name, flush=True)
            return c, probs
        results = list(pool.map(one, todo))
    for c, probs in results:
        if probs == ["SKIP"]:
            continue
        n = per.setdefault(c.klass, [0, 0])
        n[0] += 1
        n[1] += bool(probs)
        if probs:
            print(f"FAIL {c.klass:20s} {c.name}: " + "; ".join(probs))
    print()
    print(f"{'class':22s} cases failing")
    for k, (n, bad) in per.items():
        print(f"{k:22s} {n:5d} {bad:7d}")
    print(f"{'total':22s} {sum(n for n, _ in per.values()):5d} "
          f"{sum(b for _, b in per.values()):7d}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
