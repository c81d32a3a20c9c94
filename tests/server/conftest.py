"""Fixtures for the server tests: real `python -m photoninfer serve` processes on 127.0.0.1, real HTTP.

Starting a server loads the bundled SmolLM2 (tens of seconds on a busy 2-core machine), so the main
server is shared by the whole session; tests that need other flags start their own, once per module.
"""

from __future__ import annotations

import httpx
import pytest
from server_harness import API_KEY, MAIN_SERVER_ARGS, ServerProcess


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """Factory: start_server(args) -> ServerProcess (not yet ready: call .wait_ready()); stopped at session end."""
    started: list[ServerProcess] = []

    def start(args: list[str]) -> ServerProcess:
        server = ServerProcess(args, tmp_path_factory.mktemp("serve") / "serve.log")
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server) -> ServerProcess:
    return start_server(MAIN_SERVER_ARGS).wait_ready()


@pytest.fixture(scope="session")
def http(server):
    """httpx client with the API key, for raw requests."""
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as client:
        yield client
