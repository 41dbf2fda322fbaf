"""Classify sampled Python stacks of a vLLM worker into the phases of serving a request."""

from __future__ import annotations

import re

PHASE_MODEL_FORWARD = "model forward"
PHASE_KV_CONNECTOR = "KV connector / NIXL"
PHASE_SCHEDULER = "scheduler"
PHASE_SAMPLING = "sampling"
PHASE_IDLE = "idle / waiting"
PHASE_OTHER = "other"
PHASES = (PHASE_MODEL_FORWARD, PHASE_KV_CONNECTOR, PHASE_SCHEDULER, PHASE_SAMPLING,
          PHASE_IDLE, PHASE_OTHER)

# A stack is idle when its innermost Python frame is a blocking call (py-spy shows the
# Python caller of a native wait). Otherwise frames are checked innermost first, so a
# connector call inside a forward pass counts as the connector.
_IDLE = re.compile(r"^(\w*sleep|select|poll|epoll\w*|\w*wait\w*|recv\w*|_recv\w*|"
                   r"acquire\w*|dequeue|get|accept|readline|read_from_socket)\b", re.I)
_RULES: tuple[tuple[str, re.Pattern], ...] = (
    (PHASE_KV_CONNECTOR, re.compile(r"kv_transfer|kv_connector|nixl|save_kv_layer|"
                                    r"start_load_kv|handshake", re.I)),
    (PHASE_SAMPLING, re.compile(r"sampler|sample_tokens|\bsample\b|logits_processor|"
                                r"compute_logits|top_k|top_p", re.I)),
    (PHASE_SCHEDULER, re.compile(r"sched|scheduler|update_from_output|kv_cache_manager|"
                                 r"block_pool|allocate_slots", re.I)),
    (PHASE_MODEL_FORWARD, re.compile(r"forward|model_runner|execute_model|torch/nn/|"
                                     r"attention|_call_impl|\bmlp\b|rotary|rms_norm", re.I)),
)


def classify_stack(frames: list[str]) -> str:
    """Phase of one stack, frames listed outermost first (as py-spy writes them)."""
    if frames and _IDLE.search(frames[-1]):
        return PHASE_IDLE
    for frame in reversed(frames):
        for phase, pattern in _RULES:
            if pattern.search(frame):
                return phase
    return PHASE_OTHER


def summarize_phases(samples: list[tuple[list[str], float]]) -> dict[str, float]:
    """Total weight per phase (every phase present, zero when unseen)."""
    totals = dict.fromkeys(PHASES, 0.0)
    for frames, weight in samples:
        totals[classify_stack(frames)] += weight
    return totals
