"""CUDA graphs for decode-only steps, lone prefills and other (mixed, multi-prompt) steps.

A graph replays a fixed sequence of kernels over fixed addresses: its inputs (token ids, positions, slot
mapping, sequence lengths, block tables) are the batch builder's device buffers, laid out at a fixed width,
and its outputs are static logits (the LM head's dtype) and their arg-max. A decode step of S sequences is padded up to the next captured
size: padding rows write no K/V (slot -1) and attend to nothing (length 0). Capture runs largest size first and all sizes share one memory
pool, so the ladder costs about as much memory as its largest member.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from photoninfer.runner.batch import BatchBuilder, ForwardBatch

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 16: padding wastes at most ~1/8 of a step."""
    sizes = [1, 2, 4] + list(range(8, 64, 8)) + list(range(64, max_num_seqs + 1, 16))
    sizes = sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs})
    return sizes


PREFILL_TOKENS = (16, 32, 64, 128, 256, 512)  # one-sequence prefills (a lone prompt's TTFT) up to 512 tokens
# Other steps (several prompts, prompts beside decodes) by (tokens, sequences), MIXED_TOKENS x MIXED_SEQS within the
# runner's limits: an eager step of many short kernels is host-bound (H100, Llama-3.2-1B, 16 prompts of 100 tokens:
# 8.7-13 ms of host time for 5.7 ms of kernels). H100, twelfth session (docs/benchmarks.md): 12 more graphs, 84 MiB
# and about a second of start-up; Llama-3.2-1B's 16-stream bench (its 16 prompts one step) 10,879-11,162 ->
# 12,644-12,727 tok/s on a slower host (within the spread on a fast one), the nano-vllm workload on the Qwen3-0.6B
# shape 17,259 -> 17,512. $PHOTONINFER_MIXED_GRAPH_TOKENS sets the token sizes ("256,512"; "none": no mixed graphs,
# for comparison).
MIXED_TOKENS_ENV = "PHOTONINFER_MIXED_GRAPH_TOKENS"


def parse_mixed_tokens(text: str) -> tuple:
    """$PHOTONINFER_MIXED_GRAPH_TOKENS: comma-separated positive token counts, or "none" (or empty) for none."""
    if text.strip() in ("", "none"):
        return ()
    try:
        sizes = tuple(int(t) for t in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"{MIXED_TOKENS_ENV} must be positive token counts joined by commas (e.g. 256,512) or "
                         f"'none', got {text!r}")
    return sizes


MIXED_TOKENS: tuple = parse_mixed_tokens(os.environ.get(MIXED_TOKENS_ENV, "256,512,1024,2048"))
MIXED_SEQS = (4, 16, 64)


def mixed_buckets(max_tokens: int, max_seqs: int, max_context: int) -> list[tuple[int, int]]:
    """(tokens, sequences) of the mixed graphs: MIXED_TOKENS x MIXED_SEQS within the runner's limits (a graph of
    more sequences than tokens would only pad)."""
    return [(t, s) for t in MIXED_TOKENS for s in MIXED_SEQS
            if t <= min(max_tokens, max_context) and s <= min(max_seqs, t)]


class StepGraphs:
    """One captured forward (through the LM head) per decode batch size, and per token count of a lone
    sequence's prefill, reading the batch builder's own device buffers: the builder lays such steps out for
    replay (runner/batch.py), so a replay copies nothing."""

    def __init__(self, model, kv_caches: list[torch.Tensor], attention, builder: BatchBuilder, max_num_seqs: int,
                 max_context: int, argmax):
        """argmax: the sampler's row-wise arg-max, captured after the LM head (greedy steps use its ids)."""
        self.model, self.kv_caches, self.attention, self.builder = model, kv_caches, attention, builder
        self.argmax = argmax
        self.sizes = capture_sizes(max_num_seqs)
        self.prefill_tokens = [t for t in PREFILL_TOKENS if t <= min(builder.max_tokens, max_context)]
        self.mixed = mixed_buckets(builder.max_tokens, max_num_seqs, max_context)
        builder.graph_max_context = max_context  # longer sequences run eagerly
        self.graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (logits, greedy ids)

    def _forward(self, key: tuple[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
        kind, size = key
        if kind == "mixed":
            batch = self.builder.mixed_graph_batch(*size)
        else:
            batch = self.builder.graph_batch(size) if kind == "decode" else self.builder.prefill_graph_batch(size)
        meta = self.attention.prepare(batch)
        rows = None if kind == "decode" else batch.logits_indices  # a prefill: its sequences' last tokens' logits
        logits = self.model.all_logits(batch.input_ids, batch.positions, self.kv_caches, meta, rows=rows)
        return logits, self.argmax(logits)

    def record(self, key: tuple[str, int], stream: torch.cuda.Stream, pool=None):
        """(graph, its (logits, greedy ids) outputs): one step of `key` captured on `stream`, which the caller has
        made current, after a warm-up forward (Triton compiles outside the capture). The graph is not kept."""
        self._forward(key)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            outputs = self._forward(key)
        return graph, outputs

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        before = torch.cuda.memory_allocated()
        self.builder.clear_graph_rows()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            keys = ([("mixed", ts) for ts in reversed(self.mixed)]
                    + [("prefill", t) for t in reversed(self.prefill_tokens)]
                    + [("decode", s) for s in reversed(self.sizes)])
            for key in keys:
                self.graphs[key], self.outputs[key] = self.record(key, stream, pool)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.builder.use_graphs(self.sizes, self.prefill_tokens, self.mixed, self.attention.tile_rows)
        logger.info("captured %d CUDA graphs (decode batch sizes %d..%d, lone prefills up to %d tokens, %d mixed, "
                    "context up to %d) in %.1f s, holding %.0f MiB", len(self.graphs), self.sizes[0], self.sizes[-1],
                    self.prefill_tokens[-1] if self.prefill_tokens else 0, len(self.mixed),
                    self.builder.graph_max_context, time.perf_counter() - start,
                    (torch.cuda.memory_allocated() - before) / 2**20)

    def run(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (the LM head's dtype) and their arg-max for a step the builder laid out for a graph:
        [S, vocab] and [S] for a decode step of S sequences, [1, vocab] and [1] (its last token) for a
        lone prefill, one row per sampling sequence for a mixed step."""
        if batch.graph_size is not None:
            key, rows = ("decode", batch.graph_size), batch.num_seqs
        elif batch.graph_mixed is not None:  # the sampling sequences' rows come first
            key, rows = ("mixed", batch.graph_mixed), batch.logits_indices.shape[0]
        else:
            key, rows = ("prefill", batch.graph_tokens), 1
        self.graphs[key].replay()
        logits, greedy = self.outputs[key]
        return logits[:rows], greedy[:rows]
