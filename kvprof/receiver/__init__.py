"""`kvprof traces receive`: an OTLP trace receiver that stores spans as OTLP/JSON-lines files.

Spans kvprof does not create (NVIDIA Dynamo's, vLLM's own `llm_request`, a proxy's) arrive
over OTLP/gRPC or OTLP/HTTP and are written in the format of kvprof's own trace files, so
`kvprof report --traces DIR` reads both without a Jaeger. Imports only the ground floor.

Modules, one job each: payload (decode, bound and screen one export), queue (the byte-bounded
hand-off to the writer), store (the file series and its writer thread), stats (counters and
the summary line), intake (what both servers do with a payload), server_grpc, server_http,
run (the command: options, signals, banner, summary).
"""
