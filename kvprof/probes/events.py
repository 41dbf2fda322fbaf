"""The hot-path event vocabulary: tuples of (kind, ...) with timestamps and a few ints.

Hooks append these to a buffer and return; everything else (span objects, ids, attributes)
is built later, off vLLM's critical path, by the assembler.
"""

from __future__ import annotations

# Scheduler process (EngineCore)
# (ARRIVE, req, t, arrival_ns, prompt_tokens, kv_params | None, traceparent | None): t is when
# the scheduler got the request; the traceparent comes from the request's trace headers.
ARRIVE = 1
SCHEDULED = 2  # (SCHEDULED, req, t)
FIRST_TOKEN = 3  # (FIRST_TOKEN, req, step_start_ns, t)
FINISH = 4  # (FINISH, req, t, status): status the RequestStatus name (FINISHED_ABORTED...)
KV_WAIT = 5  # (KV_WAIT, req, t, external_tokens): KV will arrive asynchronously
KV_READY = 6  # (KV_READY, req, t): scheduler saw finished_recving
HOLD = 7  # (HOLD, req, t): blocks kept for the decode side
RELEASED = 8  # (RELEASED, req, t): scheduler saw finished_sending
# (STEP, (t_sched, t_sched_end, running, waiting, kv_free, kv_total) | None, t_update,
#  t_update_end, scheduler_output, kv_connector_output | None): one EngineCore step. The
# objects are vLLM's own, done with by then; the export thread reads their counts.
STEP = 9
# Worker process
LOAD_START = 20  # (LOAD_START, req, t, blocks, remote_req, remote_engine, remote_host, handshake)
LOAD_DONE = 21  # (LOAD_DONE, req, t, ok): ok False when NIXL reported the receive failed
HANDSHAKE = 22  # (HANDSHAKE, engine_id, t0, t1, ok)
XFER_STATS = 23  # (XFER_STATS, t, bytes[], descriptors[], durations_s[])
SERIALIZE = 24  # (SERIALIZE, req, t0, t1, nbytes, tokens)
DESERIALIZE = 25  # (DESERIALIZE, req, t0, t1, nbytes, tokens)
LEASE_EXPIRED = 26  # (LEASE_EXPIRED, req, t, retrieved_by): prefill released unpulled KV
REQ_TRACE = 27  # (REQ_TRACE, req, traceparent): the trace a request's worker-side spans join
# (XFER_TELEMETRY, req, t_wall_ns, t_mono_ns, start_us, post_us, xfer_us, bytes, descs):
# NIXL's getXferTelemetry of one finished transfer handle of a KV load (start_us on the
# steady clock, which t_wall_ns / t_mono_ns, read together, place on the wall clock).
XFER_TELEMETRY = 28
# (XFER_POLL, t, req ids still in flight after the poll): a worker poll of its KV loads.
XFER_POLL = 29
# API-server process (vLLM's OpenAI frontend, or a Dynamo worker hosting AsyncLLM)
# One list per HTTP request (or per engine call outside one), emitted when it starts and
# filled in place until its end time is set; positions and meaning in api_hooks' docstring.
API = 30
# (ENGINE_DEAD, t): AsyncLLM's output handler failed (its EngineCore died) at t; the HTTP
# requests whose responses had not ended by then are the ones the death hit.
ENGINE_DEAD = 31
# Process facts (rare)
CONNECTOR = 40  # (CONNECTOR, class_name, profile, kv_role, engine_id)
KV_LAYOUT = 41  # (KV_LAYOUT, bytes_per_block, block_size, layers)
