"""The span table: its columns, the attributes they come from, and the final dtypes.

One row per span, built column-wise so a million spans stay cheap:

=================  ========  ==========================================================
column             dtype     meaning
=================  ========  ==========================================================
trace_id           str       32 lowercase hex
span_id            str       16 lowercase hex
parent_span_id     str       "" for a root
name               category  span name (kvprof.semconv SPAN_*)
start_ns, end_ns   int64     epoch nanoseconds, on the clock of the host that recorded it
service, host      category  resource service.name / host.name
pid                float64   resource process.pid (NaN when absent)
role, request_id, remote_request_id, engine_id, remote_engine_id, remote_host, connector,
kv_path, pod, namespace, node, gpu_uuid
                   str/cat   the kvprof.* / kv.* / k8s.* attributes (span first, then resource)
kv_bytes, kv_blocks, kv_descriptors, prompt_tokens, dynamo_ttft_ms, vllm_ttft_s,
vllm_queue_s, vllm_prefill_s, busy_ns, idle_ns
                   float64   numeric attributes (NaN when absent)
clock              category  the clock domain: node, else host, else service
source             category  file the span came from
=================  ========  ==========================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvprof import semconv as sc

if TYPE_CHECKING:
    import pandas as pd

ATTR_COLUMNS: dict[str, str] = {
    sc.ATTR_ROLE: "role",
    sc.ATTR_REQUEST_ID: "request_id",
    sc.ATTR_REMOTE_REQUEST_ID: "remote_request_id",
    sc.ATTR_ENGINE_ID: "engine_id",
    sc.ATTR_KV_REMOTE_ENGINE_ID: "remote_engine_id",
    sc.ATTR_KV_REMOTE_HOST: "remote_host",
    sc.ATTR_KV_CONNECTOR: "connector",
    sc.ATTR_KV_PATH: "kv_path",
    sc.ATTR_K8S_POD_NAME: "pod",
    sc.ATTR_K8S_NAMESPACE: "namespace",
    sc.ATTR_K8S_NODE_NAME: "node",
    sc.ATTR_GPU_UUID: "gpu_uuid",
    sc.ATTR_KV_BYTES: "kv_bytes",
    sc.ATTR_KV_BLOCKS: "kv_blocks",
    sc.ATTR_KV_DESCRIPTORS: "kv_descriptors",
    sc.ATTR_PROMPT_TOKENS: "prompt_tokens",
    sc.ATTR_X_REQUEST_ID: "x_request_id",
    "x_request_id": "x_request_id",  # NVIDIA Dynamo's frontend and workers
    "http.request.header.x-request-id": "x_request_id",
    "request_id": "foreign_request_id",  # Dynamo's own id (vLLM's request id in its workers)
    "gen_ai.request.id": "foreign_request_id",  # vLLM's llm_request span
    sc.ATTR_DYNAMO_TTFT_MS: "dynamo_ttft_ms",
    sc.ATTR_VLLM_TTFT_S: "vllm_ttft_s",
    sc.ATTR_VLLM_QUEUE_S: "vllm_queue_s",
    sc.ATTR_VLLM_PREFILL_S: "vllm_prefill_s",
    sc.ATTR_DYNAMO_BUSY_NS: "busy_ns",
    sc.ATTR_DYNAMO_IDLE_NS: "idle_ns",
    "component": "component",  # Dynamo worker component (prefill / backend)
    sc.ATTR_FAILURE: "failure",
    sc.ATTR_HTTP_STATUS: "http_status",
    sc.RES_SERVICE_NAME: "service",
    sc.RES_HOST_NAME: "host",
    sc.RES_PROCESS_PID: "pid",
    sc.ATTR_NIXL_POLL_GAP_MS: "nixl_poll_gap_ms",
    # vllm.engine.step's batch (kvprof.analysis.loaders.steps): columns step_<attribute>.
    **{sc.STEP_ATTR_PREFIX + a: "step_" + a for a in sc.STEP_ATTRS},
}
# (issue 19) the engine-step columns and the transfer split's poll gap.
STEP_NUMERIC = tuple("step_" + a for a in sc.STEP_ATTRS if a != "request_ids")
NUMERIC_COLUMNS = ("kv_bytes", "kv_blocks", "kv_descriptors", "prompt_tokens", "pid",
                   "dynamo_ttft_ms", "http_status", "vllm_ttft_s", "vllm_queue_s",
                   "vllm_prefill_s", "busy_ns", "idle_ns", "nixl_poll_gap_ms", *STEP_NUMERIC)
CATEGORY_COLUMNS = ("name", "service", "host", "clock", "source", "role", "node", "connector",
                    "kv_path", "namespace", "engine_id", "remote_engine_id", "pod",
                    "remote_host", "gpu_uuid", "component", "failure")
# Several attribute keys may feed one column (the first listed that a span has).
ATTR_COLUMN_NAMES = tuple(dict.fromkeys(ATTR_COLUMNS.values()))
# The span's OTLP status: code 0 unset / 1 ok / 2 error (float, NaN when unknown), message.
STATUS_COLUMNS = ("status_code", "status_message")
SPAN_COLUMNS = ("trace_id", "span_id", "parent_span_id", "name", "start_ns", "end_ns",
                *ATTR_COLUMN_NAMES, *STATUS_COLUMNS, "clock", "source")


def _inherit_clocks(df: pd.DataFrame) -> None:
    """A span that names no node or host (NVIDIA Dynamo's Rust side exports service.name
    only) takes the clock of a span of the same service in the same trace that does: they
    came from one process, or one pod, and tell the analysis nothing about skew."""
    nameless = (df["node"].isna() & df["host"].isna()).to_numpy()
    if not nameless.any() or nameless.all():
        return
    key = df["trace_id"].astype(str) + "\x1f" + df["service"].astype(str)
    known = (key[~nameless].to_frame("k").assign(c=df["clock"].astype(object)[~nameless])
             .drop_duplicates("k").set_index("k")["c"])
    inherited = key[nameless].map(known)
    clock = df["clock"].astype(object)
    clock[nameless] = inherited.fillna(clock[nameless]).to_numpy()
    df["clock"] = clock


def finalize_spans(df: pd.DataFrame) -> pd.DataFrame:
    """Add the clock column and give every column its documented dtype."""
    import numpy as np
    import pandas as pd

    if "clock" not in df or df["clock"].isna().any():
        clock = df["node"].astype(object).fillna(df["host"].astype(object)).fillna(
            df["service"].astype(object)).fillna("unknown")
        df["clock"] = clock if "clock" not in df else df["clock"].astype(object).fillna(clock)
    for col in STATUS_COLUMNS:
        if col not in df:
            df[col] = np.nan if col == "status_code" else None
    df["status_code"] = pd.to_numeric(df["status_code"], errors="coerce").astype("float64")
    for col in NUMERIC_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    df["start_ns"] = df["start_ns"].astype(np.int64)
    df["end_ns"] = df["end_ns"].astype(np.int64)
    _inherit_clocks(df)
    for col in CATEGORY_COLUMNS:
        if df[col].dtype.name != "category":
            df[col] = df[col].astype("category")
    return df[list(SPAN_COLUMNS)].reset_index(drop=True)
