"""ModelRunner: owns the model weights and the paged KV cache; turns a SchedulerOutput into tensors,
runs the forward pass and samples the sequences whose chunk reached their last token."""

from __future__ import annotations

import logging

import torch

from photoninfer.config import EngineConfig, ModelConfig
from photoninfer.engine.scheduler import SchedulerOutput
from photoninfer.errors import ConfigError
from photoninfer.model.llama import CausalLM
from photoninfer.model.loader import Checkpoint
from photoninfer.runner.attention import AttentionMetadata
from photoninfer.runner.sampler import SampleResult, Sampler, SamplingRow

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, checkpoint: Checkpoint, config: EngineConfig, device: torch.device, dtype: torch.dtype):
        self.model_config: ModelConfig = checkpoint.config
        self.device, self.dtype, self.block_size = device, dtype, config.block_size
        self.model = self._load_model(checkpoint)
        self.num_blocks = config.num_kv_blocks or self._blocks_that_fit(config)
        self.kv_caches = self._allocate_kv_cache(self.num_blocks)
        self.sampler = Sampler(config.seed, device)
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", self.num_blocks, self.block_size,
                    self.num_blocks * self._bytes_per_block() / 2**20)

    def _load_model(self, checkpoint: Checkpoint) -> CausalLM:
        with torch.device(self.device):
            model = CausalLM(self.model_config, self.device)
        for param in model.parameters():  # buffers (the rope table) stay float32
            param.data = param.data.to(self.dtype)
        model.load_weights(checkpoint.weights(), source=checkpoint.path, total=checkpoint.num_tensors)
        return model.eval()

    def _bytes_per_block(self) -> int:
        cfg = self.model_config
        elem = torch.empty((), dtype=self.dtype).element_size()
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
        counted by memory_allocated; a reserve is kept for one step's activations and logits."""
        cfg = self.model_config
        torch.cuda.empty_cache()  # blocks cached by torch's allocator count as free for us
        free, total = torch.cuda.mem_get_info(self.device)
        activations = config.max_num_batched_tokens * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * 4
        logits = config.max_num_seqs * cfg.vocab_size * 4 * 3
        reserve = activations + logits + 256 * 2**20
        allowed = total * config.gpu_memory_utilization - torch.cuda.memory_allocated(self.device)
        return max(min(allowed, free) - reserve, 0)

    def _allocate_kv_cache(self, num_blocks: int) -> list[torch.Tensor]:
        cfg = self.model_config
        shape = (2, num_blocks, self.block_size, cfg.num_key_value_heads, cfg.head_dim)
        return [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.num_hidden_layers)]

    # ---- one step ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, sched: SchedulerOutput, rows: dict[int, SamplingRow]) -> dict[int, SampleResult]:
        """Compute every scheduled chunk; returns the sampled result per seq_id of sampling sequences."""
        input_ids, positions, meta, sample_rows, sample_seq_ids = self._prepare(sched)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        if not sample_seq_ids:
            return {}
        logits = self.model.compute_logits(hidden[sample_rows])
        results = self.sampler(logits, [rows[seq_id] for seq_id in sample_seq_ids])
        return dict(zip(sample_seq_ids, results))

    def _prepare(self, sched: SchedulerOutput):
        tokens, positions, slots = [], [], []
        query_start, seq_lens, block_tables = [0], [], []
        sample_rows, sample_seq_ids = [], []
        for item in sched.scheduled:
            seq = item.seq
            tokens += seq.token_ids[item.start : item.end]
            positions += range(item.start, item.end)
            slots += [seq.block_table[p // self.block_size] * self.block_size + p % self.block_size
                      for p in range(item.start, item.end)]
            query_start.append(len(tokens))
            seq_lens.append(item.end)
            block_tables.append(seq.block_table[: -(-item.end // self.block_size)])
            if item.samples:
                sample_rows.append(len(tokens) - 1)
                sample_seq_ids.append(seq.seq_id)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        meta = AttentionMetadata.build(as_tensor(slots), query_start, seq_lens, block_tables, self.block_size)
        return as_tensor(tokens), as_tensor(positions), meta, as_tensor(sample_rows), sample_seq_ids
