"""API-server probe cost: microseconds per request in the frontend, hooks on vs off.

Prints figures measured side by side in one run. Goal (issue 9): <= 5 us per request.

What runs is the frontend's request path with vLLM's call shapes: a real Starlette app (the
ASGI layer vLLM's OpenAI server sits on) whose endpoint reads the headers vLLM 0.32's
completions endpoint reads (content-type, endpoint-load-metrics-format, X-Request-Id, each
through Starlette's Headers; without them the probe's own header scan would be charged for
bringing the request's headers into the cache, which the real server does anyway), reads the
JSON body, calls (with vLLM's msgspec types for the parameters, the EngineCore request and
its outputs) ``AsyncLLM.add_request`` -> ``EngineCoreClient.add_request_async`` and streams
``max_tokens`` server-sent events, each after an ``OutputProcessor.process_outputs`` call
with that token's output (AsyncLLM's output handler, one engine step per token, one request
in the batch: a step's call is shared by every request in it, so with more requests the
per-event cost of that hook divides among them). The app's ``send`` is the bound method of a
request-cycle object made per request, as uvicorn's ``RequestResponseCycle.send`` is, which
calls the cycle's ``on_response`` when the response is complete (the cycle's ``run_asgi``
runs the app and drops ``on_response`` after it, as uvicorn's does). "on" is
the same app with kvprof's ASGI wrapper outermost and the four hooks (add_request,
add_request_async, process_outputs, the cycle's send) installed by the real installer
(VllmInstrumentor._wrap), emitting into a deque that is emptied every 0.5 s (the recorder's
flush interval) outside the timed blocks, as the recorder's export thread does (what the
events hold stays alive until then, as in a server); "off" has none of it. Each request runs
as its own task with uvicorn's scope (ASGI spec 2.3, so Starlette streams from a task group)
and twelve headers, as an OpenAI client's request arrives through a router with X-Request-Id
and traceparent (last, as the router adds them; --router-headers-first puts them first),
parsed anew for each request as the server's HTTP parser does. No sockets: their cost would
only hide the difference.

How: blocks of 10 requests, on and off alternating (which goes first flips every round), for
streams of 1, 17 and 65 events; thread CPU time per block. The added cost at a length is the
median over rounds of (on block - off block) / 10, so load from elsewhere on the machine,
which hits neighbouring blocks alike, cancels. Garbage-collector time is taken out of the
blocks and added back as a mean per request (the run's collector time beyond that of an
off-vs-off run): a collection lands in one block in many, which a median would drop, and it
is paid for objects that outlive requests whichever block it lands in. The fixed cost and
the cost per streamed event are the least-squares line through the three lengths. The
off-vs-off run (two identical apps, hooks off) shows the bench's own bias. Everything is
repeated (--repeats); figures are medians over repeats with min..max beside them. Figures
scale with the machine: the hooks-off time per request is printed for scale.

Before/after: --baseline FILE measures another version of kvprof/probes/api_hooks.py (say
``git show HEAD:kvprof/probes/api_hooks.py > /tmp/old.py``) the same way in the same
repeats, each repeat running both (which first alternates), and prints both.

Not included: the export thread's work (folding events into spans every 0.5 s, off the
request path) and anything outside the API-server process.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import msgspec

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LENGTHS = (1, 17, 65)  # streamed events per request; 17: the demo's 16 tokens and [DONE]
HEADLINE = 17
BLOCK = 10  # requests per timed block
FLUSH_S = 0.5  # the recorder's default flush interval
# What the OpenAI Python client sends, as a router forwards it (with its request id and the
# caller's trace); the probe scans these.
HEADERS = [(b"host", b"prefill-0:8000"), (b"accept-encoding", b"gzip, deflate"),
           (b"connection", b"keep-alive"), (b"accept", b"application/json"),
           (b"content-type", b"application/json"), (b"user-agent", b"AsyncOpenAI/Python 1.99.0"),
           (b"x-stainless-lang", b"python"), (b"x-stainless-retry-count", b"0"),
           (b"authorization", b"Bearer sk-bench"), (b"content-length", b"270"),
           (b"x-request-id", b"bench-1"),
           (b"traceparent", b"00-0123456789abcdef0123456789abcdef-0123456789abcdef-01")]
RAW_HEADERS = b"\r\n".join(k + b": " + v for k, v in HEADERS)


# vLLM 0.32's request, output and sampling-parameter types are msgspec structs: the hooks read
# their fields as such (slots, not an instance dict), with the fields the bench uses.
class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    trace_headers: dict | None = None


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    new_token_ids: list
    finish_reason: int | None = None


class SamplingParams(msgspec.Struct, omit_defaults=True, dict=True):
    extra_args: dict | None = None


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
                                  trace_headers=None, priority=0, data_parallel_rank=None,
                                  session_id=None, prompt_text=None, reasoning_ended=None,
                                  reasoning_parser_kwargs=None, kv_hints=None):
                request = EngineCoreRequest(request_id=request_id + "-0000abcd")
                await self.client.add_request_async(request)
                return request

        class Outputs:
            def process_outputs(self, engine_core_outputs, engine_core_timestamp=None,
                                iteration_stats=None, weight_version=None):
                return engine_core_outputs

        class RequestResponseCycle:
            """uvicorn's per-request object, as far as the hooks meet it: the app's
            ``send`` is its bound method, which calls ``on_response`` when the response is
            complete; ``run_asgi`` runs the app and then drops ``on_response``."""

            def __init__(self, on_response):
                self.on_response = on_response

            async def run_asgi(self, app, scope, receive):
                try:
                    await app(scope, receive, self.send)
                finally:
                    self.on_response = _no_response

            async def send(self, message):
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    self.on_response()

        Engine.__name__ = Client.__name__ = Outputs.__name__ = name
        return Engine, Client, Outputs, RequestResponseCycle

    return make("Off"), make("On")


def _no_response() -> None:
    return None


def _app(engine, outputs):
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def completions(request):
        # The headers vLLM 0.32's /v1/completions reads before it calls the engine:
        # validate_json_request (content-type), create_completion's
        # endpoint-load-metrics-format (absent: every header is compared) and
        # _base_request_id (X-Request-Id), each a Starlette Headers.get.
        headers = request.headers
        if headers.get("content-type", "").lower().split(";", 1)[0] != "application/json":
            raise ValueError("Unsupported Media Type")
        headers.get("endpoint-load-metrics-format", "")
        base_id = headers.get("X-Request-Id") or "x"
        body = await request.json()
        params = SamplingParams(extra_args={"kv_transfer_params": body.get("kv_transfer_params")})
        # As AsyncLLM.generate calls it.
        sent = await engine.add_request(
            f"cmpl-{base_id}-0", {"prompt": body["prompt"]}, params, lora_request=None,
            tokenization_kwargs=None, trace_headers=None, priority=0, data_parallel_rank=None,
            session_id=None, kv_hints=None, prompt_text=None, reasoning_ended=None,
            reasoning_parser_kwargs=None)
        rid = sent.request_id

        async def events(n=body["max_tokens"]):
            for i in range(n):
                # AsyncLLM's output handler, one engine step per token
                outputs.process_outputs([EngineCoreOutput(request_id=rid, new_token_ids=[i],
                                            finish_reason=None)], time.monotonic(), None,
                                        weight_version=None)
                yield f"data: {{\"i\": {i}}}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])


def _body(n: int) -> bytes:
    return json.dumps({"prompt": "p" * 200, "stream": True, "max_tokens": n,
                       "kv_transfer_params": {"do_remote_decode": True}}).encode()


BODIES = {n: _body(n) for n in LENGTHS}


def _parse_headers() -> list[tuple[bytes, bytes]]:
    """This request's headers as new objects, as the server's HTTP parser makes them: a
    shared list would be read by nothing but the probe and be cold in the cache each time,
    which a server's freshly parsed headers are not."""
    return [tuple(line.split(b": ", 1)) for line in RAW_HEADERS.split(b"\r\n")]


async def _serve(variant, body: bytes) -> None:
    """One request through the ASGI interface, as uvicorn runs it: its own task, and a
    request cycle of its own whose bound ``send`` the app gets."""
    app, cycle = variant
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "POST", "path": "/v1/completions",
             "raw_path": b"/v1/completions", "query_string": b"", "headers": _parse_headers(),
             "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000),
             "root_path": "", "state": {}}
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # until the response is done (uvicorn: until disconnect)

    await asyncio.get_running_loop().create_task(
        cycle(_no_response).run_asgi(app, scope, receive))


class _Clock:
    """Thread CPU time, with the collector's share kept apart."""

    def __init__(self) -> None:
        self.gc_ns = 0
        self.collections = 0
        self._start = 0

    def __call__(self, phase: str, info: dict) -> None:  # a gc.callbacks entry
        if phase == "start":
            self._start = time.thread_time_ns()
        else:
            self.gc_ns += time.thread_time_ns() - self._start
            self.collections += 1


class _Sink:
    """The recorder's buffer: a deque the export thread empties every flush interval."""

    def __init__(self) -> None:
        self.buffer: deque = deque()
        self.emitted = 0
        self._flushed = time.perf_counter()

    def maybe_flush(self) -> None:
        if time.perf_counter() - self._flushed >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        self.emitted += len(self.buffer)
        self.buffer.clear()
        self._flushed = time.perf_counter()


async def _measure(apps: dict, lengths, rounds: int, clock: _Clock, sink: _Sink) -> dict:
    """Per (variant, length): CPU ns per request of each block, collector time excluded."""
    out: dict = {(v, n): [] for v in apps for n in lengths}
    names = list(apps)
    for r in range(rounds):
        for n in lengths:
            body = BODIES[n]
            for v in (names if r % 2 == 0 else names[::-1]):
                app = apps[v]
                sink.maybe_flush()
                g, c = clock.gc_ns, time.thread_time_ns()
                for _ in range(BLOCK):
                    await _serve(app, body)
                out[v, n].append((time.thread_time_ns() - c - (clock.gc_ns - g)) / BLOCK)
    return out


def _paired(res: dict, n: int, on: str = "on", off: str = "off") -> list[float]:
    return sorted(a - b for a, b in zip(res[on, n], res[off, n], strict=True))


def _line(xs, ys) -> tuple[float, float]:
    """Least-squares intercept and slope."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = (sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
             / sum((x - mx) ** 2 for x in xs))
    return my - slope * mx, slope


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} ({min(values):.2f} .. {max(values):.2f})"


def _install(module, engine_classes, inst) -> tuple:
    """The probed app: ``module``'s ASGI wrapper around an app whose engine classes carry its
    three method hooks, and the request cycle class whose send it probes (a version of the
    module without that hook wraps ``send`` instead), all put in by the real installer."""
    engine, client, outputs, cycle = engine_classes
    hooked = [(engine, "add_request", module.async_llm_add_request),
              (client, "add_request_async", module.core_client_add_request_async),
              (outputs, "process_outputs", module.output_processor_process_outputs)]
    if hasattr(module, "uvicorn_cycle_send"):
        hooked.append((cycle, "send", module.uvicorn_cycle_send))
        setattr(cycle, module.CYCLE_ATTR, None)  # the instrumentor's class default
    for owner, name, factory in hooked:
        assert inst._wrap(owner, name, factory, name)
    return module.asgi_wrap(_app(engine(), outputs())), cycle


def _load(path: str, pure_python: bool = False):
    """Another version of kvprof/probes/api_hooks.py (a file), as a module of its own;
    ``pure_python``: with its Python recordings, not the C ones (KVPROF_PURE_PYTHON)."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("kvprof_api_hooks_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    saved = os.environ.get("KVPROF_PURE_PYTHON")
    if pure_python:
        os.environ["KVPROF_PURE_PYTHON"] = "1"
    try:
        spec.loader.exec_module(module)
    finally:
        if pure_python and saved is None:
            os.environ.pop("KVPROF_PURE_PYTHON")
    return module


def _run(loop, apps: dict, twins: dict, rounds: int, clock: _Clock, sink: _Sink) -> dict:
    """One repeat's figures for apps {"off", "on"}: an off-vs-off run, then the on/off one."""
    sink.flush()
    gc.collect()
    g0 = clock.gc_ns
    aa = loop.run_until_complete(_measure(twins, (HEADLINE,), rounds, clock, sink))
    gc_aa = (clock.gc_ns - g0) / (2 * rounds * BLOCK)  # per request, hooks off
    gc.collect()
    g0, k0 = clock.gc_ns, clock.collections
    res = loop.run_until_complete(_measure(apps, LENGTHS, rounds, clock, sink))
    n_on = rounds * BLOCK * len(LENGTHS)
    # Collector time of this run beyond the hooks-off rate, all of it charged to the
    # probed requests (only they leave objects behind).
    gc_on = ((clock.gc_ns - g0) - gc_aa * 2 * n_on) / n_on
    row = {"aa": statistics.median(_paired(aa, HEADLINE, "off2", "off")) / 1e3,
           "gc": gc_on / 1e3, "collections": (clock.collections - k0) / n_on * 1e3}
    for n in LENGTHS:
        p = _paired(res, n)
        row[n] = statistics.median(p) / 1e3 + row["gc"]
        row["iqr", n] = (p[len(p) // 4] / 1e3, p[3 * len(p) // 4] / 1e3)
        row["off", n] = statistics.median(res["off", n]) / 1e3
    row["fixed"], row["per_event"] = _line(LENGTHS, [row[n] for n in LENGTHS])
    return row


def _report(title: str, rows: list[dict]) -> float:
    def col(key) -> list[float]:
        return [r[key] for r in rows]

    print(title)
    for n in LENGTHS:
        iqr = " ".join(f"{r['iqr', n][0]:.2f}..{r['iqr', n][1]:.2f}" for r in rows)
        print(f"  {n:3d} events: hooks off {statistics.median(col(('off', n))):7.1f} us; "
              f"added {_spread(col(n))} us  [per repeat, interquartile of rounds: {iqr}]")
    print(f"  of which garbage collector: {_spread(col('gc'))} us per request "
          f"({statistics.median(col('collections')):.1f} collections per 1000 requests)")
    print(f"  fixed per request: {_spread(col('fixed'))} us; per streamed event: "
          f"{statistics.median(col('per_event')) * 1e3:.0f} ns "
          f"({min(col('per_event')) * 1e3:.0f} .. {max(col('per_event')) * 1e3:.0f})")
    print(f"  off vs off (the bench's own bias): {_spread(col('aa'))} us")
    return statistics.median(col(HEADLINE))


def main() -> None:
    global RAW_HEADERS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="rounds per repeat")
    parser.add_argument("--repeats", type=int, default=9,
                        help="repeats, each a full measurement; the figures are their medians")
    parser.add_argument("--baseline", metavar="FILE",
                        help="another version of kvprof/probes/api_hooks.py, measured the "
                        "same way in the same repeats (before/after figures)")
    parser.add_argument("--python-baseline", action="store_true",
                        help="the baseline is this version with its Python recordings, not "
                        "the C ones (kvprof/probes/_fastrec.c): what the C part saves")
    parser.add_argument("--router-headers-first", action="store_true",
                        help="X-Request-Id and traceparent first among the headers, not last "
                        "(the probe looks for them from the last header on)")
    args = parser.parse_args()
    if args.router_headers_first:
        RAW_HEADERS = b"\r\n".join(k + b": " + v for k, v in HEADERS[-2:] + HEADERS[:-2])

    from kvprof.probes import api_hooks, hooks
    from kvprof.probes.instrumentor import VllmInstrumentor

    off_classes, on_classes = _engine_classes()
    inst = VllmInstrumentor()
    sink, clock = _Sink(), _Clock()
    hooks.set_emit(sink.buffer.append)
    off = _app(off_classes[0](), off_classes[2]()), off_classes[3]
    variants = {"on": {"off": off, "on": _install(api_hooks, on_classes, inst)}}
    if args.python_baseline:
        args.baseline = str(REPO / "kvprof" / "probes" / "api_hooks.py")
    if args.baseline:
        baseline = _load(args.baseline, pure_python=args.python_baseline)
        variants["baseline"] = {"off": off, "on": _install(baseline, _engine_classes()[1],
                                                           inst)}
    twins = {"off": off, "off2": (_app(off_classes[0](), off_classes[2]()), off_classes[3])}
    gc.callbacks.append(clock)
    loop = asyncio.new_event_loop()
    rows: dict[str, list[dict]] = {name: [] for name in variants}
    try:
        for apps in variants.values():  # warm-up
            loop.run_until_complete(_measure(apps, LENGTHS, 5, clock, sink))
        loop.run_until_complete(_measure(twins, (HEADLINE,), 5, clock, sink))
        sink.flush()
        sink.emitted = 0
        for r in range(args.repeats):
            # With a baseline, which of the two goes first alternates repeat by repeat.
            for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                rows[name].append(_run(loop, variants[name], twins, args.rounds, clock, sink))
    finally:
        loop.close()
        gc.callbacks.remove(clock)
        hooks.set_emit(None)
    sink.flush()

    order = ("; with a baseline, each repeat runs both, which first alternating"
             if args.baseline else "")
    headers = ("X-Request-Id and traceparent first" if args.router_headers_first
               else "X-Request-Id and traceparent last")
    print(f"api_overhead: {args.repeats} repeats x {args.rounds} rounds x {BLOCK} requests "
          f"per variant and stream length, alternating; thread CPU time; median over "
          f"repeats (min .. max); {headers}{order}")
    impl = getattr(api_hooks, "implementation", lambda: "python")()
    added = _report(f"this version (kvprof/probes/api_hooks.py, {impl} recordings):",
                    rows["on"])
    if args.baseline:
        name = ("this version, Python recordings" if args.python_baseline
                else args.baseline)
        before = _report(f"baseline ({name}):", rows["baseline"])
        print(f"  at {HEADLINE} events: {before:.2f} us -> {added:.2f} us "
              f"({added - before:+.2f} us)")
    print(f"added per request at {HEADLINE} events: {added:.2f} us; goal <= 5 us: "
          f"{'met' if added <= 5 else 'NOT met'}")
    expected = args.repeats * args.rounds * BLOCK * len(LENGTHS) * len(variants)
    print(f"events emitted while measured: {sink.emitted} (one per request on: {expected})")
    if sink.emitted != expected:
        raise SystemExit("a probed app did not emit one event per request")


if __name__ == "__main__":
    main()
