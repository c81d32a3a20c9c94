"""A streamed request is aborted however its response ends, even when the client is gone before the first
byte: an ASGI 2.4 server (hypercorn, granian, uvicorn's successors) reports a closed connection by failing
the very first `send`, so the SSE body generator never starts and its `finally` never runs.

Driven in-process against the real app over a fake engine, because uvicorn 0.54 (ASGI 2.3) swallows sends
to a closed socket instead; test_concurrency covers the same hang-up over a real socket."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from fake_engine import FakeEngine

from photoninfer.engine.async_engine import AsyncLLMEngine
from photoninfer.server.app import create_app

pytestmark = pytest.mark.timeout(30)


def _scope(path: str, body: bytes) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
            "query_string": b"", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000),
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}


@pytest.mark.parametrize("n", [1, 3])
def test_stream_is_aborted_when_the_first_send_finds_the_client_gone(n):
    fake = FakeEngine()
    body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 10_000, "stream": True, "n": n}).encode()

    async def main():
        engine = AsyncLLMEngine(fake)
        app = create_app(engine)
        engine.start()
        requests = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return requests.pop(0) if requests else {"type": "http.disconnect"}

        async def send(message):
            raise OSError("connection closed by the client")

        with contextlib.suppress(Exception):  # the app may fail to answer; nobody is there to read it
            await app(_scope("/v1/completions", body), receive, send)
        for _ in range(100):
            if not fake.requests:
                break
            await asyncio.sleep(0.01)
        still_running = sorted(fake.requests)
        metrics = app.state.serving.metrics.render().decode()
        await engine.shutdown()
        return still_running, metrics

    still_running, metrics = asyncio.run(main())
    assert still_running == [], "the engine kept generating for a client that is gone"
    assert len(fake.aborted) == n
    assert 'photoninfer_requests_total{outcome="abort"} 1.0' in metrics
