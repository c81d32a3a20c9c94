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
    out = decode(batch, max_seq_len_hint=128, workspace=paged_attention.DecodeWorkspace(*[None] * 4))  # unused
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


def test_short_prefill_tiles_match_the_reference(device, monkeypatch):
    """Without block sizes a short prefill takes SHORT_PREFILL_BLOCK_M x SHORT_PREFILL_BLOCK_N (a lone prompt's
    graph): a fresh prompt and a chunk after a cached prefix longer than one key tile. Tiles held small (16 x 32)
    so that the interpreter runs several key tiles a program."""
    monkeypatch.setattr(paged_attention, "SHORT_PREFILL_BLOCK_N", 32)
    assert paged_attention.short_prefill_tiles(False, 100, 64, 2)
    assert not paged_attention.short_prefill_tiles(True, 100, 64, 2)  # a mixed graph's map: its own rows
    assert not paged_attention.short_prefill_tiles(False, 129, 64, 2)
    monkeypatch.setattr(paged_attention, "SHORT_PREFILL_TILE_BYTES", 32 * 64 * 2)
    assert not paged_attention.short_prefill_tiles(False, 100, 128, 2)  # a wider head keeps the default tiles
    batch = make_paged_batch([37, 90], [37, 21], 4, 2, 64, 16, torch.bfloat16, seed=12, device=device)
    calls = []
    original = paged_attention._paged_prefill_kernel
    monkeypatch.setattr(paged_attention, "_paged_prefill_kernel", Recorded(original, calls))
    out = poisoned(tuple(batch.q.shape), batch.q.dtype, batch.q.device)
    paged_prefill_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.query_start_loc,
                            batch.seq_lens, batch.scale, out, batch.max_query_len)
    assert calls == [(16, 32)]
    torch.testing.assert_close(out, batch.expected, **tolerance(torch.bfloat16))


class Recorded:
    """A jitted kernel whose launches record their (BLOCK_M, BLOCK_N)."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((kwargs["BLOCK_M"], kwargs["BLOCK_N"]))
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_prefill_over_a_tile_map_matches_the_full_grid(device):
    """The grid a CUDA graph of many sequences launches: one program per listed (sequence, row block), rows of -1
    doing nothing; a padding sequence of no rows and tokens past the last sequence are left alone."""
    import numpy as np

    from photoninfer.runner.batch import prefill_tiles

    seq_lens, q_lens = [20, 45, 33, 50], [20, 17, 1, 18]
    batch = make_paged_batch(seq_lens, q_lens, 4, 2, 64, 16, torch.float32, seed=8, device=device)
    query_start = np.concatenate([batch.query_start_loc.cpu().numpy(), [56]])  # a padding sequence, no rows
    tiles = np.zeros((10, 2), dtype=np.int32)
    prefill_tiles(query_start, 16, tiles)
    assert tiles[:6].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [3, 0]] and (tiles[7:] == (-1, 0)).all()
    q = torch.cat([batch.q, torch.randn(3, 4, 64, device=device)])  # three tokens of padding past the batch
    out = poisoned(tuple(q.shape), torch.float32, device)
    tables = torch.cat([batch.block_tables, torch.zeros_like(batch.block_tables[:1])])
    paged_prefill_attention(q, batch.k_cache, batch.v_cache, tables, torch.tensor(query_start, dtype=torch.int32,
                            device=device), torch.cat([batch.seq_lens, batch.seq_lens[:1] * 0]), batch.scale, out,
                            0, block_m=16, block_n=16, tiles=torch.tensor(tiles, device=device))
    torch.testing.assert_close(out[:56], batch.expected, **tolerance(torch.float32))
    assert out[56:].isnan().all()  # no program wrote the padding tokens
    with pytest.raises(ValueError, match="do not fit"):
        prefill_tiles(query_start, 16, np.zeros((5, 2), dtype=np.int32))


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

    assert decode_tiles(256, 8) == (64, 4, 2, None)  # one program per (sequence, kv head) fills the card
    assert decode_tiles(DECODE_TARGET_PROGRAMS // 8, 8) == (64, 4, 2, None)
    assert decode_tiles(1, 8) == decode_tiles(DECODE_TARGET_PROGRAMS // 8 - 1, 8) == (64, 4, 2, None)
    assert decode_tiles(256, 8, fp8_cache=True) == (128, 4, 1, 128)  # a register cap: 4 programs an SM
    assert decode_tiles(64, 8, fp8_cache=True) == (128, 4, 1, 128)  # FP8_WIDE_TILES_MIN_PROGRAMS
    assert decode_tiles(63, 8, fp8_cache=True) == decode_tiles(16, 8, fp8_cache=True) == (64, 4, 2, None)


def test_only_small_batches_of_narrow_heads_with_new_tokens_load_a_tile_before_the_wait():
    from photoninfer.kernels.paged_attention import preloads

    assert preloads(True, 1, 64) and preloads(True, 16, 64)  # Llama-3.2-1B, SmolLM2-135M decode under PDL
    assert not preloads(True, 16, 128)  # Qwen3's 128-wide heads: twice the registers held waiting
    assert not preloads(True, 17, 64)  # no PDL wait to overlap
    assert not preloads(False, 1, 64)  # the cache's last token comes from the kernel before: read it after the wait


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                               (torch.bfloat16, torch.float8_e4m3fn)], ids=["f32", "bf16", "fp8"])
@pytest.mark.parametrize("hint,cap", [(128, None), (128, 1), (128, 3)], ids=["split", "direct", "spans"])
@pytest.mark.parametrize("preload", [True, False], ids=["preloaded", "loaded-after-wait"])
def test_decode_with_new_tokens_does_the_rope_kernels_work(dtype, cache_dtype, hint, cap, preload, device,
                                                            monkeypatch):
    """Unrotated q, k, v given to the decode kernel: the same output and cache as rope_and_cache_kv followed
    by the decode kernel, whichever program's span holds the new token; a padding row writes nothing. Whether
    the first tile loads before the new token is written (PRELOAD_FIRST_TILE: its stale slot must not count) or
    after."""
    monkeypatch.setattr(paged_attention, "PRELOAD_FIRST_TILE", preload)
    check_new_tokens(dtype, cache_dtype, hint, cap, device, qk_norm=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hint,cap", [(128, None), (128, 1)], ids=["split", "direct"])
def test_decode_with_new_tokens_does_the_qk_norm_too(dtype, hint, cap, device):
    """Qwen3: unnormalized q and k, and their RMSNorm weights, given to the decode kernel: the same output and
    cache as the per-head RMSNorm kernel, rope_and_cache_kv and the decode kernel one after the other."""
    check_new_tokens(dtype, None, hint, cap, device, qk_norm=True)


def check_new_tokens(dtype, cache_dtype, hint, cap, device, qk_norm):
    from photoninfer.kernels.rmsnorm import rms_norm
    from photoninfer.kernels.rope import rope_and_cache_kv
    from photoninfer.model.layers import RotaryEmbedding

    seq_lens, q_heads, kv_heads, head_dim, block_size = [1, 37, 100, 64], 4, 2, 64, 16
    batch = make_paged_batch(seq_lens, [1] * 4, q_heads, kv_heads, head_dim, block_size, dtype, seed=21,
                             device=device, cache_dtype=cache_dtype)
    gen = torch.Generator().manual_seed(4)
    rope = RotaryEmbedding(head_dim, 256, theta=10000.0, scaling=None).to(device)
    rows = len(seq_lens) + 1  # and one padding row, as a CUDA graph pads a batch
    qkv = torch.randn(rows, (q_heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype).to(device)
    q, k, v = (t.view(rows, -1, head_dim) for t in qkv.split([q_heads * head_dim, kv_heads * head_dim,
                                                               kv_heads * head_dim], dim=-1))
    tables = torch.cat([batch.block_tables, torch.zeros_like(batch.block_tables[:1])])
    lens = torch.cat([batch.seq_lens, torch.zeros_like(batch.seq_lens[:1])])
    last = (lens.long() - 1).clamp_min(0)
    slots = tables.long().gather(1, (last // block_size)[:, None])[:, 0] * block_size + last % block_size
    slots[-1] = -1
    positions = last + 3  # any position: the kernel must take it from `positions`

    norm_weights = [(1 + 0.3 * torch.randn(head_dim, generator=gen)).to(dtype).to(device) for _ in range(2)]
    ref_q, ref_k = q.clone(), k.clone()
    if qk_norm:
        ref_q, ref_k = (rms_norm(t, w, 1e-6) for t, w in ((ref_q, norm_weights[0]), (ref_k, norm_weights[1])))
    ref_k_cache, ref_v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    rope_and_cache_kv(ref_q, ref_k, v, positions, rope.cos, rope.sin, ref_k_cache, ref_v_cache, slots)
    expected = poisoned((rows, q_heads, head_dim), dtype, device)
    options = {**TILES, "partition_size": PARTITION, "max_num_partitions": cap}
    paged_decode_attention(ref_q, ref_k_cache, ref_v_cache, tables, lens, batch.scale, expected, hint, **options)

    q_before = q.clone()
    out = poisoned((rows, q_heads, head_dim), dtype, device)
    new = paged_attention.NewTokens(k, v, positions, rope.cos, rope.sin, slots)
    if qk_norm:
        new = paged_attention.NewTokens(k, v, positions, rope.cos, rope.sin, slots, *norm_weights, 1e-6)
    paged_decode_attention(q, batch.k_cache, batch.v_cache, tables, lens, batch.scale, out, hint, new_tokens=new,
                           **options)
    assert torch.equal(q, q_before)  # q is rotated in registers only
    for actual, reference in ((batch.k_cache, ref_k_cache), (batch.v_cache, ref_v_cache)):
        actual, reference = actual.float(), reference.float()  # (FP8 has no isnan)
        assert torch.equal(actual.isnan(), reference.isnan())  # the same slots written, none for the padding row
        torch.testing.assert_close(actual.nan_to_num(), reference.nan_to_num(), **tolerance(dtype))
    torch.testing.assert_close(out, expected, **tolerance(dtype))
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))


def test_decode_rejects_new_tokens_of_the_wrong_shape(device):
    batch = make_paged_batch([5], [1], 2, 2, 64, 16, torch.float32, seed=2, device=device)
    table = torch.zeros(10, 32, device=device)
    wrong = paged_attention.NewTokens(torch.zeros(1, 1, 64, device=device), torch.zeros(1, 2, 64, device=device),
                                      torch.zeros(1, dtype=torch.long, device=device), table, table,
                                      torch.zeros(1, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="k"):
        paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                               batch.scale, torch.empty_like(batch.q), 16, new_tokens=wrong)


def test_split_decode_re_arms_its_counters_for_the_next_call(device):
    """The last program of each (sequence, kv head) merges the partials and resets its counter: a
    workspace reused call after call (as a CUDA graph reuses it) keeps giving the reference output."""
    batch = make_paged_batch([1, 37, 100, 130], [1] * 4, 4, 2, 64, 16, torch.float32, seed=8, device=device)
    workspace = DecodeWorkspace.allocate(4, 4, 64, 160, device, partition_size=PARTITION)
    for _ in range(2):
        out = decode(batch, max_seq_len_hint=160, workspace=workspace)
        torch.testing.assert_close(out, batch.expected, **tolerance(torch.float32))
        assert not workspace.done.any()


def test_backend_decode_workspace_is_one_storage_sized_once(device):
    from photoninfer.runner.attention import TritonPagedAttention

    backend = TritonPagedAttention(0.125, 16)
    q = torch.zeros(3, 8, 64, device=device)
    first = backend.decode_workspace(q, 2, splits=5)
    assert first.out.shape == (3, 8, 5, 64) and first.max.shape == first.sum.shape == (3, 8, 5)
    assert first.done.shape == (3, 2) and not first.done.any()
    again = backend.decode_workspace(torch.zeros(1, 8, 64, device=device), 2, splits=9)
    assert again.out.data_ptr() == first.out.data_ptr() and again.done.data_ptr() == first.done.data_ptr()
    # partials, maxima and sums never overlap
    ends = [(t.data_ptr(), t.data_ptr() + t.numel() * 4) for t in (first.out, first.max, first.sum)]
    assert ends[0][1] <= ends[1][0] and ends[1][1] <= ends[2][0]


FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("hint", [128, 32], ids=["split", "direct"])
def test_decode_reads_an_fp8_cache(hint, device):
    """kv_cache_dtype="fp8": the kernel widens FP8 tiles to q's dtype as the reference widens them."""
    batch = make_paged_batch([1, 37, 100, 16], [1] * 4, 8, 2, 64, 16, torch.bfloat16, seed=31, device=device,
                             cache_dtype=FP8)
    assert batch.k_cache.dtype == FP8
    torch.testing.assert_close(decode(batch, max_seq_len_hint=hint), batch.expected, **tolerance(torch.bfloat16))


@pytest.mark.parametrize("hint", [512, 4096], ids=["direct", "split"])
def test_decode_of_a_full_batch_over_an_fp8_cache_uses_its_own_tiles(hint, monkeypatch, device):
    """The default tiles of a batch that fills the GPU over an FP8 cache (128-key tiles, here with 4 sequences
    standing for a full batch): the default partition grows to a whole tile, with and without splits."""
    monkeypatch.setattr(paged_attention, "DECODE_TARGET_PROGRAMS", 8)
    monkeypatch.setattr(paged_attention, "FP8_WIDE_TILES_MIN_PROGRAMS", 8)
    assert paged_attention.decode_tiles(4, 2, fp8_cache=True)[0] == 128 > paged_attention.DEFAULT_PARTITION
    batch = make_paged_batch([1, 130, 300, 64], [1] * 4, 4, 2, 64, 16, torch.bfloat16, seed=33, device=device,
                             cache_dtype=FP8)
    out = poisoned(tuple(batch.q.shape), batch.q.dtype, batch.q.device)
    cap = None if hint == 512 else 3  # 512 // 128 = 4 partitions: the kernel's own cap of 1 at a "full" batch
    paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.scale,
                           out, hint, max_num_partitions=cap)
    torch.testing.assert_close(out, batch.expected, **tolerance(torch.bfloat16))


def test_prefill_reads_an_fp8_cache(device):
    batch = make_paged_batch([20, 37, 9], [20, 5, 1], 4, 2, 64, 16, torch.bfloat16, seed=32, device=device,
                             cache_dtype=FP8)
    torch.testing.assert_close(prefill(batch), batch.expected, **tolerance(torch.bfloat16))
