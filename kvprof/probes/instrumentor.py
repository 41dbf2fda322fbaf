"""VllmInstrumentor: BaseInstrumentor-style instrument()/uninstrument() for vLLM.

Why plain functions instead of wrapt's FunctionWrapper: a method reached through an instance
makes wrapt build a BoundFunctionWrapper on every call and then call the wrapper with packed
(args, kwargs); measured here that dispatch alone cost 2-4 us per call, above the whole
per-hook budget. A plain function on the class binds like any method (no proxy object) and
calls the original in the same frame. What wrapt gave is kept: ``__wrapped__`` points at the
original, instrument()/uninstrument() are idempotent, the originals are restored exactly
(the very object back in the class ``__dict__``, or the attribute removed when it was
inherited), and wrapt's post-import hooks still wrap modules imported later.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any

import wrapt

from kvprof.probes import api_hooks, hooks, lifecycle, method_probes
from kvprof.probes import events as ev
from kvprof.probes.config import ENV_STATS_DIR

log = logging.getLogger(__name__)

MIN_VLLM = (0, 30)


@dataclass(frozen=True)
class Target:
    """One method to wrap: module, dotted attribute path inside it, and the hook factory."""

    module: str
    path: str
    wrapper: Any  # hooks.HookFactory: original function -> probe function
    # Attributes the probe reads on instances, given these defaults on the method's class
    # (restored like the method on uninstrument).
    class_defaults: tuple[tuple[str, Any], ...] = ()


SCHED = "vllm.v1.core.sched.scheduler"
FACTORY = "vllm.distributed.kv_transfer.kv_connector.factory"
RUNNER = "vllm.v1.worker.gpu_model_runner"
NIXL_WORKER = "vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_worker"
ASYNC_LLM = "vllm.v1.engine.async_llm"
CORE_CLIENT = "vllm.v1.engine.core_client"
OUTPUT_PROCESSOR = "vllm.v1.engine.output_processor"
# uvicorn's HTTP implementations (vLLM's API server runs on uvicorn; which one depends on
# what is installed): each has a RequestResponseCycle whose send writes the response.
UVICORN_HTTP = ("httptools_impl", "h11_impl", "zttp_impl", "zttp_h2_impl")


def _resolve(module: Any, path: str) -> tuple[Any, str]:
    owner = module
    parts = path.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    return owner, parts[-1]


def _version_tuple(version: str) -> tuple[int, ...]:
    out = []
    for part in version.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


class VllmInstrumentor:
    """Wraps vLLM's scheduler, model runner and KV connectors; restores them exactly.

    Modules not imported yet are wrapped when they are (post-import hooks), so instrument()
    can run in a sitecustomize before vLLM exists in the process.
    """

    _instruments = ("vllm >= 0.30",)

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.is_instrumented = False
        # (owner, name, was in owner.__dict__, original __dict__ value)
        self._patched: list[tuple[Any, str, bool, Any]] = []
        self._connector_classes: set[type] = set()
        self._warned: set[str] = set()
        self._hooks_registered: set[str] = set()

    def targets(self) -> list[Target]:
        return [
            Target(SCHED, "Scheduler.add_request", hooks.scheduler_add_request),
            Target(SCHED, "Scheduler.schedule", hooks.scheduler_schedule),
            Target(SCHED, "Scheduler.update_from_output", hooks.scheduler_update_from_output),
            Target(SCHED, "Scheduler.finish_requests", hooks.scheduler_finish_requests),
            Target(SCHED, "Scheduler._free_request", hooks.scheduler_free_request),
            Target(FACTORY, "KVConnectorFactory.create_connector", self._create_connector),
            Target(RUNNER, "GPUModelRunner.execute_model", hooks.runner_execute_model),
            Target(NIXL_WORKER, "NixlBaseConnectorWorker._nixl_handshake", hooks.nixl_handshake),
            Target(NIXL_WORKER, "NixlBaseConnectorWorker._reap_expired_send_leases",
                   hooks.nixl_reap_expired_send_leases),
            # The transfer split: which request each finished NIXL handle belongs to, and
            # NIXL's own telemetry of it (post, transfer durations).
            Target(NIXL_WORKER, "NixlBaseConnectorWorker._pop_done_transfers",
                   hooks.nixl_pop_done_transfers),
            # nixl is a meta package: nixl._api is nixl_cu12._api / nixl_cu13._api (an
            # alias in sys.modules, which fires no import hook of its own) or nixl_rocm's.
            *(Target(f"{pkg}._api", "nixl_agent.get_xfer_telemetry",
                     hooks.nixl_get_xfer_telemetry)
              for pkg in ("nixl", "nixl_cu12", "nixl_cu13", "nixl_rocm")),
            # The API-server process: HTTP intake, hand-off to the EngineCore, first output.
            Target("fastapi.applications", "FastAPI.build_middleware_stack",
                   api_hooks.starlette_build_middleware_stack),
            Target("starlette.applications", "Starlette.build_middleware_stack",
                   api_hooks.starlette_build_middleware_stack),
            Target(ASYNC_LLM, "AsyncLLM.add_request", api_hooks.async_llm_add_request),
            Target(CORE_CLIENT, "AsyncMPClient.add_request_async",
                   api_hooks.core_client_add_request_async),
            Target(CORE_CLIENT, "DPAsyncMPClient.add_request_async",
                   api_hooks.core_client_add_request_async),
            *(Target(f"uvicorn.protocols.http.{impl}", "RequestResponseCycle.send",
                     api_hooks.uvicorn_cycle_send, ((api_hooks.CYCLE_ATTR, None),))
              for impl in UVICORN_HTTP),
            Target(OUTPUT_PROCESSOR, "OutputProcessor.process_outputs",
                   api_hooks.output_processor_process_outputs),
            Target(OUTPUT_PROCESSOR, "OutputProcessor.propagate_error",
                   api_hooks.output_processor_propagate_error),
            # A parent reaping a child (EngineCore -> worker, API server -> EngineCore) notes
            # its exit code: how a SIGKILL or SIGILL death becomes known.
            Target("multiprocessing.popen_fork", "Popen.poll",
                   lifecycle.popen_poll(os.environ.get(ENV_STATS_DIR))),
        ]

    # -- public API -------------------------------------------------------------------------
    def instrument(self, emit: Any = None) -> None:
        """Wrap every target (now or on import). Calling it again does nothing."""
        with self._lock:
            if self.is_instrumented:
                return
            if not self._version_ok():
                return
            hooks.set_emit(emit)
            self.is_instrumented = True
            for target in self.targets():
                if target.module in sys.modules:
                    self._apply(target, sys.modules[target.module])
                elif target.module not in self._hooks_registered:
                    self._hooks_registered.add(target.module)
                    wrapt.register_post_import_hook(self._on_import, target.module)

    def uninstrument(self) -> None:
        """Put every original back exactly as it was. Calling it again does nothing."""
        with self._lock:
            if not self.is_instrumented:
                return
            for owner, name, was_own, original in reversed(self._patched):
                method_probes.remove_globals(owner.__dict__.get(name))
                if was_own:
                    setattr(owner, name, original)
                else:
                    delattr(owner, name)
            self._patched.clear()
            self._connector_classes.clear()
            hooks.set_emit(None)
            hooks.reset_state()
            api_hooks.reset_state()
            self.is_instrumented = False

    # -- internals --------------------------------------------------------------------------
    def _version_ok(self) -> bool:
        mod = sys.modules.get("vllm")
        version = getattr(mod, "__version__", None) if mod else None
        if version is None:
            from kvprof.probes.recorder import vllm_version

            version = vllm_version()
        if version is None:
            return True  # not installed yet / unknown: the hooks below still check each name
        if version != "dev" and _version_tuple(version) < MIN_VLLM:
            self._warn_once("version", "kvprof: vLLM %s is older than the supported %s; "
                            "probes disabled", version, self._instruments[0])
            return False
        return True

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def _on_import(self, module: Any) -> None:
        with self._lock:
            if not self.is_instrumented:
                return
            for target in self.targets():
                if target.module == module.__name__:
                    self._apply(target, module)

    def _apply(self, target: Target, module: Any) -> None:
        try:
            owner, name = _resolve(module, target.path)
        except AttributeError:
            owner, name = None, target.path
        if self._wrap(owner, name, target.wrapper, f"{target.module}.{target.path}"):
            for attr, value in target.class_defaults:
                if attr not in owner.__dict__:
                    self._patched.append((owner, attr, False, None))
                    setattr(owner, attr, value)

    def _wrap(self, owner: Any, name: str, factory: Any, label: str) -> bool:
        try:
            # The descriptor itself (function, classmethod...), found along the MRO.
            raw = inspect.getattr_static(owner, name) if owner is not None else None
        except AttributeError:
            raw = None
        if raw is None:
            # This vLLM has no such method: skip that hook alone, say so once.
            self._warn_once(label, "kvprof: %s not found in this vLLM; that hook is skipped",
                            label)
            return False
        if _is_probe(raw):
            return True  # already ours
        if isinstance(raw, staticmethod) or not (isinstance(raw, classmethod) or callable(raw)):
            self._warn_once(label, "kvprof: %s is not a method kvprof can hook; that hook is "
                            "skipped", label)
            return False
        try:
            if isinstance(raw, classmethod):
                probe: Any = classmethod(_make_probe(raw.__func__, factory))
            else:
                probe = _make_probe(raw, factory)
        except Exception:
            # This runs inside vLLM's import of the module (a post-import hook): a probe
            # that cannot be made costs that hook, never the import.
            log.warning("kvprof: could not hook %s; that hook is skipped", label,
                        exc_info=True)
            return False
        own = owner.__dict__
        self._patched.append((owner, name, name in own, own.get(name)))
        setattr(owner, name, probe)
        return True

    def _create_connector(self, wrapped: Any) -> Any:
        """Hook factory for the KVConnectorFactory.create_connector classmethod."""

        def create_connector(cls, *args, **kwargs):
            connector = wrapped(cls, *args, **kwargs)
            try:
                self.instrument_connector(connector, args[0] if args else kwargs.get("config"))
            except Exception:
                hooks._hook_failed("KVConnectorFactory.create_connector")
            return connector

        return create_connector

    def instrument_connector(self, connector: Any, vllm_config: Any = None) -> None:
        """Wrap the hook set of this connector's class (once per class) and note its facts."""
        cls = type(connector)
        profile = hooks.connector_profile(cls)
        with self._lock:
            if not self.is_instrumented:
                return
            if cls not in self._connector_classes:
                self._connector_classes.add(cls)
                for name, wrapper in hooks.PROFILES[profile].items():
                    if name in ("request_finished", "request_finished_all_groups",
                                "register_kv_caches") and not hasattr(cls, name):
                        continue  # optional: either name is enough
                    self._wrap(cls, name, wrapper, f"{cls.__name__}.{name}")
        kv = getattr(vllm_config, "kv_transfer_config", None)
        hooks._EMIT((ev.CONNECTOR, cls.__name__, profile, getattr(kv, "kv_role", None),
                     getattr(kv, "engine_id", None)))


def _make_probe(original: Any, factory: Any) -> Any:
    """The probe function for ``original``, looking like it (name, doc, ``__wrapped__``)."""
    probe = factory(original)
    functools.update_wrapper(probe, original)
    probe.__kvprof_probe__ = True
    return probe


def _is_probe(raw: Any) -> bool:
    func = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
    return getattr(func, "__kvprof_probe__", False) is True


_INSTRUMENTOR: VllmInstrumentor | None = None


def get_instrumentor() -> VllmInstrumentor:
    """The process-wide instrumentor (instrument() on it is idempotent)."""
    global _INSTRUMENTOR
    if _INSTRUMENTOR is None:
        _INSTRUMENTOR = VllmInstrumentor()
    return _INSTRUMENTOR
