"""paged_decode_attention / paged_prefill_attention against TorchPagedAttention on a paged cache whose
unowned slots hold NaN (a kernel reading outside a context fails these tests)."""

import pytest
import torch
from paged_batch import make_paged_batch, tolerance
from ulp import poisoned

from photoninfer.kernels import paged_attention
from photoninfer.kernels.paged_attention import DecodeWorkspace, paged_decode_attention, paged_prefill_attention

# Small tiles and partitions so that tiny contexts still span several blocks, tiles and partitions.
TILES = dict(block_n=16)
PARTITION = 32


def decode(batch, max_seq_len_hint, **kwargs):
    out = poisoned(tuple(batch.q.shape), batch.q.dtype, batch.q.device)
    paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.scale,
                           out, max_seq_len_hint, **{**TILES, "partition_size": PARTITION, **kwargs})
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_heads,kv_heads,head_dim,block_size", [
    (2, 2, 64, 16),  # group 1
    (4, 2, 64, 32),  # group 2
    (8, 2, 64, 16),  # group 4
    (2, 1, 128, 16),  # group 2, head_dim 128
])
def test_decode_split_k_matches_reference(dtype, q_heads, kv_heads, head_dim, block_size, device):
    seq_lens = [1, 37, 100, 16]  # 1 to 4 partitions of 32, partial last blocks
    batch = make_paged_batch(seq_lens, [1] * len(seq_lens), q_heads, kv_heads, head_dim, block_size, dtype,
                             seed=q_heads * 10 + block_size, device=device)
    out = decode(batch, max_seq_len_hint=128)
    torch.testing.assert_close(out, batch.expected, **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_single_partition_writes_directly(dtype, device):
    batch = make_paged_batch([5, 30, 17], [1, 1, 1], 4, 2, 64, 16, dtype, seed=5, device=device)
    out = decode(batch, max_seq_len_hint=32)  # one partition: no reduction pass
    torch.testing.assert_close(out, batch.expected, **tolerance(dtype))


def test_decode_padding_rows_get_zeros_and_graph_sized_grid(device):
    """CUDA-graph padding: seq_len 0 rows (block table all 0, block 0 holds NaN) must come out as zeros;
    the grid sized by a max_model_len hint far above the real lengths still gives the same result."""
    batch = make_paged_batch([40, 9], [1, 1], 4, 2, 64, 16, torch.float32, seed=11, device=device)
    padded_q = torch.cat([batch.q, torch.randn(2, 4, 64, device=device)])
    tables = torch.cat([batch.block_tables, torch.zeros_like(batch.block_tables)])
    seq_lens = torch.cat([batch.seq_lens, torch.zeros_like(batch.seq_lens)])
    workspace = DecodeWorkspace.allocate(8, 4, 64, 256, device, partition_size=PARTITION)
    out = poisoned((4, 4, 64), torch.float32, device)
    paged_decode_attention(padded_q, batch.k_cache, batch.v_cache, tables, seq_lens, batch.scale, out,
                           max_seq_len_hint=256, partition_size=PARTITION, workspace=workspace, **TILES)
    torch.testing.assert_close(out[:2], batch.expected, **tolerance(torch.float32))
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))


@pytest.mark.parametrize("hint,cap", [(128, 2), (128, 3), (40, None), (1, None)])
def test_decode_spans_of_several_partitions(hint, cap, device):
    """Fewer programs than partitions (a cap, or a hint below the real lengths): each program covers a
    span of whole partitions and the result is unchanged."""
    batch = make_paged_batch([1, 37, 100, 130], [1] * 4, 4, 2, 64, 16, torch.float32, seed=hint + (cap or 0),
                             device=device)
    out = decode(batch, max_seq_len_hint=hint, max_num_partitions=cap)
    torch.testing.assert_close(out, batch.expected, **tolerance(torch.float32))


def test_decode_default_cap_follows_the_batch(monkeypatch, device):
    """Without a cap, P shrinks as the batch alone fills the GPU: here 8 programs for 4 sequences x 2 kv
    heads means P = 1 (no reduction) although the hint asks for 4 partitions."""
    assert paged_attention.default_max_partitions(1, 8) == 128
    assert paged_attention.default_max_partitions(256, 8) == 1
    monkeypatch.setattr(paged_attention, "DECODE_TARGET_PROGRAMS", 8)
    batch = make_paged_batch([1, 37, 100, 130], [1] * 4, 4, 2, 64, 16, torch.float32, seed=3, device=device)
    out = decode(batch, max_seq_len_hint=128, workspace=paged_attention.DecodeWorkspace(*[None] * 3))  # unused
    torch.testing.assert_close(out, batch.expected, **tolerance(torch.float32))


def test_decode_rejects_a_workspace_too_small(device):
    batch = make_paged_batch([40], [1], 2, 2, 64, 16, torch.float32, seed=1, device=device)
    workspace = DecodeWorkspace.allocate(1, 2, 64, 64, device, partition_size=PARTITION)
    with pytest.raises(ValueError, match="workspace"):
        paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                               batch.scale, torch.empty_like(batch.q), 128, partition_size=PARTITION,
                               workspace=workspace, **TILES)


def prefill(batch, **kwargs):
    out = poisoned(tuple(batch.q.shape), batch.q.dtype, batch.q.device)
    paged_prefill_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.query_start_loc,
                            batch.seq_lens, batch.scale, out, batch.max_query_len,
                            **{"block_m": 16, "block_n": 16, **kwargs})
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_heads,kv_heads,head_dim,block_size", [
    (2, 2, 64, 16), (4, 2, 64, 32), (4, 1, 64, 16), (2, 1, 128, 32),
])
def test_prefill_mixed_batch_matches_reference(dtype, q_heads, kv_heads, head_dim, block_size, device):
    # a fresh prompt, a chunk after a cached prefix, a decode row, a chunk starting mid-block
    seq_lens, q_lens = [20, 45, 33, 50], [20, 17, 1, 18]
    batch = make_paged_batch(seq_lens, q_lens, q_heads, kv_heads, head_dim, block_size, dtype,
                             seed=q_heads + head_dim + block_size, device=device)
    out = prefill(batch)
    torch.testing.assert_close(out, batch.expected, **tolerance(dtype))


def test_prefill_tile_shapes_do_not_change_the_result(device):
    batch = make_paged_batch([70, 24], [40, 24], 4, 2, 64, 16, torch.float32, seed=9, device=device)
    for block_m, block_n in [(16, 32), (32, 16), (64, 64)]:
        out = prefill(batch, block_m=block_m, block_n=block_n)
        torch.testing.assert_close(out, batch.expected, **tolerance(torch.float32))


def test_prefill_sequence_with_empty_context_gets_zeros(device):
    """A graph-padding sequence (one query row, seq_len 0, block table of zeros) reads nothing."""
    batch = make_paged_batch([30], [3], 2, 2, 64, 16, torch.float32, seed=2, device=device)
    q = torch.cat([batch.q, torch.randn(1, 2, 64, device=device)])
    qsl = torch.tensor([0, 3, 4], dtype=torch.int32, device=device)
    seq_lens = torch.tensor([30, 0], dtype=torch.int32, device=device)
    tables = torch.cat([batch.block_tables, torch.zeros_like(batch.block_tables)])
    out = poisoned((4, 2, 64), torch.float32, device)
    paged_prefill_attention(q, batch.k_cache, batch.v_cache, tables, qsl, seq_lens, batch.scale, out, 3,
                            block_m=16, block_n=16)
    torch.testing.assert_close(out[:3], batch.expected, **tolerance(torch.float32))
    assert torch.equal(out[3], torch.zeros_like(out[3]))


def test_decode_tiles_follow_how_full_the_batch_keeps_the_gpu():
    from photoninfer.kernels.paged_attention import DECODE_TARGET_PROGRAMS, decode_tiles

    assert decode_tiles(256, 8) == (64, 4, 2)  # one program per (sequence, kv head) fills the card
    assert decode_tiles(DECODE_TARGET_PROGRAMS // 8, 8) == (64, 4, 2)
    assert decode_tiles(1, 8) == decode_tiles(DECODE_TARGET_PROGRAMS // 8 - 1, 8) == (64, 4, 3)
