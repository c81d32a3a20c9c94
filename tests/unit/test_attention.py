"""The torch paged-attention reference against plain causal attention over contiguous K/V."""

import pytest
import torch

import numpy as np

from photoninfer.runner.attention import TorchPagedAttention
from photoninfer.runner.batch import ForwardBatch

BLOCK = 4
HQ, HKV, D = 6, 2, 8


def naive_attention(q, k, v, scale):
    """q: [n, Hq, D] for the last n positions; k, v: [L, Hkv, D] contiguous."""
    n, L = q.shape[0], k.shape[0]
    k = k.repeat_interleave(HQ // HKV, dim=1)
    v = v.repeat_interleave(HQ // HKV, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    causal = torch.arange(L)[None, :] <= torch.arange(L - n, L)[:, None]
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v)


def test_paged_attention_matches_contiguous_attention_for_mixed_batches():
    g = torch.Generator().manual_seed(0)
    # (tokens already cached, tokens computed this step): decodes, a first prefill, a later chunk
    seqs = [(9, 1), (0, 7), (5, 6), (30, 1), (3, 1)]
    num_blocks = 40
    kv_cache_init = torch.zeros(2, num_blocks, BLOCK, HKV, D)
    k_cache, v_cache = kv_cache_init[0], kv_cache_init[1]
    free = torch.randperm(num_blocks, generator=g).tolist()  # scattered, non-contiguous blocks
    full_k, full_v, tables = [], [], []
    slots, query_start, seq_lens = [], [0], []
    q_rows, new_k, new_v = [], [], []
    for cached, new in seqs:
        total = cached + new
        table = [free.pop() for _ in range(-(-total // BLOCK))]
        k = torch.randn(total, HKV, D, generator=g)
        v = torch.randn(total, HKV, D, generator=g)
        flat_k, flat_v = k_cache.view(-1, HKV, D), v_cache.view(-1, HKV, D)
        for pos in range(cached):  # what earlier steps wrote
            slot = table[pos // BLOCK] * BLOCK + pos % BLOCK
            flat_k[slot], flat_v[slot] = k[pos], v[pos]
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(cached, total)]
        q_rows.append(torch.randn(new, HQ, D, generator=g))
        new_k.append(k[cached:])
        new_v.append(v[cached:])
        full_k.append(k)
        full_v.append(v)
        tables.append(table)
        query_start.append(query_start[-1] + new)
        seq_lens.append(total)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    batch = ForwardBatch(
        input_ids=None, positions=None, slot_mapping=torch.tensor(slots), logits_indices=None, pending_dst=None, pending_src=None,
        query_start_loc=torch.tensor(query_start, dtype=torch.int32), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables, num_tokens=query_start[-1], num_seqs=len(seqs),
        max_query_len=max(n for _, n in seqs), max_seq_len=max(seq_lens),
        query_start_host=np.array(query_start), seq_lens_host=np.array(seq_lens))
    backend = TorchPagedAttention(D**-0.5, BLOCK)
    meta = backend.prepare(batch)
    assert meta.decode_rows.numel() == 3 and len(meta.prefills) == 2
    scale = D**-0.5
    positions = torch.cat([torch.arange(c, c + n) for c, n in seqs])
    no_rope = lambda positions, q, k: (q, k)  # noqa: E731  (rotation is tested with the model)
    kv_cache = kv_cache_init
    out = backend.forward(torch.cat(q_rows), torch.cat(new_k), torch.cat(new_v), positions, no_rope, kv_cache, meta)
    for i, q in enumerate(q_rows):
        expected = naive_attention(q, full_k[i], full_v[i], scale)
        torch.testing.assert_close(out[query_start[i]:query_start[i + 1]], expected, rtol=1e-5, atol=1e-5)


def _attention_reference(q, k, v, scale):
    """One query per sequence over its whole context: q [Hq, D]; k, v [L, Hkv, D]."""
    group = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    probs = torch.softmax(torch.einsum("hd,lhd->hl", q, k) * scale, dim=-1)
    return torch.einsum("hl,lhd->hd", probs, v)


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (9, 3)])
@pytest.mark.parametrize("lens", [[1], [13], [9, 9], [3, 17, 8, 4], [16, 32]])
def test_decode_only_steps_gather_whole_blocks_and_mask_the_padding(heads, kv_heads, lens):
    """A step where every sequence decodes: one batched attention over whole gathered blocks (scattered,
    out of order), with the padding of shorter contexts masked, including GQA groups of 1 and 3."""
    g = torch.Generator().manual_seed(len(lens) * 100 + heads)
    num_blocks = 64
    kv_cache = torch.randn(2, num_blocks, BLOCK, kv_heads, D, generator=g)  # unused slots hold values too
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[free.pop() for _ in range(-(-n // BLOCK))] for n in lens]
    slots = [t[(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for t, n in zip(tables, lens)]
    batch = ForwardBatch.for_attention(torch.tensor(slots), list(range(len(lens) + 1)), lens, tables)
    backend = TorchPagedAttention(D**-0.5, BLOCK)
    meta = backend.prepare(batch)
    assert meta.decode_only and (meta.decode_valid is None) == (len(set(lens)) == 1)
    q = torch.randn(len(lens), heads, D, generator=g)
    out = backend.attend(q, kv_cache[0], kv_cache[1], meta)
    for i, (table, n) in enumerate(zip(tables, lens)):
        context = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)])
        k = kv_cache[0].reshape(-1, kv_heads, D)[context]
        v = kv_cache[1].reshape(-1, kv_heads, D)[context]
        torch.testing.assert_close(out[i], _attention_reference(q[i], k, v, D**-0.5), rtol=1e-5, atol=1e-5)


def test_whole_prompt_prefill_is_causal():
    g = torch.Generator().manual_seed(3)
    n = 11
    kv_cache = torch.zeros(2, 8, BLOCK, HKV, D)
    table = [5, 2, 7]
    slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)])
    k, v = torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g)
    q = torch.randn(n, HQ, D, generator=g)
    backend = TorchPagedAttention(D**-0.5, BLOCK)
    meta = backend.prepare(ForwardBatch.for_attention(slots, [0, n], [n], [table]))
    out = backend.forward(q, k, v, torch.arange(n), lambda positions, q, k: (q, k), kv_cache, meta)
    torch.testing.assert_close(out, naive_attention(q, k, v, D**-0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("table,in_place", [([3, 4, 5], True), ([3, 5, 4], False)])
def test_lone_sequence_with_consecutive_blocks_reads_the_cache_in_place(table, in_place):
    g = torch.Generator().manual_seed(4)
    n = 10
    kv_cache = torch.randn(2, 8, BLOCK, HKV, D, generator=g)
    slot = table[(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK
    backend = TorchPagedAttention(D**-0.5, BLOCK)
    meta = backend.prepare(ForwardBatch.for_attention(torch.tensor([slot]), [0, 1], [n], [table]))
    assert (meta.decode_first_block == 3) if in_place else meta.decode_first_block is None
    q = torch.randn(1, HQ, D, generator=g)
    context = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)])
    k, v = (kv_cache[i].reshape(-1, HKV, D)[context] for i in (0, 1))
    out = backend.attend(q, kv_cache[0], kv_cache[1], meta)
    torch.testing.assert_close(out[0], _attention_reference(q[0], k, v, D**-0.5), rtol=1e-5, atol=1e-5)
