"""Every span name, attribute key, resource key and metric name kvprof emits or reads."""

from __future__ import annotations

# --- Span names: one trace per request (shared/DESIGN.md "Span conventions") -------------
SPAN_PREFILL = "vllm.prefill"
SPAN_PREFILL_QUEUE = "vllm.prefill.queue"
SPAN_PREFILL_COMPUTE = "vllm.prefill.compute"
SPAN_KV_SERIALIZE = "kv.serialize"
SPAN_KV_HOLD = "kv.hold"

SPAN_DECODE = "vllm.decode"
SPAN_KV_HANDSHAKE = "kv.handshake"
SPAN_KV_TRANSFER = "kv.transfer"
SPAN_KV_DESERIALIZE = "kv.deserialize"
SPAN_DECODE_QUEUE = "vllm.decode.queue"
SPAN_DECODE_FIRST_TOKEN = "vllm.decode.first_token"

# Aggregated (non-disaggregated) engines still get one request span, so agg and disagg
# traces can be compared phase by phase.
SPAN_REQUEST = "vllm.request"

# The engine's API server (the frontend process vLLM starts, or a Dynamo worker hosting
# AsyncLLM): children of the engine's request span (vllm.prefill / vllm.decode / vllm.request).
SPAN_API_REQUEST = "vllm.api.request"  # HTTP request received (ASGI) -> response complete
SPAN_API_INPUT = "vllm.api.input"  # received -> validated and tokenized (AsyncLLM.add_request)
SPAN_API_TO_CORE = "vllm.api.to_core"  # input processing -> handed to the EngineCore (sent)
SPAN_API_WAIT = "vllm.api.wait_output"  # handed over -> first output back from the EngineCore
# first output -> first response bytes written (prefill engine: its whole response returned)
SPAN_API_RESPOND = "vllm.api.respond"
API_SPANS = (SPAN_API_REQUEST, SPAN_API_INPUT, SPAN_API_TO_CORE, SPAN_API_WAIT,
             SPAN_API_RESPOND)

# Decode-side hand-over: the scheduler's view of the asynchronous KV load (KV will arrive ->
# KV ready seen); the worker's kv.handshake / kv.transfer sit inside it.
SPAN_DECODE_KV_WAIT = "vllm.decode.kv_wait"
# The prefill worker released KV the decode side never pulled (NIXL send lease expired):
# an instant span with an error status, child of vllm.prefill.
SPAN_KV_LEASE_EXPIRED = "kv.lease_expired"
# The KV transfer split by NIXL's own per-transfer telemetry (getXferTelemetry), children of
# kv.transfer, consecutive: load started -> NIXL accepted the read (post), -> NIXL saw it
# done (wire, NIXL's measurement), -> the decode worker's connector reported it (notice).
SPAN_KV_POST = "kv.transfer.post"
SPAN_KV_WIRE = "kv.transfer.wire"
SPAN_KV_NOTICE = "kv.transfer.notice"
TRANSFER_SPLIT_SPANS = (SPAN_KV_POST, SPAN_KV_WIRE, SPAN_KV_NOTICE)
ATTR_NIXL_POLL_GAP_MS = "nixl.poll_gap_ms"  # last seen in flight (poll/start) -> seen done
# One span per EngineCore step (schedule -> execute -> output), with its batch
# (kvprof.analysis.loaders.steps reads them; schema in that module's docstring).
SPAN_ENGINE_STEP = "vllm.engine.step"
STEP_ATTR_PREFIX = "vllm.step."
STEP_ATTRS = ("index", "schedule_ms", "execute_ms", "output_ms", "prefill_tokens",
              "decode_seqs", "num_reqs", "tokens", "request_ids", "preempted", "waiting",
              "running", "kv_blocks_free", "kv_blocks_total", "kv_loads_started",
              "kv_loads_finished")

# A router / proxy in front of the engines (the demo's router writes these with the
# OpenTelemetry SDK; any proxy exporting spans of these names joins the same way).
SPAN_ROUTER_REQUEST = "router.request"  # request received -> response complete
SPAN_ROUTER_PREFILL = "router.prefill"  # prefill call sent -> prefill response read
SPAN_ROUTER_DECODE = "router.decode"  # decode call sent -> decode response complete
SPAN_ROUTER_FIRST_BYTE = "router.first_byte"  # first decode bytes read -> written to the client
ROUTER_SPANS = (SPAN_ROUTER_REQUEST, SPAN_ROUTER_PREFILL, SPAN_ROUTER_DECODE,
                SPAN_ROUTER_FIRST_BYTE)

# Spans kvprof reads but does not write: NVIDIA Dynamo's frontend and workers, vLLM's own.
DYNAMO_HTTP_REQUEST = "http-request"  # frontend; attributes x_request_id, request_id, ttft_ms
DYNAMO_ROUTE = "router.route_request"  # frontend, twice in disagg (prefill, then decode)
DYNAMO_HANDLE = "handle_payload"  # each worker; attributes x_request_id, request_id, component
VLLM_LLM_REQUEST = "llm_request"  # vLLM's own span; gen_ai.request.id
FOREIGN_SPANS = (DYNAMO_HTTP_REQUEST, DYNAMO_ROUTE, DYNAMO_HANDLE, VLLM_LLM_REQUEST)

PREFILL_CHILDREN = (SPAN_PREFILL_QUEUE, SPAN_PREFILL_COMPUTE, SPAN_KV_SERIALIZE, SPAN_KV_HOLD)
DECODE_CHILDREN = (
    SPAN_KV_HANDSHAKE,
    SPAN_KV_TRANSFER,
    SPAN_KV_DESERIALIZE,
    SPAN_DECODE_QUEUE,
    SPAN_DECODE_FIRST_TOKEN,
    *TRANSFER_SPLIT_SPANS,
)
ALL_SPANS = (SPAN_PREFILL, *PREFILL_CHILDREN, SPAN_DECODE, *DECODE_CHILDREN, SPAN_REQUEST,
             *API_SPANS, SPAN_DECODE_KV_WAIT, SPAN_KV_LEASE_EXPIRED, *ROUTER_SPANS)

# The order phases happen in for one request: reports stack them in this order.
PHASE_ORDER = (
    SPAN_PREFILL_QUEUE,
    SPAN_PREFILL_COMPUTE,
    SPAN_KV_SERIALIZE,
    SPAN_KV_HOLD,
    SPAN_KV_HANDSHAKE,
    SPAN_KV_TRANSFER,
    SPAN_KV_DESERIALIZE,
    SPAN_DECODE_QUEUE,
    SPAN_DECODE_FIRST_TOKEN,
)

# --- Span attributes -----------------------------------------------------------------------
ATTR_ROLE = "kvprof.role"  # "prefill" | "decode" | "aggregated"
ATTR_REQUEST_ID = "kvprof.request_id"
ATTR_REMOTE_REQUEST_ID = "kvprof.remote_request_id"  # the peer engine's id for the request
ATTR_ENGINE_ID = "kvprof.engine_id"
ATTR_PROMPT_TOKENS = "kvprof.prompt_tokens"  # a count, never the text
ATTR_KV_BYTES = "kv.bytes"
ATTR_KV_BLOCKS = "kv.blocks"
ATTR_KV_DESCRIPTORS = "kv.descriptors"
ATTR_KV_CONNECTOR = "kv.connector"
ATTR_KV_REMOTE_ENGINE_ID = "kv.remote.engine_id"
ATTR_KV_REMOTE_HOST = "kv.remote.host"
ATTR_KV_GBPS = "kv.gbps"  # achieved GB/s (1e9 bytes/s) of a transfer
ATTR_KV_PATH = "kv.path"  # "nvlink" | "pcie" | "infiniband" | "tcp" | "loopback" | "file"
ATTR_K8S_POD_NAME = "k8s.pod.name"
ATTR_K8S_NAMESPACE = "k8s.namespace.name"
ATTR_K8S_NODE_NAME = "k8s.node.name"
ATTR_GPU_UUID = "gpu.uuid"
# The id the client chose (X-Request-Id), on API-server and router spans: the join key when a
# proxy forwards X-Request-Id but no traceparent.
ATTR_X_REQUEST_ID = "kvprof.x_request_id"
X_REQUEST_ID_KEYS = (ATTR_X_REQUEST_ID, "x_request_id", "http.request.header.x-request-id")
# Request ids of spans kvprof reads (Dynamo, vLLM's llm_request).
FOREIGN_REQUEST_ID_KEYS = ("request_id", "gen_ai.request.id")
ATTR_HTTP_STATUS = "http.response.status_code"
ATTR_HTTP_ROUTE = "http.route"
ATTR_FAILURE = "kvprof.failure"  # short machine-readable reason on error spans
ATTR_LEASE_RETRIEVED_BY = "kv.lease.retrieved_by"  # decode workers that pulled before expiry
ATTR_DYNAMO_TTFT_MS = "ttft_ms"  # Dynamo frontend's own TTFT on http-request
# Native timings the coarse legs read (kvprof.analysis.coarse) where kvprof's probes did not
# run: vLLM's llm_request (seconds) and the busy/idle time of Dynamo's tracing spans (ns).
ATTR_VLLM_TTFT_S = "gen_ai.latency.time_to_first_token"  # arrival -> first token seen
ATTR_VLLM_QUEUE_S = "gen_ai.latency.time_in_queue"  # EngineCore queued -> scheduled
ATTR_VLLM_PREFILL_S = "gen_ai.latency.time_in_model_prefill"  # scheduled -> first token
ATTR_DYNAMO_BUSY_NS = "busy_ns"  # handle_payload: time its future was being polled
ATTR_DYNAMO_IDLE_NS = "idle_ns"  # handle_payload: time it waited (on vLLM, the network)

# --- Resource attributes (per process) -------------------------------------------------------
RES_SERVICE_NAME = "service.name"
RES_HOST_NAME = "host.name"
RES_PROCESS_PID = "process.pid"
RES_VLLM_VERSION = "vllm.version"
RES_KVPROF_VERSION = "kvprof.version"

# W3C trace context key the prefill side adds to the kv_transfer_params it returns.
TRACEPARENT_KEY = "traceparent"

# --- Environment variables ---------------------------------------------------------------------
ENV_ENABLED = "KVPROF_ENABLED"  # "1" turns probes on; unset means a plain install does nothing
ENV_EXPORTER = "KVPROF_EXPORTER"
ENV_OUTPUT = "KVPROF_OUTPUT"
ENV_ROLE = "KVPROF_ROLE"
ENV_SERVICE_NAME = "KVPROF_SERVICE_NAME"
ENV_NODE_NAME = "NODE_NAME"  # downward API
ENV_POD_NAME = "POD_NAME"
ENV_POD_NAMESPACE = "POD_NAMESPACE"

# --- Metric names: kvprof_<subsystem>_<name>_<unit>[_total] ------------------------------------
# Counters are named without _total here; prometheus-client appends it on exposition.
METRIC_GPU_UTILIZATION = "kvprof_gpu_utilization_ratio"
METRIC_GPU_MEMORY_UTILIZATION = "kvprof_gpu_memory_utilization_ratio"
METRIC_GPU_MEMORY_USED = "kvprof_gpu_memory_used_bytes"
METRIC_GPU_MEMORY_TOTAL = "kvprof_gpu_memory_total_bytes"
METRIC_GPU_POWER = "kvprof_gpu_power_watts"
METRIC_GPU_ENERGY = "kvprof_gpu_energy_joules"  # counter
METRIC_GPU_TEMPERATURE = "kvprof_gpu_temperature_celsius"
METRIC_GPU_PCIE_TX = "kvprof_gpu_pcie_tx_bytes"  # counter
METRIC_GPU_PCIE_RX = "kvprof_gpu_pcie_rx_bytes"  # counter
METRIC_GPU_INFO = "kvprof_gpu_info"
METRIC_GPU_PROCESS = "kvprof_gpu_process_info"

METRIC_NVLINK_TX = "kvprof_nvlink_tx_bytes"  # counter {gpu,link}
METRIC_NVLINK_RX = "kvprof_nvlink_rx_bytes"  # counter {gpu,link}
METRIC_NVLINK_UP = "kvprof_nvlink_up"

METRIC_IB_XMIT = "kvprof_ib_port_xmit_bytes"  # counter {device,port}; sysfs words x 4
METRIC_IB_RCV = "kvprof_ib_port_rcv_bytes"  # counter
METRIC_IB_XMIT_PACKETS = "kvprof_ib_port_xmit_packets"  # counter
METRIC_IB_RCV_PACKETS = "kvprof_ib_port_rcv_packets"  # counter
METRIC_IB_XMIT_WAIT = "kvprof_ib_port_xmit_wait"  # counter (ticks)
METRIC_IB_ERRORS = "kvprof_ib_port_errors"  # counter {device,port,counter}
METRIC_IB_RATE = "kvprof_ib_port_rate_bytes_per_second"
METRIC_IB_UP = "kvprof_ib_port_up"

METRIC_HOST_CPU = "kvprof_host_cpu_utilization_ratio"
METRIC_HOST_MEMORY_USED = "kvprof_host_memory_used_bytes"
METRIC_NIC_TX = "kvprof_nic_tx_bytes"  # counter {nic}
METRIC_NIC_RX = "kvprof_nic_rx_bytes"  # counter {nic}

METRIC_PLACEMENT_INFO = "kvprof_placement_info"  # {pod,namespace,node,gpu_uuid,role}
METRIC_COLLECTOR_DURATION = "kvprof_collector_duration_seconds"  # {collector}
METRIC_COLLECTOR_SUCCESS = "kvprof_collector_success"  # {collector}

# Collectors (issue 3), additive.
METRIC_GPU_PROCESS_MEMORY = "kvprof_gpu_process_memory_used_bytes"  # {gpu,uuid,pid}
METRIC_GPU_TOPOLOGY_INFO = "kvprof_gpu_topology_info"  # {pci_bus_id,gpu_uuid,numa_node,closest_ib}
METRIC_IB_XMIT_RATE = "kvprof_ib_port_xmit_throughput_bytes_per_second"  # achieved, per interval
METRIC_IB_RCV_RATE = "kvprof_ib_port_rcv_throughput_bytes_per_second"
METRIC_HOST_MEMORY_TOTAL = "kvprof_host_memory_total_bytes"
# One series per explicit "no data": {collector,entity,metric,reason}, value 1.
METRIC_COLLECTOR_NO_DATA = "kvprof_collector_no_data_info"
# CPU waits of watched processes (issue 19, kvprof/collectors/schedstat.py), labels
# {pid,process,role,service,source}; counters summed over the process's threads.
METRIC_PROCESS_RUNQUEUE_WAIT = "kvprof_process_runqueue_wait_seconds"  # counter
METRIC_PROCESS_CPU = "kvprof_process_cpu_seconds"  # counter
METRIC_PROCESS_NONVOLUNTARY_SWITCHES = "kvprof_process_nonvoluntary_switches"  # counter
# The run-queue wait of the thread that waited most in the last interval, label {thread}.
METRIC_PROCESS_THREAD_WAIT_MAX = "kvprof_process_thread_runqueue_wait_max_seconds"

# --- Roles -------------------------------------------------------------------------------------
ROLE_PREFILL = "prefill"
ROLE_DECODE = "decode"
ROLE_AGGREGATED = "aggregated"
ROLE_FRONTEND = "frontend"
ROLE_ROUTER = "router"
ROLES = (ROLE_PREFILL, ROLE_DECODE, ROLE_AGGREGATED, ROLE_FRONTEND)
