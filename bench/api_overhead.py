"""API-server probe cost: microseconds per request in the frontend, hooks on vs off.

Prints figures measured side by side in one run. Goal (issue 9): <= 5 us per request.

What runs is the frontend's request path with vLLM's call shapes: a real Starlette app (the
ASGI layer vLLM's OpenAI server sits on) whose endpoint reads the JSON body, calls
``AsyncLLM.add_request`` -> ``EngineCoreClient.add_request_async``, hands one first output to
``OutputProcessor.process_outputs`` and streams three server-sent events. "on" is the same
app with kvprof's ASGI wrapper outermost and the three hooks installed by the real installer
(VllmInstrumentor._wrap), emitting into a deque as the recorder does; "off" has none of it.
Requests are driven through the ASGI interface in-process (no sockets: their cost would
only hide the difference). The variants alternate round by round on one event loop, so load
from elsewhere on the machine hits both alike; per-request figures are medians of thread CPU
time, with wall time beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace as NS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _engine_classes():
    """Two identical stand-ins (one gets probed), with vLLM 0.32's signatures."""

    def make(name: str):
        class Client:
            async def add_request_async(self, request):
                return None

        class Engine:
            def __init__(self):
                self.client = Client()

            async def add_request(self, request_id, prompt, params, arrival_time=None,
                                  lora_request=None, tokenization_kwargs=None,
                                  trace_headers=None):
                request = NS(request_id=request_id + "-0000abcd", trace_headers=None)
                await self.client.add_request_async(request)
                return request

        class Outputs:
            def process_outputs(self, engine_core_outputs, engine_core_timestamp=None,
                                iteration_stats=None):
                return engine_core_outputs

        Engine.__name__ = Client.__name__ = Outputs.__name__ = name
        return Engine, Client, Outputs

    return make("Off"), make("On")


def _app(engine, outputs):
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def completions(request):
        body = await request.json()
        params = NS(extra_args={"kv_transfer_params": body.get("kv_transfer_params")})
        sent = await engine.add_request("cmpl-x-0", {"prompt": body["prompt"]}, params)
        outputs.process_outputs([NS(request_id=sent.request_id, new_token_ids=[1],
                                    finish_reason=None)])

        async def events():
            for i in range(CHUNKS):
                yield f"data: {{\"i\": {i}}}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])


CHUNKS = 17  # the demo's 16 output tokens and [DONE], one server-sent event each
BODY = json.dumps({"prompt": "p" * 200, "stream": True,
                   "kv_transfer_params": {"do_remote_decode": True}}).encode()
HEADERS = [(b"content-type", b"application/json"), (b"x-request-id", b"bench-1"),
           (b"traceparent", b"00-0123456789abcdef0123456789abcdef-0123456789abcdef-01")]


async def _one(app) -> None:
    """One request through the ASGI interface, as uvicorn would call it."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "headers": HEADERS, "scheme": "http",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000), "root_path": ""}
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await asyncio.sleep(3600)

    async def send(message):
        return None

    await app(scope, receive, send)


async def _measure(apps: dict, per_round: int, rounds: int) -> dict[str, list[tuple]]:
    """Per variant and round: (CPU ns, wall ns) per request; the variants alternate, and
    their order flips every round so neither always runs first."""
    out: dict[str, list[tuple[float, float]]] = {k: [] for k in apps}
    names = list(apps)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            app = apps[name]
            w, c = time.perf_counter_ns(), time.thread_time_ns()
            for _ in range(per_round):
                await _one(app)
            out[name].append(((time.thread_time_ns() - c) / per_round,
                              (time.perf_counter_ns() - w) / per_round))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per round")
    parser.add_argument("--rounds", type=int, default=41)
    args = parser.parse_args()

    from kvprof.probes import api_hooks, hooks
    from kvprof.probes.instrumentor import VllmInstrumentor

    (e_off, c_off, o_off), (e_on, c_on, o_on) = _engine_classes()
    inst = VllmInstrumentor()
    for owner, name, factory in ((e_on, "add_request", api_hooks.async_llm_add_request),
                                 (c_on, "add_request_async",
                                  api_hooks.core_client_add_request_async),
                                 (o_on, "process_outputs",
                                  api_hooks.output_processor_process_outputs)):
        assert inst._wrap(owner, name, factory, name)
    events: deque = deque()
    hooks.set_emit(events.append)
    apps = {"off": _app(e_off(), o_off()), "on": api_hooks.asgi_wrap(_app(e_on(), o_on()))}
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_measure(apps, 50, 3))  # warm-up: imports, caches
        events.clear()
        res = loop.run_until_complete(_measure(apps, args.requests, args.rounds))
    finally:
        loop.close()
        hooks.set_emit(None)
    n_events = len(events)
    off_cpu = statistics.median(c for c, _ in res["off"])
    on_cpu = statistics.median(c for c, _ in res["on"])
    off_wall = statistics.median(w for _, w in res["off"])
    on_wall = statistics.median(w for _, w in res["on"])
    # Paired: each round's on minus the same round's off, so a slow stretch of the machine
    # shifts both and cancels out.
    paired = sorted(on[0] - off[0] for on, off in zip(res["on"], res["off"], strict=True))
    added = statistics.median(paired) / 1e3
    q1, q3 = paired[len(paired) // 4] / 1e3, paired[3 * len(paired) // 4] / 1e3
    print(f"api_overhead: {args.rounds} rounds x {args.requests} requests per variant, "
          f"alternating; thread CPU time per request (wall beside it); {CHUNKS} response "
          "chunks per request")
    print(f"  hooks off: {off_cpu / 1e3:8.1f} us CPU ({off_wall / 1e3:.1f} us wall)")
    print(f"  hooks on:  {on_cpu / 1e3:8.1f} us CPU ({on_wall / 1e3:.1f} us wall)")
    print(f"  added per request (median of paired rounds): {added:.2f} us CPU "
          f"(interquartile {q1:.2f} .. {q3:.2f}); ratio on/off {on_cpu / off_cpu:.3f}; "
          f"goal <= 5 us: {'met' if added <= 5 else 'NOT met'}")
    expected = args.rounds * args.requests
    print(f"  events emitted while measured: {n_events} (one per request on: {expected})")
    if n_events != expected:
        raise SystemExit("the probed app did not emit one event per request")


if __name__ == "__main__":
    main()
