"""Attention over the paged KV cache, behind a small backend interface chosen by device.

The KV cache of one layer is one tensor [2, num_blocks, block_size, num_kv_heads, head_dim] (K, then V).
Token t of a sequence lives in block `block_table[t // block_size]`, offset `t % block_size`; its flat
"slot" is block_id * block_size + offset.

A backend has two methods:
  prepare(batch) -> metadata   once per step, shared by all layers (each backend builds what it needs)
  forward(q, k, v, positions, rope, kv_cache, meta) -> out
                               rotates q and k, writes K/V into the cache, attends from the cache
The torch reference (`TorchPagedAttention`) is the CPU backend and the ground truth that the Triton
backend (CUDA) is tested against.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from photoninfer.runner.batch import ForwardBatch


@dataclass
class PrefillSlice:
    """A sequence computing several tokens this step: query rows [start, end) over context `slots`."""

    start: int
    end: int
    slots: torch.Tensor  # [seq_len] flat cache slots of tokens 0..seq_len-1


@dataclass
class TorchAttentionMetadata:
    """The torch backend's own view of a batch: decoding sequences padded into one batch, the others
    (prefill chunks, recompute) one by one. Index tensors are built once per step for all layers."""

    slot_mapping: torch.Tensor  # [T]
    decode_rows: Optional[torch.Tensor] = None  # [Sd] rows of sequences with exactly one query token
    decode_only: bool = False  # every row decodes, in order: decode_rows is 0..T-1
    decode_blocks: Optional[torch.Tensor] = None  # [Sd * Bmax] their block tables, flat, padded
    decode_width: int = 0  # Lmax: the longest of their contexts
    decode_valid: Optional[torch.Tensor] = None  # [Sd, 1, 1, Lmax] False on padding; None: no padding
    decode_first_block: Optional[int] = None  # a lone decoding sequence whose blocks are consecutive: the first
    prefills: list[PrefillSlice] = field(default_factory=list)


def context_slots(block_tables: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """[S, B] block tables -> [S, length] flat slots of tokens 0..length-1 (padding rows point at block 0)."""
    positions = torch.arange(length, device=block_tables.device)
    return block_tables[:, positions // block_size].long() * block_size + positions % block_size


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V ([T, Hkv, D]) into their slots of the paged cache."""
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = to_cache_dtype(k, k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = to_cache_dtype(v, v_cache.dtype)


FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the cache's dtype. FP8 saturates at +-448 as the GPU's conversion (the kernels') does: torch
    saturates on the CPU but gives NaN on CUDA."""
    if dtype == torch.float8_e4m3fn:
        x = x.clamp(-FP8_MAX, FP8_MAX)
    return x.to(dtype)


class TorchPagedAttention:
    """Reference backend: rotates q/k, writes K/V into the paged cache, then attends from the cache."""

    def __init__(self, scale: float, block_size: int):
        self.scale = scale
        self.block_size = block_size

    def prepare(self, batch: ForwardBatch) -> TorchAttentionMetadata:
        meta = TorchAttentionMetadata(batch.slot_mapping)
        query_start, seq_lens = batch.query_start_host, batch.seq_lens_host
        q_lens = query_start[1:] - query_start[:-1]
        decode = (q_lens == 1).nonzero()[0].tolist()
        if decode:
            device = batch.block_tables.device
            meta.decode_only = len(decode) == len(q_lens)
            index = torch.tensor(decode, device=device)
            meta.decode_rows = torch.tensor(query_start[decode], dtype=torch.long, device=device)
            lens = seq_lens[decode]
            width = meta.decode_width = int(lens.max())
            meta.decode_blocks = batch.block_tables[index, :-(-width // self.block_size)].reshape(-1).long()
            if (lens != width).any():
                valid = torch.arange(width, device=device) < batch.seq_lens[index, None]
                meta.decode_valid = valid[:, None, None, :]
            elif len(decode) == 1 and device.type == "cpu":  # (no device sync for this check)
                blocks = meta.decode_blocks.numpy()
                if (np.diff(blocks) == 1).all():  # the usual single stream: its context is a view, no copy
                    meta.decode_first_block = int(blocks[0])
        for i in (q_lens > 1).nonzero()[0].tolist():
            slots = context_slots(batch.block_tables[i:i + 1], int(seq_lens[i]), self.block_size)[0]
            meta.prefills.append(PrefillSlice(int(query_start[i]), int(query_start[i + 1]), slots))
        return meta

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, rope,
                kv_cache: torch.Tensor, meta: TorchAttentionMetadata, qk_norm=None) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D]. `qk_norm`: (q_norm, k_norm) RMSNorm modules applied
        to each head before the rotation (Qwen3), or None."""
        if qk_norm is not None:
            q, k = qk_norm[0](q), qk_norm[1](k)
        q, k = rope(positions, q, k)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        return self.attend(q, k_cache, v_cache, meta)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: TorchAttentionMetadata) -> torch.Tensor:
        """Attention of q's rows over the cache, which already holds this step's K/V."""
        if meta.decode_only:
            return self._decode(q, k_cache, v_cache, meta)
        k_flat = k_cache.view(-1, *k_cache.shape[2:])
        v_flat = v_cache.view(-1, *v_cache.shape[2:])
        out = torch.empty_like(q)
        if meta.decode_rows is not None:
            out[meta.decode_rows] = self._decode(q[meta.decode_rows], k_cache, v_cache, meta)
        for p in meta.prefills:
            out[p.start:p.end] = self._prefill(q[p.start:p.end], k_flat[p.slots], v_flat[p.slots])
        return out

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: TorchAttentionMetadata) -> torch.Tensor:
        """q: [S, Hq, D], one query per sequence over its whole context. Whole blocks are gathered (one
        copy per cache), cut to the longest context; shorter ones are masked."""
        num_seqs, num_heads, head_dim = q.shape
        num_kv_heads = k_cache.shape[2]

        def gather(cache: torch.Tensor) -> torch.Tensor:  # -> [S, Hkv, Lmax, D]
            if meta.decode_first_block is not None:
                rows = cache[meta.decode_first_block:meta.decode_first_block + len(meta.decode_blocks)]
            else:
                rows = cache.index_select(0, meta.decode_blocks)
            rows = rows.view(num_seqs, -1, num_kv_heads, head_dim)
            return rows[:, :meta.decode_width].transpose(1, 2).to(q.dtype)

        out = F.scaled_dot_product_attention(q.unsqueeze(2), gather(k_cache), gather(v_cache),
                                             attn_mask=meta.decode_valid, scale=self.scale, enable_gqa=True)
        return out.view(num_seqs, num_heads, head_dim)

    def _prefill(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Causal attention of the last len(q) positions of a context of len(keys) tokens."""
        num_q, ctx = q.shape[0], keys.shape[0]
        keys, values = keys.to(q.dtype).transpose(0, 1), values.to(q.dtype).transpose(0, 1)
        if num_q == ctx:  # a whole prompt: plain causal attention
            out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, is_causal=True, scale=self.scale,
                                                 enable_gqa=True)
            return out.transpose(0, 1)
        # query j sits at position ctx - num_q + j and may see keys 0..that position
        q_pos = torch.arange(ctx - num_q, ctx, device=q.device).unsqueeze(1)
        mask = torch.arange(ctx, device=q.device).unsqueeze(0) <= q_pos
        out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask, scale=self.scale,
                                             enable_gqa=True)
        return out.transpose(0, 1)


class TritonPagedAttention:
    """CUDA backend: a decode step is one paged decode kernel per layer (split over the context,
    GQA-grouped), which also rotates q/k and writes K/V; other steps run the fused RoPE + K/V write kernel,
    then the varlen prefill kernel."""

    def __init__(self, scale: float, block_size: int):
        from photoninfer.kernels import paged_attention, rope

        self.scale, self.block_size = scale, block_size
        self._attention, self._rope = paged_attention, rope
        self.num_sms = torch.cuda.get_device_properties().multi_processor_count if torch.cuda.is_available() else 8
        self._partials: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # the decode workspace's storage
        self._retired: list = []  # storage that captured CUDA graphs may still write to: never freed
        self.tile_rows = paged_attention.DEFAULT_BLOCK_M  # query rows a prefill program (the mixed graphs' tiles)

    def decode_partitions(self, num_seqs: int, num_kv_heads: int) -> int:
        """Split a context over more programs only while (sequence, kv head) pairs leave the GPU idle: two
        waves of programs. A context longer than that covers several partitions per program."""
        return max(1, -(-2 * self.num_sms // (num_seqs * num_kv_heads)))

    def decode_workspace(self, q: torch.Tensor, num_kv_heads: int, splits: int):
        """Views of one persistent storage for a decode's partials and counters (the counters must stay
        zero between calls, and a CUDA graph keeps the addresses it was captured with). Sized at the first
        split decode for any this backend runs: P > 1 only while rows * Hkv < 2 * SMs, so rows * Hkv * P <
        4 * SMs programs write partials."""
        rows, heads, head_dim = q.shape
        stats = rows * heads * splits  # one max and one sum per partial
        need, need_done = stats * (head_dim + 2), rows * num_kv_heads
        if self._partials is None or self._partials[0].numel() < need or self._partials[1].numel() < need_done:
            if self._partials is not None:
                self._retired.append(self._partials)
            most = 4 * self.num_sms * (heads // num_kv_heads) * (head_dim + 2)
            self._partials = (torch.empty(max(need, most), dtype=torch.float32, device=q.device),
                              torch.zeros(max(need_done, 2 * self.num_sms), dtype=torch.int32, device=q.device))
        storage, done = self._partials
        need_out = stats * head_dim
        return self._attention.DecodeWorkspace(
            storage[:need_out].view(rows, heads, splits, head_dim),
            storage[need_out:need_out + stats].view(rows, heads, splits),
            storage[need_out + stats:need_out + 2 * stats].view(rows, heads, splits),
            done[:need_done].view(rows, num_kv_heads))

    def prepare(self, batch: ForwardBatch) -> ForwardBatch:
        """The kernels read the flat batch as it is. Its max_seq_len sizes the decode grid (a CUDA graph's
        static batch carries the graph's context limit there, so one grid serves every replay)."""
        return batch

    def forward(self, q, k, v, positions, rope, kv_cache, batch: ForwardBatch, qk_norm=None):
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        norms = () if qk_norm is None else (qk_norm[0].weight, qk_norm[1].weight, qk_norm[0].eps)
        if batch.is_decode_only:  # the decode kernel normalizes (Qwen3) and rotates q, k and writes K/V itself
            new_tokens = self._attention.NewTokens(k, v, positions, rope.cos, rope.sin, batch.slot_mapping, *norms)
            num_kv_heads = k_cache.shape[2]
            cap = self.decode_partitions(q.shape[0], num_kv_heads)
            splits = self._attention.decode_splits(batch.max_seq_len, max_num_partitions=cap)
            self._attention.paged_decode_attention(
                q, k_cache, v_cache, batch.block_tables, batch.seq_lens, self.scale, out, batch.max_seq_len,
                max_num_partitions=cap, new_tokens=new_tokens,
                workspace=self.decode_workspace(q, num_kv_heads, splits) if splits > 1 else None)
        else:  # the RoPE kernel normalizes (Qwen3), rotates q and k in place and writes K/V
            self._rope.rope_and_cache_kv(q, k, v, positions, rope.cos, rope.sin, k_cache, v_cache,
                                         batch.slot_mapping, *norms)
            tiles = batch.prefill_tiles  # a mixed graph's map, of tile_rows rows a tile
            self._attention.paged_prefill_attention(q, k_cache, v_cache, batch.block_tables, batch.query_start_loc,
                                                    batch.seq_lens, self.scale, out, batch.max_query_len,
                                                    block_m=self.tile_rows if tiles is not None else None, tiles=tiles)
        return out


def triton_available() -> bool:
    """Triton kernels are used on CUDA unless PHOTONINFER_TORCH_BACKEND=1 asks for the torch reference."""
    if os.environ.get("PHOTONINFER_TORCH_BACKEND") == "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def make_attention_backend(device: torch.device, scale: float, block_size: int):
    """One place that picks the attention implementation for a device."""
    if device.type == "cuda" and triton_available():
        return TritonPagedAttention(scale, block_size)
    return TorchPagedAttention(scale, block_size)
