"""Attention over the paged KV cache, behind a small backend interface chosen by device.

The KV cache of one layer is two tensors [num_blocks, block_size, num_kv_heads, head_dim]. Token t of
a sequence lives in block `block_table[t // block_size]`, offset `t % block_size`; its flat "slot" is
block_id * block_size + offset. The torch reference here is the CPU backend and the ground truth the
Triton kernels (CUDA backend, a later issue) are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillSlice:
    """A sequence computing several tokens this step: query rows [start, end) over context `slots`."""

    start: int
    end: int
    slots: torch.Tensor  # [seq_len] flat cache slots of tokens 0..seq_len-1


@dataclass
class AttentionMetadata:
    """Describes one flattened batch: sequence i owns query rows query_start[i]:query_start[i+1].

    The layout fields (slot_mapping, query_start, seq_lens, block_tables) are what a fused kernel needs;
    the derived index tensors below are built once per step for the torch backend and shared by all layers.
    """

    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V is written
    query_start: list[int]  # [S+1] offsets into the T rows
    seq_lens: list[int]  # [S] tokens in context after this step (computed before + new)
    block_tables: list[list[int]]  # [S] block ids of each sequence
    decode_rows: torch.Tensor = None  # [Sd] rows of sequences with exactly one query token
    decode_slots: torch.Tensor = None  # [Sd, Lmax] their context slots, padded
    decode_valid: torch.Tensor = None  # [Sd, Lmax] False on padding
    prefills: list[PrefillSlice] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @classmethod
    def build(cls, slot_mapping: torch.Tensor, query_start: list[int], seq_lens: list[int],
              block_tables: list[list[int]], block_size: int) -> "AttentionMetadata":
        device = slot_mapping.device
        meta = cls(slot_mapping, query_start, seq_lens, block_tables)
        decode_rows, decode_slots = [], []
        for i, seq_len in enumerate(seq_lens):
            slots = context_slots(block_tables[i], seq_len, block_size, device)
            start, end = query_start[i], query_start[i + 1]
            if end - start == 1:
                decode_rows.append(start)
                decode_slots.append(slots)
            else:
                meta.prefills.append(PrefillSlice(start, end, slots))
        if decode_rows:
            meta.decode_rows = torch.tensor(decode_rows, dtype=torch.long, device=device)
            meta.decode_slots = torch.nn.utils.rnn.pad_sequence(decode_slots, batch_first=True)
            lengths = torch.tensor([len(s) for s in decode_slots], device=device)
            meta.decode_valid = torch.arange(meta.decode_slots.shape[1], device=device) < lengths[:, None]
        return meta


def context_slots(block_table: list[int], seq_len: int, block_size: int, device) -> torch.Tensor:
    """Flat cache slots of a sequence's first `seq_len` tokens."""
    positions = torch.arange(seq_len, device=device)
    blocks = torch.tensor(block_table, dtype=torch.long, device=device)
    return blocks[positions // block_size] * block_size + positions % block_size


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V ([T, Hkv, D]) into their slots of the paged cache."""
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)


class TorchPagedAttention:
    """Reference backend: writes K/V into the paged cache, then attends from the cache.

    Decoding sequences (one query each) are attended together in one padded batch; sequences computing
    several tokens (prefill chunks, recompute) are attended one by one with a causal mask.
    """

    def __init__(self, scale: float):
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D]."""
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        k_flat = k_cache.view(-1, *k_cache.shape[2:])
        v_flat = v_cache.view(-1, *v_cache.shape[2:])
        out = torch.empty_like(q)
        if meta.decode_rows is not None:
            out[meta.decode_rows] = self._decode(q[meta.decode_rows], k_flat[meta.decode_slots],
                                                 v_flat[meta.decode_slots], meta.decode_valid)
        for p in meta.prefills:
            out[p.start:p.end] = self._prefill(q[p.start:p.end], k_flat[p.slots], v_flat[p.slots])
        return out

    def _decode(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """q: [S, Hq, D]; keys, values: [S, L, Hkv, D] padded; valid: [S, L]."""
        num_seqs, num_heads, head_dim = q.shape
        num_kv_heads = keys.shape[2]
        q = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)  # query heads grouped per kv head
        scores = torch.einsum("shgd,slhd->shgl", q, keys.to(q.dtype)).float() * self.scale
        scores.masked_fill_(~valid[:, None, None, :], -float("inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        return torch.einsum("shgl,slhd->shgd", probs, values.to(q.dtype)).reshape(num_seqs, num_heads, head_dim)

    def _prefill(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
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
