"""A random paged KV cache and flat varlen batch, laid out as the runner lays them out, with the
reference output of TorchPagedAttention for it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from photoninfer.runner.attention import TorchPagedAttention
from photoninfer.runner.batch import ForwardBatch


@dataclass
class PagedBatch:
    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]; slots no sequence owns hold NaN
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [S, max_blocks] int32, padded with 0 (block 0 is never allocated)
    query_start_loc: torch.Tensor  # [S+1] int32
    seq_lens: torch.Tensor  # [S] int32
    scale: float
    expected: torch.Tensor  # [T, Hq, D] from TorchPagedAttention

    @property
    def max_query_len(self) -> int:
        return int((self.query_start_loc[1:] - self.query_start_loc[:-1]).max())


def make_paged_batch(seq_lens: list[int], q_lens: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int,
                     block_size: int, dtype: torch.dtype, seed: int, device="cpu",
                     cache_dtype: torch.dtype = None) -> PagedBatch:
    """Sequence i has seq_lens[i] tokens in context, the last q_lens[i] of them computed this step.
    Built and referenced on the CPU, then moved to `device`. The cache holds `cache_dtype` (default: dtype).

    Blocks are handed out in random order from 1..; block 0 and every slot beyond a sequence's length hold
    NaN, so a kernel that reads outside a context poisons its output.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = 1 + sum(blocks_per_seq) + 2
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = [[order.pop() for _ in range(n)] for n in blocks_per_seq]
    max_blocks = max(blocks_per_seq + [1]) + 1  # one padding column
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    for i, table in enumerate(tables):
        block_tables[i, :len(table)] = torch.tensor(table, dtype=torch.int32)

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=cache_dtype or dtype)
    v_cache = torch.full(shape, float("nan"), dtype=cache_dtype or dtype)
    k_flat, v_flat = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
    new_k, new_v, new_slots = [], [], []
    for table, n, q_len in zip(tables, seq_lens, q_lens):
        positions = torch.arange(n)
        slots = torch.tensor(table, dtype=torch.long)[positions // block_size] * block_size + positions % block_size
        k_flat[slots] = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(k_cache.dtype)
        v_flat[slots] = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(v_cache.dtype)
        new_k.append(k_flat[slots[n - q_len:]])
        new_v.append(v_flat[slots[n - q_len:]])
        new_slots.append(slots[n - q_len:])

    query_start = [0]
    for q_len in q_lens:
        query_start.append(query_start[-1] + q_len)
    q = (2 * torch.randn(query_start[-1], num_q_heads, head_dim, generator=gen)).to(dtype)
    scale = head_dim ** -0.5
    reference = TorchPagedAttention(scale, block_size)
    meta = reference.prepare(ForwardBatch.for_attention(torch.cat(new_slots), query_start, seq_lens, tables))
    # This step's K/V are already in place. The reference's padded decode gathers slot 0 for padding
    # (masked, but 0 * NaN is NaN): give it a NaN-free copy of the cache.
    # (The reference widens K/V to q's dtype as it reads them: so may this copy.)
    expected = reference.attend(q, k_cache.to(dtype).nan_to_num(), v_cache.to(dtype).nan_to_num(), meta)
    assert not expected.isnan().any()
    tensors = (q, k_cache, v_cache, block_tables, torch.tensor(query_start, dtype=torch.int32),
               torch.tensor(seq_lens, dtype=torch.int32))
    return PagedBatch(*(t.to(device) for t in tensors), scale, expected.to(device))


def tolerance(dtype: torch.dtype) -> dict:
    """float32 is tight; half types differ from the reference in where they round the probabilities."""
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
