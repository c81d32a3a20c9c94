"""Back-pressure and shutdown on a server with one sequence slot and a queue of two sequences:
a full queue answers 429 (counting sequences, prompts x n), and SIGTERM lets the in-flight stream finish
before the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from server_harness import engine_status, wait_until_idle

pytestmark = pytest.mark.timeout(180)

LONG = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 200, "ignore_eos": True}


@pytest.fixture(scope="module")
def small_server(start_server):
    return start_server(["--max-num-seqs", "1", "--max-queue", "2", "--max-model-len", "256",
                         "--kv-cache-memory-gb", "0.05", "--shutdown-timeout", "60"]).wait_ready()


def _wait_for(url: str, predicate, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = engine_status(url)
        if predicate(status):
            return status
        time.sleep(0.05)
    raise AssertionError(f"engine never reached the expected state: {engine_status(url)}")


def test_full_queue_answers_429(small_server):
    url = small_server.url
    with httpx.Client(base_url=url, timeout=120) as running_client:
        with running_client.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}):
            _wait_for(url, lambda s: s["running"] == 1)
            waiting_result = {}
            waiter = threading.Thread(target=lambda: waiting_result.update(
                response=httpx.post(f"{url}/v1/chat/completions", timeout=120,
                                    json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})))
            waiter.start()
            _wait_for(url, lambda s: s["waiting"] == 1)

            # one sequence waits; two more (n=2) would make three in a queue of two
            rejected = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3, "n": 2}, timeout=30)
            assert rejected.status_code == 429, rejected.text
            error = rejected.json()["error"]
            assert error["code"] == "queue_full" and "retry" in error["message"]
            assert "1 waiting and 2 more" in error["message"] and "limit of 2" in error["message"]
            assert rejected.headers.get("retry-after") == "1"
            # three prompts can never fit a queue of two: a 400, not an invitation to retry
            too_big = httpx.post(f"{url}/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 3},
                                 timeout=30)
            assert too_big.status_code == 400 and "3 sequences" in too_big.json()["error"]["message"], too_big.text
            assert engine_status(url)["waiting"] == 1
        # leaving the stream disconnects the running request: the waiting one gets the slot and finishes
        waiter.join(timeout=60)
    assert waiting_result["response"].status_code == 200
    assert wait_until_idle(url)["kv_blocks_used"] == 0


def test_sigterm_drains_the_in_flight_stream_then_exits_0(small_server):
    url = small_server.url
    body = {**LONG, "max_tokens": 24, "stream": True, "stream_options": {"include_usage": True}}
    events = []
    with httpx.Client(base_url=url, timeout=120) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            while not any("content" in e.get("choices", [{}])[0].get("delta", {}) for e in events if e.get("choices")):
                line = next(lines)
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
            small_server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.ConnectError):  # no new connections once draining has begun
                httpx.get(f"{url}/health", timeout=5)
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    assert events[-1] == "data: [DONE]"[6:]
    assert events[-2]["usage"]["completion_tokens"] == 24
    finishes = [e["choices"][0]["finish_reason"] for e in events[:-2] if e["choices"][0].get("finish_reason")]
    assert finishes == ["length"]
    assert small_server.proc.wait(timeout=60) == 0
    assert "server stopped" in small_server.log()


def test_requests_cut_at_the_shutdown_timeout_end_cleanly(start_server):
    """Past --shutdown-timeout, a stream still generating gets an error event and [DONE] (not a bare close),
    a non-streamed request a 503, and the log no CancelledError traceback."""
    server = start_server(["--max-num-seqs", "2", "--max-model-len", "512", "--kv-cache-memory-gb", "0.05",
                           "--shutdown-timeout", "1.5"]).wait_ready()
    body = {**LONG, "max_tokens": 450}  # far longer than 1.5 s on a CPU
    plain = {}
    with httpx.Client(base_url=server.url, timeout=120) as client:
        waiter = threading.Thread(target=lambda: plain.update(response=client.post("/v1/chat/completions", json=body)))
        waiter.start()
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            lines = response.iter_lines()
            events = []
            while len(events) < 3:  # role chunk + two content chunks: generating now
                line = next(lines)
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
            _wait_for(server.url, lambda s: s["running"] == 2)
            server.proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
            cut_after = time.monotonic() - started
        waiter.join(timeout=60)
    assert events[-1] == "[DONE]", events[-3:]
    error = events[-2]["error"]
    assert error["code"] == "server_shutting_down" and "shutdown-timeout" in error["message"], error
    assert 1.0 <= cut_after <= 5.0, cut_after
    assert plain["response"].status_code == 503, plain["response"].text
    assert plain["response"].json()["error"]["code"] == "server_shutting_down"
    assert server.proc.wait(timeout=60) == 0
    log = server.log()
    assert "server stopped" in log
    assert "CancelledError" not in log and "Traceback" not in log, log[-3000:]
