"""Test-only: known delays slipped into a real vLLM engine at named places (issue 19).

Put on PYTHONPATH of an engine by tests/probes/test_known_delays.py (kvprof attach's own
sitecustomize chains to this one). Does nothing unless KVPROF_TEST_DELAYS_FILE names a JSON
file {place: milliseconds}; the file is re-read when it changes, so one engine pair serves
every place in turn. Places:

- ``post``: decode worker, before each KV read is handed to NIXL (the pull worker's
  _read_blocks_for_req).
- ``notice``: decode worker, after a poll in which NIXL saw a KV load done, before the
  connector reports it (_pop_done_transfers).
- ``decode_first_step``: decode worker, a step that carries a new request (execute_model).
- ``prefill_step``: prefill worker, a step that carries a new request (execute_model).
- ``decode_intake``: decode EngineCore, before the scheduler takes a request (add_request).
- ``cpu_hog``: decode worker, after the compute of a step that carries a new request: asks
  the CPU hog (tests/probes/delay_site/cpu_hog.py, a real-time busy loop pinned to this
  engine's core, listening on the FIFO named by KVPROF_TEST_HOG_FIFO) to take the core for
  that many ms. The worker is runnable all along: the time is a run-queue wait, not a sleep.
"""

import json
import os
import time

_FILE = os.environ.get("KVPROF_TEST_DELAYS_FILE")
_cache = {"mtime": None, "delays": {}}


def _delay(place):
    try:
        st = os.stat(_FILE)
        if st.st_mtime_ns != _cache["mtime"]:
            with open(_FILE) as fh:
                _cache["delays"] = json.load(fh)
            _cache["mtime"] = st.st_mtime_ns
    except (OSError, ValueError):
        return
    ms = _cache["delays"].get(place)
    if ms:
        time.sleep(ms / 1000)


def _hog(place):
    """Hand the core to the CPU hog for the place's ms (it preempts this thread at once)."""
    ms = _cache["delays"].get(place)
    fifo = os.environ.get("KVPROF_TEST_HOG_FIFO")
    if not ms or not fifo:
        return
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    try:
        os.write(fd, f"{float(ms)}\n".encode())
    finally:
        os.close(fd)


def _role():
    cfg = os.environ.get("KVPROF_TEST_ROLE", "")
    return cfg


def _patch_pull_worker(module):
    cls = module.NixlPullConnectorWorker
    read = cls._read_blocks_for_req

    def _read_blocks_for_req(self, *args, **kwargs):
        _delay("post")
        return read(self, *args, **kwargs)

    cls._read_blocks_for_req = _read_blocks_for_req


def _patch_worker(module):
    cls = module.NixlBaseConnectorWorker
    pop = cls._pop_done_transfers

    def _pop_done_transfers(self, transfers, *args, **kwargs):
        out = pop(self, transfers, *args, **kwargs)
        if transfers is getattr(self, "_recving_transfers", None) and out and out[0]:
            _delay("notice")
        return out

    cls._pop_done_transfers = _pop_done_transfers


def _patch_runner(module):
    cls = module.GPUModelRunner
    execute = cls.execute_model

    def execute_model(self, scheduler_output, *args, **kwargs):
        out = execute(self, scheduler_output, *args, **kwargs)
        # After the step's compute: a sleep before it would also leave the CPU's compute
        # threads cold for it (tens of ms more on this machine than was injected).
        if scheduler_output.scheduled_new_reqs:
            _delay("decode_first_step" if _role() == "decode" else "prefill_step")
            if _role() == "decode":
                _hog("cpu_hog")
        return out

    cls.execute_model = execute_model


def _patch_scheduler(module):
    cls = module.Scheduler
    add = cls.add_request

    def add_request(self, request, *args, **kwargs):
        if _role() == "decode":
            _delay("decode_intake")
        return add(self, request, *args, **kwargs)

    cls.add_request = add_request


if _FILE:
    import wrapt

    wrapt.register_post_import_hook(
        _patch_worker, "vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_worker")
    wrapt.register_post_import_hook(
        _patch_pull_worker, "vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_worker")
    wrapt.register_post_import_hook(_patch_runner, "vllm.v1.worker.gpu_model_runner")
    wrapt.register_post_import_hook(_patch_scheduler, "vllm.v1.core.sched.scheduler")
