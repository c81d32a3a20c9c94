"""Load: 64 concurrent streaming clients share the engine loop (continuous batching across clients), and
clients that disconnect mid-answer get their KV blocks freed at once."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from server_harness import API_KEY, engine_status, metric_samples, wait_until_idle

pytestmark = pytest.mark.timeout(300)

NUM_CLIENTS = 64


def _metrics(http) -> str:
    return http.get("/metrics").text


def _requests_by_outcome(text: str) -> dict[str, float]:
    samples = metric_samples(text, "photoninfer_requests_total")
    return {key.split('outcome="')[1].split('"')[0]: value for key, value in samples.items()}


def test_64_concurrent_streaming_clients(server, http):
    wait_until_idle(server.url)
    before = _requests_by_outcome(_metrics(http))
    model = http.get("/v1/models").json()["data"][0]["id"]

    async def one_client(client: openai.AsyncOpenAI, i: int):
        # Short raw prompts: on a CPU the prefill of 64 chat templates would dominate the test's time.
        stream = await client.completions.create(
            model=model, prompt=f"Fact number {i}:", max_tokens=16, temperature=0.8, seed=i, stream=True,
            stream_options={"include_usage": True})
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.text
                finish = choice.finish_reason or finish
        return text, finish, usage

    async def main():
        limits = httpx.Limits(max_connections=NUM_CLIENTS + 8)
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=240,
                                      http_client=httpx.AsyncClient(limits=limits, timeout=240)) as client:
            return await asyncio.gather(*(one_client(client, i) for i in range(NUM_CLIENTS)))

    started = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - started
    assert engine_status(server.url)["generation_tokens_per_s"] > 0  # the page's panel saw the recent burst
    assert len(results) == NUM_CLIENTS
    for _text, finish, usage in results:
        assert finish in ("stop", "length")
        assert usage is not None and 1 <= usage.completion_tokens <= 16

    text = _metrics(http)
    steps = metric_samples(text, "photoninfer_step_num_seqs")
    total_steps = steps["photoninfer_step_num_seqs_count"]
    single_steps = steps['photoninfer_step_num_seqs_bucket{le="1.0"}']
    assert total_steps - single_steps > 0, "no step ever batched more than one request"
    assert steps['photoninfer_step_num_seqs_bucket{le="8.0"}'] < total_steps, "no step batched more than 8 requests"
    after = _requests_by_outcome(text)
    finished = sum(after.get(k, 0) - before.get(k, 0) for k in ("stop", "length"))
    assert finished == NUM_CLIENTS
    assert metric_samples(text, "photoninfer_time_to_first_token_seconds_count")[
        "photoninfer_time_to_first_token_seconds_count"] >= NUM_CLIENTS

    status = wait_until_idle(server.url)
    assert status["kv_blocks_used"] == 0 and status["kv_blocks_total"] > 0
    print(f"{NUM_CLIENTS} streaming clients x 16 tokens in {elapsed:.1f}s")


def test_clients_disconnecting_mid_stream_free_their_blocks(server, http):
    wait_until_idle(server.url)
    before = _requests_by_outcome(_metrics(http))
    body = {"messages": [{"role": "user", "content": "Tell me a very long story about dragons."}],
            "max_tokens": 400, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    clients = [httpx.Client(base_url=server.url, headers=headers, timeout=60) for _ in range(6)]
    streams = [client.stream("POST", "/v1/chat/completions", json=body) for client in clients]
    try:
        responses = [s.__enter__() for s in streams]
        for response in responses:
            lines = response.iter_lines()
            got = 0
            while got < 3:  # role chunk + two content chunks: the request is decoding now
                got += next(lines).startswith("data: ")
        assert engine_status(server.url)["kv_blocks_used"] > 0
    finally:
        for client in clients:  # drop the connections mid-answer
            client.close()
    started = time.monotonic()
    status = wait_until_idle(server.url, timeout=15)
    freed_in = time.monotonic() - started
    assert status["kv_blocks_used"] == 0
    after = _requests_by_outcome(_metrics(http))
    assert after.get("abort", 0) - before.get("abort", 0) == 6
    print(f"blocks of 6 disconnected streams freed {freed_in:.2f}s after the disconnect")


def test_non_streaming_client_timeout_frees_blocks(server):
    wait_until_idle(server.url)
    body = {"messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": 400,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=1.5,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert wait_until_idle(server.url, timeout=10)["kv_blocks_used"] == 0


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 400,
                              "ignore_eos": True, "stream": True, "n": 2}),
], ids=["completions", "chat-n2"])
def test_client_leaving_before_the_first_byte_frees_its_blocks(server, http, path, body):
    """The client sends a streaming request and hangs up at once, before the server has sent anything."""
    wait_until_idle(server.url)
    before = _requests_by_outcome(_metrics(http))
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(head + payload)
    # 400 tokens take far longer than this on a CPU: only an abort frees the blocks in time
    assert wait_until_idle(server.url, timeout=8)["kv_blocks_used"] == 0
    after = _requests_by_outcome(_metrics(http))
    assert after.get("abort", 0) - before.get("abort", 0) == 1
