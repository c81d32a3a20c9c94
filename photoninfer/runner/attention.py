"""Attention over the paged KV cache, behind a small backend interface chosen by device.

The KV cache of one layer is two tensors [num_blocks, block_size, num_kv_heads, head_dim]. Token t of
a sequence lives in block `block_table[t // block_size]`, offset `t % block_size`; its flat "slot" is
block_id * block_size + offset. The torch reference here is the CPU backend and the ground truth the
Triton kernels (CUDA backend, a later issue) are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Describes one flattened batch: sequence i owns query rows query_start[i]:query_start[i+1]."""

    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V is written
    query_start: list[int]  # [S+1] offsets into the T rows
    seq_lens: list[int]  # [S] tokens in context after this step (computed before + new)
    block_tables: list[list[int]]  # [S] block ids of each sequence

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V ([T, Hkv, D]) into their slots of the paged cache."""
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)


def gather_context(cache: torch.Tensor, block_table: list[int], seq_len: int) -> torch.Tensor:
    """The first `seq_len` cached tokens of one sequence, contiguous: [seq_len, Hkv, D]."""
    blocks = cache[torch.tensor(block_table, dtype=torch.long, device=cache.device)]
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


class TorchPagedAttention:
    """Reference backend: writes K/V into the paged cache, then attends each sequence separately."""

    def __init__(self, scale: float):
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D]."""
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        for i in range(meta.num_seqs):
            start, end = meta.query_start[i], meta.query_start[i + 1]
            seq_len = meta.seq_lens[i]
            keys = gather_context(k_cache, meta.block_tables[i], seq_len)
            values = gather_context(v_cache, meta.block_tables[i], seq_len)
            out[start:end] = self._attend(q[start:end], keys, values)
        return out

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Causal attention of the last len(q) positions of a context of len(keys) tokens."""
        num_q, ctx = q.shape[0], keys.shape[0]
        group = q.shape[1] // keys.shape[1]
        keys = keys.to(q.dtype).repeat_interleave(group, dim=1)
        values = values.to(q.dtype).repeat_interleave(group, dim=1)
        # query j sits at position ctx - num_q + j and may see keys 0..that position
        q_pos = torch.arange(ctx - num_q, ctx, device=q.device).unsqueeze(1)
        mask = torch.arange(ctx, device=q.device).unsqueeze(0) <= q_pos
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask, scale=self.scale
        )
        return out.transpose(0, 1)


def make_attention_backend(device: torch.device, scale: float):
    """One place that picks the attention implementation for a device (Triton on CUDA comes later)."""
    return TorchPagedAttention(scale)
