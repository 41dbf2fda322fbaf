"""Stand-ins for the vLLM and uvicorn methods the API-server hooks wrap, with vLLM 0.32's
signatures. Standard library only: tests/probes/fastrec_scenario.py runs them in Pythons
that have nothing else installed."""

from __future__ import annotations

from types import SimpleNamespace as NS

# The trace a router's request brings (its traceparent header).
ROUTER_TP = "00-123456789abcdef0123456789abcdef0-0badcafe00000001-01"


class FakeAsyncLLM:
    """The two AsyncLLM-side calls the API hooks wrap."""

    def __init__(self, client):
        self.client = client

    async def add_request(self, request_id, prompt, params, arrival_time=None,
                          lora_request=None, tokenization_kwargs=None, trace_headers=None):
        request = NS(request_id=request_id + "-0000abcd", trace_headers=None)
        await self.client.add_request_async(request)
        return request


class FakeCoreClient:
    def __init__(self):
        self.sent = []

    async def add_request_async(self, request):
        self.sent.append(request)


class FakeOutputProcessor:
    def process_outputs(self, engine_core_outputs, engine_core_timestamp=None,
                        iteration_stats=None):
        return engine_core_outputs

    def propagate_error(self, e):
        return None


class FakeCycle:
    """uvicorn's request cycle as far as the hooks meet it (its send, probed, and the
    on_response it calls when the response is complete, dropped after the app)."""

    def __init__(self, on_response=lambda: None):
        self.on_response = on_response

    async def run_asgi(self, app, scope, receive):
        try:
            await app(scope, receive, self.send)
        finally:
            self.on_response = lambda: None

    async def send(self, message):
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.on_response()
