"""Prometheus metrics for the server, plus the recent generation rate shown on the chat page.

Each app gets its own CollectorRegistry, so several servers (or tests) in one process do not collide.
Engine-wide numbers (queue lengths, KV blocks, token totals) are read from the engine's stats snapshot
at scrape time; per-request latencies are observed when a request ends.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from photoninfer.engine.async_engine import RequestStream

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_STEP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_RATE_WINDOW_S = 5.0  # the chat page's tokens/s is averaged over this many recent seconds


class _EngineCollector:
    """Exposes the engine's own counters and gauges, read fresh on every scrape."""

    def __init__(self, stats: Callable):
        self._stats = stats

    def collect(self):
        s = self._stats()
        gauges = {
            "photoninfer_num_requests_running": ("Requests being decoded now.", s.num_running),
            "photoninfer_num_requests_waiting": ("Requests waiting for a slot.", s.num_waiting),
            "photoninfer_kv_blocks_used": ("Paged KV cache blocks in use.", s.kv_blocks_used),
            "photoninfer_kv_blocks_total": ("Paged KV cache blocks in all.", s.kv_blocks_total),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "photoninfer_prompt_tokens": ("Prompt tokens processed.", s.prompt_tokens_total),
            "photoninfer_generation_tokens": ("Tokens generated.", s.generation_tokens_total),
            "photoninfer_engine_steps": ("Engine steps run.", s.steps_total),
            "photoninfer_prefix_cache_hit_tokens": ("Prompt tokens whose KV came from the prefix cache.",
                                                    s.prefix_cache_hit_tokens),
            "photoninfer_preemptions": ("Sequences preempted (KV dropped, recomputed later).", s.num_preemptions),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    def __init__(self, stats: Callable):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        self.requests = Counter(
            "photoninfer_requests", "Requests by outcome: stop, length, abort (client left), error, rejected (4xx).",
            ["outcome"], registry=self.registry)
        self.ttft = Histogram("photoninfer_time_to_first_token_seconds", "Arrival to first generated token.",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("photoninfer_time_per_output_token_seconds",
                              "Mean time between generated tokens, per request.",
                              buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56),
                              registry=self.registry)
        self.e2e = Histogram("photoninfer_e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.step_seqs = Histogram("photoninfer_step_num_seqs", "Sequences batched together in one engine step.",
                                   buckets=_STEP_BUCKETS, registry=self.registry)
        self._rate_lock = threading.Lock()
        self._rate_samples: collections.deque = collections.deque()  # (monotonic time, generation tokens total)

    def observe_step(self, stats) -> None:
        """Called by the engine thread after every step."""
        if stats.last_step_num_seqs:
            self.step_seqs.observe(stats.last_step_num_seqs)
        now = time.monotonic()
        with self._rate_lock:
            self._rate_samples.append((now, stats.generation_tokens_total))
            while self._rate_samples[0][0] < now - _RATE_WINDOW_S:
                self._rate_samples.popleft()

    def generation_tokens_per_s(self) -> float:
        """Tokens generated per second over the last few seconds; decays to 0 when idle."""
        now = time.monotonic()
        with self._rate_lock:
            recent = [sample for sample in self._rate_samples if sample[0] >= now - _RATE_WINDOW_S]
        if len(recent) < 2:
            return 0.0
        (t0, tokens0), (_, tokens1) = recent[0], recent[-1]
        return (tokens1 - tokens0) / max(now - t0, 1e-3)

    def observe_request(self, stream: RequestStream) -> None:
        """Called once when a request's response ends, however it ended."""
        self.requests.labels(outcome=stream.outcome).inc()
        if stream.first_token_time is None:
            return
        self.ttft.observe(stream.first_token_time - stream.arrival_time)
        end = stream.finished_time or time.monotonic()
        self.e2e.observe(end - stream.arrival_time)
        if stream.num_generated_tokens > 1 and stream.finished_time is not None:
            self.tpot.observe((end - stream.first_token_time) / (stream.num_generated_tokens - 1))

    def count_rejected(self, status: int) -> None:
        self.requests.labels(outcome="rejected").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
