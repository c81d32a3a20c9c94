"""ModelRunner: owns the model weights and the paged KV cache; turns a SchedulerOutput into one flat batch,
runs the forward pass (a CUDA graph replay for decode-only steps on a GPU) and samples the sequences whose
chunk reached their last token."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from photoninfer.config import EngineConfig, ModelConfig, packs_weights, resolve_kv_cache_dtype, set_cpu_threads
from photoninfer.engine.scheduler import SchedulerOutput
from photoninfer.errors import ConfigError
from photoninfer.model.llama import CausalLM
from photoninfer.model.loader import Checkpoint, build_model
from photoninfer.runner.attention import make_attention_backend, triton_available
from photoninfer.runner.batch import BatchBuilder, ForwardBatch
from photoninfer.runner.cpu_kv_memory import lazy_zeros, prefault_in_background
from photoninfer.runner.cuda_graph import StepGraphs, mixed_buckets
from photoninfer.runner.prompt_logprobs import (PromptLogprobsChunk, PromptLogprobsWanted, prompt_rows,
                                                prompt_token_logprobs)
from photoninfer.runner.sampler import SampledTokens, SampleResult, Sampler, SamplingRow

logger = logging.getLogger(__name__)

GRAPH_MAX_CONTEXT = 8192  # steps with a longer context run eagerly (the graphs' block tables stop here)


class ModelRunner:
    def __init__(self, checkpoint: Checkpoint, config: EngineConfig, device: torch.device, dtype: torch.dtype):
        self.model_config: ModelConfig = checkpoint.config
        self.device, self.dtype, self.block_size = device, dtype, config.block_size
        self.cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, dtype)
        if device.type == "cpu":
            logger.info("CPU: %d threads, %s", set_cpu_threads(config.threads), dtype)
        self.model: CausalLM = build_model(checkpoint, device, dtype, pack=packs_weights(config.dtype, device))
        self.num_blocks = config.num_kv_blocks or self._blocks_that_fit(config)
        self.kv_caches = self._allocate_kv_cache(self.num_blocks)
        self.max_model_len = self._resolve_max_model_len(config)
        self.sampler = Sampler(config.seed)
        self.model.attention = make_attention_backend(device, self.model_config.head_dim**-0.5, self.block_size)
        if device.type == "cuda" and triton_available():
            self.model.use_kernels()
            from photoninfer.kernels.argmax import argmax_rows

            self.sampler.argmax = argmax_rows
        self.batch_builder = BatchBuilder(
            max(config.max_num_batched_tokens, config.max_num_seqs), config.max_num_seqs,
            -(-self.max_model_len // self.block_size), self.block_size, device)
        tokens = self.num_blocks * self.block_size
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.1f MiB of %s), room for %.1f sequences of 4k "
                    "tokens", self.num_blocks, self.block_size, tokens, self.num_blocks * self._bytes_per_block() / 2**20,
                    str(self.cache_dtype).replace("torch.", ""), tokens / 4096)
        if device.type == "cuda" and triton_available():
            self._warm_up(min(max(config.max_num_batched_tokens, config.max_num_seqs), self.max_model_len))
        self.graphs = None
        if device.type == "cuda" and not config.enforce_eager and triton_available():  # graphs need the kernels
            self.graphs = StepGraphs(self.model, self.kv_caches, self.model.attention, self.batch_builder,
                                       config.max_num_seqs, min(self.max_model_len, GRAPH_MAX_CONTEXT),
                                       self.sampler.argmax)
            self.graphs.capture()

    # Triton compiles a kernel again for each new combination of its integer arguments being 1, a multiple of
    # 16 or neither (tokens, sequences, longest chunk, ...): these batches cover the combinations steps meet
    # (scripts/late_compiles.py lists any kernel that still compiles after start-up).
    WARM_UP_CHUNKS = ([37], [16], [17, 16, 1], [16, 16], [1], [1, 1, 1], [1] * 16, [100] * 16, [16] * 16,
                      [3] * 16, [5, 1, 1])

    @torch.inference_mode()
    def _warm_up(self, max_tokens: int) -> None:
        """Eager forwards of the batch shapes above and of a full token budget, so that Triton compiles its
        kernel variants now rather than during the first requests. They write no K/V (slot -1) and read only
        block 0."""
        start = time.perf_counter()
        for q_lens in self.WARM_UP_CHUNKS + ([max_tokens],):
            total = sum(q_lens)
            if total > max_tokens:
                continue
            query_start = np.concatenate([[0], np.cumsum(q_lens)])
            tables = [[0] * -(-n // self.block_size) for n in q_lens]
            batch = ForwardBatch.for_attention(torch.full((total,), -1, dtype=torch.long, device=self.device),
                                               query_start.tolist(), q_lens, tables)
            batch.positions = torch.cat([torch.arange(n, device=self.device) for n in q_lens])
            batch.input_ids = torch.zeros(total, dtype=torch.long, device=self.device)
            meta = self.model.attention.prepare(batch)
            if max(q_lens) == 1:  # decode-shaped: the logits as a decode step computes them (launch())
                logits = self.model.all_logits(batch.input_ids, batch.positions, self.kv_caches, meta)
            else:
                hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, meta)
                logits = self.model.raw_logits(hidden[query_start[1:] - 1])
            self.sampler.argmax(logits)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        logger.info("warmed up the kernels in %.1f s", time.perf_counter() - start)

    def _resolve_max_model_len(self, config: EngineConfig) -> int:
        model_max = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > model_max:
            raise ConfigError(
                f"max_model_len {config.max_model_len} exceeds the model's max_position_embeddings {model_max}"
            )
        cache_tokens = self.num_blocks * self.block_size
        max_len = min(config.max_model_len or model_max, cache_tokens)
        if max_len < (config.max_model_len or model_max):
            logger.warning("max_model_len limited to %d tokens: that is all the KV cache holds", max_len)
        return max_len

    def _bytes_per_block(self) -> int:
        cfg = self.model_config
        elem = torch.empty((), dtype=self.cache_dtype).element_size()
        return 2 * cfg.num_hidden_layers * self.block_size * cfg.kv_size * elem

    def _blocks_that_fit(self, config: EngineConfig) -> int:
        if self.device.type == "cuda":
            budget = self._gpu_kv_budget(config)
        else:
            budget = config.kv_cache_memory_gb * 2**30
        num_blocks = int(budget // self._bytes_per_block())
        if num_blocks < 1:
            raise ConfigError(
                f"no memory left for the KV cache on {self.device} (budget {budget / 2**20:.0f} MiB after weights "
                f"and activations); raise --gpu-memory-utilization or --kv-cache-memory-gb, or lower "
                f"--max-num-batched-tokens / --max-num-seqs"
            )
        return num_blocks

    def _gpu_kv_budget(self, config: EngineConfig) -> float:
        """This engine may hold gpu_memory_utilization of the card: weights and live tensors are already
        counted by memory_allocated; a reserve is kept for one step's activations, the logits and the
        CUDA graphs' pool (about one largest decode step)."""
        cfg = self.model_config
        torch.cuda.empty_cache()  # blocks cached by torch's allocator count as free for us
        free, total = torch.cuda.mem_get_info(self.device)
        tokens = max(config.max_num_batched_tokens, config.max_num_seqs)
        activations = tokens * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * 4
        logits = config.max_num_seqs * cfg.vocab_size * 4 * 3
        graphs = 0 if config.enforce_eager else logits + config.max_num_seqs * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * 4
        mixed = [] if config.enforce_eager else mixed_buckets(tokens, config.max_num_seqs, tokens)
        if mixed:  # the largest mixed graph's activations and logits stay in the graphs' pool
            graphs += (max(t for t, _ in mixed) * (4 * cfg.hidden_size + 3 * cfg.intermediate_size)
                       + max(s for _, s in mixed) * cfg.vocab_size) * 4
        reserve = activations + logits + graphs + 256 * 2**20
        allowed = total * config.gpu_memory_utilization - torch.cuda.memory_allocated(self.device)
        return max(min(allowed, free) - reserve, 0)

    def _allocate_kv_cache(self, num_blocks: int) -> list[torch.Tensor]:
        cfg = self.model_config
        shape = (2, num_blocks, self.block_size, cfg.num_key_value_heads, cfg.head_dim)
        if self.device.type == "cpu":
            caches = [lazy_zeros(shape, self.cache_dtype) for _ in range(cfg.num_hidden_layers)]
            self.prefault = prefault_in_background(caches)
            return caches
        return [torch.zeros(shape, dtype=self.cache_dtype, device=self.device) for _ in range(cfg.num_hidden_layers)]

    # ---- one step ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, sched: SchedulerOutput, rows: dict[int, SamplingRow]) -> dict[int, SampleResult]:
        """Compute every scheduled chunk and wait for the sampled results (keyed by seq_id)."""
        handle = self.launch(sched, rows)
        if handle.sampled is None:
            return {}
        return {seq.seq_id: result for seq, result in zip(handle.sampling_seqs, handle.sampled.results())}

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, rows: dict[int, SamplingRow], previous: Optional[StepHandle] = None,
               prompt_logprobs: Optional[dict[int, PromptLogprobsWanted]] = None) -> StepHandle:
        """Queue one step on the device and return without waiting for it. Input tokens that `previous`
        sampled and the host has not read yet are taken from its device tensor. The prompt-logprob entries
        of the sequences in `prompt_logprobs` (keyed by seq_id) are computed at once (a host sync)."""
        previous_seqs = previous.sampling_seqs if previous is not None else None
        # a prompt-logprob step needs every row's hidden state: no lone-prefill graph (decode steps have no prompt rows)
        batch, sampling_seqs = self.batch_builder.build(sched, previous_seqs, prefill_graphs=not prompt_logprobs)
        if batch.pending_in_order:  # one copy instead of a gather and a scatter (two kernels, ~45 us of host time)
            pending = batch.pending_dst.shape[0]
            batch.input_ids[:pending].copy_(previous.sampled.token_ids[:pending])
        elif batch.pending_dst is not None:
            batch.input_ids[batch.pending_dst] = previous.sampled.token_ids[batch.pending_src]
        chunks, greedy_ids = {}, None
        if batch.graph_size is not None or batch.graph_tokens is not None or batch.graph_mixed is not None:
            logits, greedy_ids = self.graphs.run(batch)
        else:
            meta = self.model.attention.prepare(batch)
            if not prompt_logprobs and len(sampling_seqs) == batch.num_tokens == batch.num_seqs:
                # a decode step (every row sampled), eagerly: the same ops as its graph
                logits = self.model.all_logits(batch.input_ids, batch.positions, self.kv_caches, meta)
            else:
                hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, meta)
                if prompt_logprobs:
                    chunks = self._prompt_logprobs(sched, batch.query_start_host.tolist(), hidden, prompt_logprobs)
                logits = self.model.raw_logits(hidden[batch.logits_indices]) if sampling_seqs else None
        if not sampling_seqs:
            return StepHandle(sched, [], None, chunks)
        sampled = self.sampler.sample(logits, [rows[seq.seq_id] for seq in sampling_seqs], greedy_ids)
        sampled.copy_to_host()
        return StepHandle(sched, sampling_seqs, sampled, chunks)

    def _prompt_logprobs(self, sched: SchedulerOutput, query_start, hidden: torch.Tensor,
                         wanted: dict[int, PromptLogprobsWanted]) -> dict[int, PromptLogprobsChunk]:
        """Entries from the rows of each chunk that predict a prompt token (query_start[i]: item i's first row)."""
        chunks = {}
        for item, offset in zip(sched.scheduled, query_start):
            seq, want = item.seq, wanted.get(item.seq.seq_id)
            positions = prompt_rows(item.start, item.end, seq.num_prompt_tokens, want.first_entry) if want else ()
            if positions:
                first, last = positions[0], positions[-1]
                rows = hidden[offset + first - item.start : offset + last + 1 - item.start]
                targets = torch.tensor(seq.token_ids[first + 1 : last + 2], dtype=torch.long, device=self.device)
                entries = prompt_token_logprobs(rows, targets, want.num_top, self.model.compute_logits)
                chunks[seq.seq_id] = PromptLogprobsChunk(first + 1, entries)
        return chunks

    @staticmethod
    def collect(handle: StepHandle) -> tuple[list[int], dict[int, SampleResult]]:
        """Wait for a launched step: the sampled id of each of `handle.sampling_seqs` (in order), and the full
        result of the rows that asked for logprobs (by row)."""
        if handle.sampled is None:
            return [], {}
        return handle.sampled.host_results()


@dataclass
class StepHandle:
    """A step queued on the device: what was scheduled, who samples, and the sampled ids (device side)."""

    sched: SchedulerOutput
    sampling_seqs: list
    sampled: Optional[SampledTokens]
    prompt_logprobs: dict[int, PromptLogprobsChunk] = field(default_factory=dict)  # seq_id -> its chunk's entries
