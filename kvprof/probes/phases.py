"""Classify sampled Python stacks of a vLLM process into the phases of serving a request.

A stack is a list of ``Frame`` (function qualname, file, line), outermost first, as py-spy
records them. Rules look at a frame's qualified name and its file separately, so neither a
path nor a name such as ``sched_yield`` can pass for the scheduler. Three tiers of rules,
each read innermost frame first; the first frame a tier recognises decides:

1. Specific code, tried in this order on each frame:
   - KV connector / NIXL: files under ``vllm/distributed/kv_transfer/`` or a ``nixl``
     package, names with ``nixl`` / ``KVConnector``, ``save_kv_layer``, ``start_load_kv``,
     ``wait_for_layer_load``, ``wait_for_save``. A wait with a connector frame further out
     counts here too: a worker waiting for its KV to move spends connector time, which is
     what kvprof measures.
   - idle / waiting: the thread waits for something to do or for someone else.
     vLLM: ``MessageQueue.acquire_read`` / ``acquire_write`` / ``recv`` /
     ``wait_until_ready`` and ``SpinCondition.wait`` (shm_broadcast.py), ``sched_yield``,
     ``spinloop``. After each read a worker's ``MessageQueue.dequeue`` spins (``check``,
     ``memory_fence``, ``sched_yield``) for ``busy_loop_s`` before it blocks in a zmq poll:
     spinning for work is still waiting for work. zmq ``Poller.poll`` / ``select`` /
     ``Socket.poll`` / ``Socket.recv*``; threading ``Condition.wait(_for)``, ``Event.wait``,
     ``Thread.join``, ``Semaphore.acquire``, ``Barrier.wait``; ``queue.Queue.get`` /
     ``join``; selectors ``*.select``; ``multiprocessing.connection`` recv / poll /
     ``wait``; blocking socket / ssl reads, ``subprocess`` waits, ``concurrent.futures``
     ``Future.result`` / ``wait``; torch.distributed ``barrier`` / ``recv``.
     Only as the innermost frame, because real work would show frames of its own below
     them: asyncio ``Runner.run`` / ``run_forever`` / ``run_until_complete`` and
     ``uvloop.run`` (an idle event loop), a ThreadPoolExecutor ``_worker`` (waiting for a
     work item).
   - sampling: files under ``vllm/v1/sample/``.
   - scheduler: files under ``vllm/v1/core/sched/``, the KV cache manager and block pool.
   - model forward: ``torch/nn/``, ``vllm/model_executor/``, attention backends.
   - idle / waiting, last: an innermost function whose own name says it sleeps or waits
     (``idle_wait``, ``_sleep``). py-spy shows a native call such as ``time.sleep`` as its
     Python caller, so a thread sleeping from a function with another name is "other".
2. Named steps: ``sample_tokens`` / ``_sample`` / ``compute_logits`` are sampling;
   ``forward`` / ``execute_model`` / ``_model_forward`` are model forward. Never a frame of
   the executor (``vllm/v1/executor/``): there ``execute_model`` hands the step to the
   worker process and waits for its answer.
3. Any other frame of the worker and its model runner (``vllm/v1/worker/``: input
   preparation, block tables) is model forward.

What none decides is "other": RPC dispatch, output hand-off, unpickling, stacks without
Python frames.

For a waiting stack, ``wait_site`` names where the thread waits as ``API <- caller``: the
outermost frame of the waiting machinery (stdlib, zmq, shm_broadcast) and the first frame
outside it, e.g. ``MessageQueue.dequeue <- WorkerProc.worker_busy_loop`` (a worker waiting
for its next step) or ``Queue.get <- EngineCoreProc._process_input_queue`` (an EngineCore
waiting for requests).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

PHASE_MODEL_FORWARD = "model forward"
PHASE_KV_CONNECTOR = "KV connector / NIXL"
PHASE_SCHEDULER = "scheduler"
PHASE_SAMPLING = "sampling"
PHASE_IDLE = "idle / waiting"
PHASE_OTHER = "other"
PHASES = (PHASE_MODEL_FORWARD, PHASE_KV_CONNECTOR, PHASE_SCHEDULER, PHASE_SAMPLING,
          PHASE_IDLE, PHASE_OTHER)


class Frame(NamedTuple):
    """One Python frame as py-spy reports it: qualified function name, file path, line."""

    name: str
    file: str
    line: int = 0

    def __str__(self) -> str:
        return f"{self.name} ({self.file}:{self.line})"


class _Rule(NamedTuple):
    name: re.Pattern | None
    file: re.Pattern | None

    def matches(self, frame: Frame) -> bool:
        file = frame.file.replace("\\", "/")
        return ((self.name is None or bool(self.name.search(frame.name)))
                and (self.file is None or bool(self.file.search(file))))


def _rule(name: str | None = None, file: str | None = None) -> _Rule:
    return _Rule(re.compile(name) if name else None, re.compile(file) if file else None)


_SHM = r"vllm/distributed/device_communicators/shm_broadcast\.py$"
_STDLIB = r"((^|/)lib/python3\.\d+/(?!(site|dist)-packages/)|^<frozen )"

_CONNECTOR = (
    _rule(file=r"vllm/distributed/kv_transfer/"),
    _rule(file=r"(^|/)nixl[^/]*/"),
    _rule(name=r"(?i)nixl|KVConnector|(^|\.)(save_kv_layer|start_load_kv|wait_for_layer_load|"
               r"wait_for_save|get_finished_kv_transfers)$"),
)
_WAIT = (
    _rule(r"^MessageQueue\.(acquire_read|acquire_write|recv|wait_until_ready)$", _SHM),
    _rule(r"^SpinCondition\.wait$", _SHM),
    _rule(r"^(sched_yield|spinloop)$", r"vllm/"),
    _rule(r"^(Poller\.poll|select|Socket\.(poll|recv\w*))$", r"(^|/)zmq/"),
    _rule(r"^(Condition\.wait(_for)?|Event\.wait|Thread\.join|Thread\._wait_for_tstate_lock|"
          r"Semaphore\.acquire|BoundedSemaphore\.acquire|Barrier\.wait)$", r"/threading\.py$"),
    _rule(r"^Queue\.(get|join)$", r"/queue\.py$"),
    _rule(r"\.select$", r"/selectors\.py$"),
    _rule(r"^(_ConnectionBase\.(recv\w*|poll)|Connection\._(recv\w*|poll)|wait|"
          r"PipeConnection\._(recv\w*|poll))$", r"/multiprocessing/connection\.py$"),
    _rule(r"^(socket\.accept|SocketIO\.readinto|SSLSocket\.(recv\w*|read))$",
          r"/(socket|ssl)\.py$"),
    _rule(r"^(Popen\.(wait|_wait|communicate|_communicate)|_try_wait)$", r"/subprocess\.py$"),
    _rule(r"^(Future\.result|_result_or_cancel|wait|as_completed)$",
          r"/concurrent/futures/_base\.py$"),
    _rule(r"^(barrier|monitored_barrier|recv)$", r"torch/distributed/distributed_c10d\.py$"),
)
# Waits recognised only as the innermost frame: below them runs either native waiting or
# real work in frames of its own.
_LEAF_WAIT = (
    _rule(r"^(Runner\.run|run|BaseEventLoop\.(run_forever|run_until_complete))$",
          r"/(asyncio/(runners|base_events)|uvloop/__init__)\.py$"),
    _rule(r"^_worker$", r"/concurrent/futures/thread\.py$"),
)
# Tried last on the innermost frame: py-spy shows a native time.sleep as its Python caller.
_SLEEPY_NAME = _rule(r"(^|\.)(_*\w*sleep\w*|_*(\w+_)?wait(_\w+)?)$")
_SAMPLING = (_rule(file=r"vllm/v1/sample/"),)
_SCHEDULER = (
    _rule(file=r"vllm/v1/core/sched/"),
    _rule(file=r"vllm/v1/core/(\w*kv_cache\w*|block_pool)\.py$"),
)
_FORWARD = (
    _rule(file=r"torch/nn/"),
    _rule(file=r"vllm/(model_executor|attention|v1/attention)/"),
)
# Named steps that contain other code: they decide only when no frame of the rules above
# does, so bookkeeping inside ``sample_tokens`` stays sampling.
_EXECUTOR = _rule(file=r"vllm/v1/executor/")
_NAMED_SAMPLING = _rule(r"(^|\.)(sample_tokens|_sample|compute_logits)$")
_NAMED_FORWARD = _rule(r"(^|\.)(forward|execute_model|_model_forward)$")
# Last: any other frame of the worker and its model runner (input preparation, block
# tables) is part of executing the model.
_WORKER = _rule(file=r"vllm/v1/worker/")
# The machinery a wait goes through on its way down (stdlib, zmq, vLLM's shm ring buffer):
# a wait site names the outermost frame of it and the first frame outside.
_WAIT_MACHINERY = (
    _rule(file=_STDLIB), _rule(file=r"(^|/)zmq/"), _rule(file=_SHM),
    _rule(r"^sched_yield$", r"vllm/distributed/utils\.py$"),
)


def _is_wait(frame: Frame, innermost: bool) -> bool:
    return (any(r.matches(frame) for r in _WAIT)
            or (innermost and any(r.matches(frame) for r in _LEAF_WAIT)))


def _specific_phase(frame: Frame, innermost: bool) -> str | None:
    if any(r.matches(frame) for r in _CONNECTOR):
        return PHASE_KV_CONNECTOR
    if _is_wait(frame, innermost):
        return PHASE_IDLE
    if any(r.matches(frame) for r in _SAMPLING):
        return PHASE_SAMPLING
    if any(r.matches(frame) for r in _SCHEDULER):
        return PHASE_SCHEDULER
    if any(r.matches(frame) for r in _FORWARD):
        return PHASE_MODEL_FORWARD
    if innermost and _SLEEPY_NAME.matches(frame):
        return PHASE_IDLE
    return None


def _named_phase(frame: Frame, innermost: bool) -> str | None:
    if _EXECUTOR.matches(frame):
        return None
    if _NAMED_SAMPLING.matches(frame):
        return PHASE_SAMPLING
    if _NAMED_FORWARD.matches(frame):
        return PHASE_MODEL_FORWARD
    return None


def _worker_phase(frame: Frame, innermost: bool) -> str | None:
    return PHASE_MODEL_FORWARD if _WORKER.matches(frame) else None


@lru_cache(maxsize=65536)
def _frame_phases(frame: Frame, innermost: bool) -> tuple[str | None, str | None, str | None]:
    """What each tier says of one frame (frames repeat: a profile holds few distinct ones)."""
    return (_specific_phase(frame, innermost), _named_phase(frame, innermost),
            _worker_phase(frame, innermost))


@lru_cache(maxsize=65536)
def _is_connector(frame: Frame) -> bool:
    return any(r.matches(frame) for r in _CONNECTOR)


def _deciding(frames: Sequence[Frame]) -> tuple[str, int]:
    """(phase, index of the deciding frame; -1 when none decides)."""
    last = len(frames) - 1
    said = [_frame_phases(f, i == last) for i, f in enumerate(frames)]
    for tier in range(3):
        for i in range(last, -1, -1):
            phase = said[i][tier]
            if phase is None:
                continue
            if phase == PHASE_IDLE and any(_is_connector(f) for f in frames[:i]):
                return PHASE_KV_CONNECTOR, i
            return phase, i
    return PHASE_OTHER, -1


_BOOTSTRAP = (
    _rule(r"^(_run_code|_run_module_as_main)$", r"runpy"),
    _rule(r"^Thread\.(run|_bootstrap|_bootstrap_inner)$", r"/threading\.py$"),
    _rule(r"^(BaseProcess\.(run|_bootstrap)|spawn_main|_main)$",
          r"/multiprocessing/(process|spawn)\.py$"),
)


def classify_stack(frames: Sequence[Frame]) -> str:
    """Phase of one stack, frames listed outermost first (as py-spy writes them)."""
    return _deciding(frames)[0]


def wait_site(frames: Sequence[Frame]) -> str | None:
    """Where a waiting stack waits, ``API <- caller``; None when the stack is not waiting."""
    phase, i = _deciding(frames)
    return _wait_site(frames, i) if phase == PHASE_IDLE else None


def _wait_site(frames: Sequence[Frame], i: int) -> str:
    j = i
    while j > 0 and not _is_bootstrap(frames[j - 1]) and (
            _is_wait(frames[j - 1], innermost=False)
            or any(r.matches(frames[j - 1]) for r in _WAIT_MACHINERY)):
        j -= 1
    api = frames[j].name
    if j == 0 or _is_bootstrap(frames[j - 1]):
        return api
    return f"{api} <- {frames[j - 1].name}"


def _is_bootstrap(frame: Frame) -> bool:
    return any(r.matches(frame) for r in _BOOTSTRAP)


def entry_function(frames: Sequence[Frame]) -> str | None:
    """The thread's own entry: the outermost frame past thread and process start-up."""
    for frame in frames:
        if not _is_bootstrap(frame) and frame.name != "<module>":
            return frame.name
    return None


def summarize_thread(stacks: Sequence[Sequence[Frame]]) -> dict:
    """Samples per phase, samples per wait site (most first) and the entry function."""
    phases = dict.fromkeys(PHASES, 0)
    waits: Counter[str] = Counter()
    entries: Counter[str] = Counter()
    for frames, n in Counter(map(tuple, stacks)).items():
        phase, i = _deciding(frames)
        phases[phase] += n
        if phase == PHASE_IDLE:
            waits[_wait_site(frames, i)] += n
        entry = entry_function(frames)
        if entry:
            entries[entry] += n
    return {"samples": len(stacks), "phases": phases,
            "waits": [{"site": s, "samples": n} for s, n in waits.most_common()],
            "entry": entries.most_common(1)[0][0] if entries else None,
            "no_python_frames": sum(1 for f in stacks if not f)}
