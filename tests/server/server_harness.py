"""Helpers for the server tests: a `python -m photoninfer serve` subprocess and small polling utilities."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key"
START_TIMEOUT_S = 180
_READY = re.compile(r"chat page at (http://127\.0\.0\.1:\d+)/")

# The main server: small KV cache, room for 64 concurrent sequences, a short context so nothing runs long,
# and async scheduling as on a GPU (steps overlapped, tokens read back one step late): the servers started
# with their own arguments (lifecycle, slow clients) keep the CPU's default, so both modes are served.
MAIN_SERVER_ARGS = ["--api-key", API_KEY, "--max-num-seqs", "64", "--max-model-len", "512",
                    "--kv-cache-memory-gb", "0.25", "--async-scheduling"]


class ServerProcess:
    """`python -m photoninfer serve --port 0 ...` in a subprocess; the URL is read from its ready log line."""

    def __init__(self, args: list[str], log_path: Path):
        self.args = args
        self.log_path = log_path
        self.url = ""
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "photoninfer", "serve", "--host", "127.0.0.1", "--port", "0", *args],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _READY.search(self.log())
            if match:
                self.url = match.group(1)
                return self
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode} before it was ready:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        pytest.fail(f"server not ready after {timeout}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def engine_status(url: str) -> dict:
    return httpx.get(f"{url}/api/engine", timeout=10).json()


def wait_until_idle(url: str, timeout: float = 30.0) -> dict:
    """Polls /api/engine until nothing runs or waits and every KV block is free; returns the last status."""
    deadline = time.monotonic() + timeout
    status = engine_status(url)
    while time.monotonic() < deadline:
        status = engine_status(url)
        if status["running"] == 0 and status["waiting"] == 0 and status["kv_blocks_used"] == 0:
            return status
        time.sleep(0.1)
    raise AssertionError(f"engine not idle after {timeout}s: {status}")


def metric_samples(text: str, name: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value} for every sample whose name starts with `name`."""
    samples = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples
