"""CUDA graphs for decode-only steps.

A graph replays a fixed sequence of kernels over fixed addresses, so each captured batch size owns static
input buffers (token ids, positions, slot mapping, sequence lengths, block tables) and a static logits
output. A decode step of S sequences is padded up to the next captured size: padding rows write no K/V
(slot -1) and attend to nothing (length 0). Capture runs largest size first and all sizes share one memory
pool, so the ladder costs about as much memory as its largest member.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from photoninfer.runner.batch import ForwardBatch

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 16: padding wastes at most ~1/8 of a step."""
    sizes = [1, 2, 4] + list(range(8, 64, 8)) + list(range(64, max_num_seqs + 1, 16))
    sizes = sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs})
    return sizes


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], attention, max_num_seqs: int, max_context: int,
                 block_size: int, device: torch.device):
        self.model, self.kv_caches, self.attention = model, kv_caches, attention
        self.sizes = capture_sizes(max_num_seqs)
        self.max_context = max_context  # longer sequences run eagerly
        self.max_blocks = -(-max_context // block_size)
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def _static_batch(self, size: int) -> ForwardBatch:
        ones = np.arange(size + 1)
        return ForwardBatch(
            input_ids=self.input_ids[:size], positions=self.positions[:size], slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[:size + 1], seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size], logits_indices=None, pending_dst=None, pending_src=None, num_tokens=size, num_seqs=size,
            max_query_len=1, max_seq_len=self.max_context, query_start_host=ones,
            seq_lens_host=np.full(size, self.max_context))

    def _forward(self, size: int) -> torch.Tensor:
        batch = self._static_batch(size)
        meta = self.attention.prepare(batch)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        before = torch.cuda.memory_allocated()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):
                self._forward(size)  # warm-up: Triton compiles and autotunes outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.logits[size] = self._forward(size)
                self.graphs[size] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs (batch sizes %d..%d, context up to %d) in %.1f s, holding %.0f MiB",
                    len(self.sizes), self.sizes[0], self.sizes[-1], self.max_context, time.perf_counter() - start,
                    (torch.cuda.memory_allocated() - before) / 2**20)

    def can_run(self, batch: ForwardBatch) -> bool:
        return (batch.is_decode_only and batch.num_seqs <= self.sizes[-1] and batch.max_seq_len <= self.max_context
                and batch.logits_indices.numel() == batch.num_seqs)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [S, vocab] of a decode-only batch (every sequence samples)."""
        num_seqs = batch.num_seqs
        size = next(s for s in self.sizes if s >= num_seqs)
        width = batch.block_tables.shape[1]
        self.input_ids[:num_seqs].copy_(batch.input_ids)
        self.positions[:num_seqs].copy_(batch.positions)
        self.slot_mapping[:num_seqs].copy_(batch.slot_mapping)
        self.seq_lens[:num_seqs].copy_(batch.seq_lens)
        self.block_tables[:num_seqs, :width].copy_(batch.block_tables)
        if size > num_seqs:  # padding rows: no K/V write, empty context
            self.slot_mapping[num_seqs:size].fill_(-1)
            self.seq_lens[num_seqs:size].zero_()
        self.graphs[size].replay()
        return self.logits[size][:num_seqs]
