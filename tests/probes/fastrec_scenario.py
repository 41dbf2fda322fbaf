"""Requests through the API-server hooks, standard library only: run by another CPython than
the tests' own (tests/probes/test_fastrec_pythons.py) with kvprof and its C part built for
that Python on PYTHONPATH, and by the tests' own as a control.

Prints one JSON object: which implementation ran, the records the hooks emitted (made
plain: times as "t", bytes as text), what the EngineCore requests carried, the failures the
hooks reported, and, for the C part, the memory 2,000 more requests left behind.
KVPROF_PURE_PYTHON=1 runs the Python recordings instead (the same requests, for comparison).
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import tracemalloc
from types import SimpleNamespace as NS

from kvprof.probes import hooks

FAILURES: list[str] = []


def _failed(name: str) -> None:
    FAILURES.append(f"{name}: {sys.exc_info()[1]!r}")


hooks._hook_failed = _failed  # before api_hooks binds it (its C part keeps a reference)

from api_fakes import (  # noqa: E402  (this script's folder, first on sys.path)
    ROUTER_TP,
    FakeAsyncLLM,
    FakeCoreClient,
    FakeCycle,
    FakeOutputProcessor,
)

from kvprof.probes import api_hooks  # noqa: E402

KVP = {"do_remote_prefill": True, "remote_request_id": "cmpl-p-9-0", "remote_engine_id": "e-1",
       "remote_block_ids": [1, 2, 3], api_hooks.KV_FIELDS[-1]: ROUTER_TP}


class FalsyFails:
    def __bool__(self):
        raise RuntimeError("no truth")


def install() -> None:
    for owner, name, factory in (
            (FakeAsyncLLM, "add_request", api_hooks.async_llm_add_request),
            (FakeCoreClient, "add_request_async", api_hooks.core_client_add_request_async),
            (FakeOutputProcessor, "process_outputs",
             api_hooks.output_processor_process_outputs),
            (FakeCycle, "send", api_hooks.uvicorn_cycle_send)):
        setattr(owner, name, factory(owner.__dict__[name]))
    FakeCycle._kvprof_http = None  # the default the instrumentor gives uvicorn's class


def make_app(engine: FakeAsyncLLM, outputs: FakeOutputProcessor, calls: int,
             bad_body: bool = False):
    async def app(scope, receive, send):
        await receive()
        sent = [await engine.add_request(f"cmpl-xid-7-{i}", {"prompt": "p"},
                                         NS(extra_args={"kv_transfer_params": KVP}))
                for i in range(calls)]
        outputs.process_outputs([NS(request_id=r.request_id, new_token_ids=[5],
                                    finish_reason=None) for r in sent])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body",
                    "body": FalsyFails() if bad_body else b"data: first\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                    "more_body": False})
    return api_hooks.asgi_wrap(app)


async def serve(app, through_cycle: bool) -> None:
    """One POST in a task of its own (as uvicorn runs it), through uvicorn's probed cycle or
    a plain server's send."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "method": "POST", "path": "/v1/completions", "query_string": b"",
             "headers": [(b"host", b"h"), (b"x-request-id", b"xid-7"),
                         (b"traceparent", ROUTER_TP.encode())]}

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def plain_send(message):
        return None

    loop = asyncio.get_running_loop()
    if through_cycle:
        await loop.create_task(FakeCycle().run_asgi(app, scope, receive))
    else:
        await loop.create_task(app(scope, receive, plain_send))


TIMES = {api_hooks.T_RECV, api_hooks.T_FIRST_BYTES, api_hooks.T_END, api_hooks.T_INPUT,
         api_hooks.T_HANDOFF, api_hooks.T_FIRST_OUTPUT}


def plain(call) -> list:
    out = []
    for i in range(api_hooks.EXTRA_CALLS):
        v = call[i]
        if i in TIMES:
            out.append("t" if isinstance(v, int) and v > 0 else v)
        elif i == api_hooks.EXTRA_ARGS:
            kvp = api_hooks.kv_transfer_params(call) or {}
            out.append({k: v for k, v in kvp.items() if k in api_hooks.KV_FIELDS})
        elif isinstance(v, bytes):
            out.append(v.decode("latin-1"))
        else:
            out.append(v)
    return out + [plain(c) for c in call[api_hooks.EXTRA_CALLS:]]


def main() -> None:
    install()
    events: list = []
    hooks.set_emit(events.append)
    client = FakeCoreClient()
    engine, outputs = FakeAsyncLLM(client), FakeOutputProcessor()
    result: dict = {"implementation": api_hooks.implementation(),
                    "python": sys.version.split()[0], "records": [], "core_requests": []}
    loop = asyncio.new_event_loop()
    for through_cycle in (True, False):
        loop.run_until_complete(serve(make_app(engine, outputs, calls=2), through_cycle))
        result["records"] += [plain(e) for e in events]
        events.clear()
    result["core_requests"] = [[r.request_id, r.trace_headers] for r in client.sent]
    # The times themselves, in a request's order (the plain copies above hold none).
    loop.run_until_complete(serve(make_app(engine, outputs, calls=1), True))
    (e,) = events
    result["records_in_order"] = (
        0 < e[api_hooks.T_RECV] <= e[api_hooks.T_INPUT] <= e[api_hooks.T_HANDOFF]
        <= e[api_hooks.T_FIRST_OUTPUT] <= e[api_hooks.T_FIRST_BYTES] <= e[api_hooks.T_END])
    events.clear()
    # A body the recording cannot read: reported, and the response still ends.
    loop.run_until_complete(serve(make_app(engine, outputs, calls=1, bad_body=True), False))
    result["bad_body_record_ended"] = [e[api_hooks.T_END] is not None for e in events]
    result["failures"] = list(FAILURES)
    events.clear()
    if result["implementation"] == "c":
        apps = [make_app(engine, outputs, calls=1), make_app(engine, outputs, calls=2)]

        def requests(n: int) -> None:
            for i in range(n):
                loop.run_until_complete(serve(apps[i % 2], bool(i % 2)))
                events.clear()
                client.sent.clear()
        requests(200)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        requests(2000)
        gc.collect()
        result["bytes_kept_by_2000_requests"] = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    result["waiting_after"] = len(api_hooks._AWAIT)
    loop.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
