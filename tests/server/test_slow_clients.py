"""Slow and greedy clients over raw sockets: request headers and bodies must arrive in bounded time (else 408
and the connection is closed), and connections beyond --max-connections get 503, so a crowd of half-sent
requests cannot hold the server."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

import httpx
import pytest
from server_harness import REPO

pytestmark = pytest.mark.timeout(180)

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 8


@pytest.fixture(scope="module")
def guarded_server(start_server):
    return start_server(["--max-num-seqs", "2", "--max-model-len", "256", "--kv-cache-memory-gb", "0.05",
                         "--header-timeout", str(HEADER_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S),
                         "--max-connections", str(MAX_CONNECTIONS)]).wait_ready()


def _connect(url: str) -> socket.socket:
    address = urlsplit(url)
    return socket.create_connection((address.hostname, address.port), timeout=15)


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _status_and_error(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


def test_half_sent_headers_get_408_and_the_connection_is_closed(guarded_server):
    with _connect(guarded_server.url) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: applic")
        raw = _read_until_closed(sock)  # returns only once the server closes the connection
        waited = time.monotonic() - started
    status, error = _status_and_error(raw)
    assert status == 408 and error["code"] == "request_timeout" and "headers" in error["message"], raw
    assert HEADER_TIMEOUT_S - 0.5 <= waited <= HEADER_TIMEOUT_S + 5, waited


def test_half_sent_body_gets_408_and_the_connection_is_closed(guarded_server):
    with _connect(guarded_server.url) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": \"hel")
        raw = _read_until_closed(sock)
        waited = time.monotonic() - started
    status, error = _status_and_error(raw)
    assert status == 408 and error["code"] == "request_timeout" and "body" in error["message"], raw
    assert BODY_TIMEOUT_S - 0.5 <= waited <= BODY_TIMEOUT_S + 5, waited


def test_a_slow_but_timely_client_is_served(guarded_server):
    with _connect(guarded_server.url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n")
        time.sleep(HEADER_TIMEOUT_S / 2)
        sock.sendall(b"Connection: close\r\n\r\n")
        raw = _read_until_closed(sock)
    assert raw.startswith(b"HTTP/1.1 200"), raw


def test_connections_beyond_the_limit_get_503_until_slots_free_up(guarded_server):
    crowd = []
    try:
        for _ in range(MAX_CONNECTIONS):  # half-sent requests take every slot
            sock = _connect(guarded_server.url)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: te")
            crowd.append(sock)
        refused = httpx.get(f"{guarded_server.url}/health", timeout=10)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "too_many_connections"
        for sock in crowd:  # the header deadline ends the crowd's hold
            assert _read_until_closed(sock).startswith(b"HTTP/1.1 408")
    finally:
        for sock in crowd:
            with contextlib.suppress(OSError):
                sock.close()
    assert httpx.get(f"{guarded_server.url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("flag,value", [("--header-timeout", "0"), ("--body-timeout", "-1"),
                                        ("--max-connections", "0"), ("--shutdown-timeout", "nan")])
def test_nonsensical_limit_is_refused_before_the_model_loads(flag, value):
    result = subprocess.run([sys.executable, "-m", "photoninfer", "serve", flag, value], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and flag in result.stderr, result.stderr
    assert "loading the model" not in result.stderr
