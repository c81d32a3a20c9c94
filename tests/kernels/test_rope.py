"""rope_and_cache_kv against RotaryEmbedding (rotate half, llama3 scaling) followed by write_kv."""

import pytest
import torch
from ulp import assert_close_ulps, ulps_for

from photoninfer.kernels.rope import rope_and_cache_kv
from photoninfer.model.layers import RotaryEmbedding
from photoninfer.runner.attention import write_kv

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def qkv_slices(tokens, q_heads, kv_heads, head_dim, dtype, gen, device):
    """q, k, v as column slices of one fused qkv output, as the runner's fused projection produces."""
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype).to(device)
    q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return (qkv, q.view(tokens, q_heads, head_dim), k.view(tokens, kv_heads, head_dim),
            v.view(tokens, kv_heads, head_dim))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_heads,kv_heads,head_dim,block_size", [(4, 4, 64, 16), (4, 2, 64, 32), (8, 2, 128, 16)])
def test_rope_and_cache_kv_matches_reference(dtype, q_heads, kv_heads, head_dim, block_size, device):
    gen = torch.Generator().manual_seed(q_heads * head_dim + block_size)
    tokens, max_pos, num_blocks = 6, 256, 5
    rope = RotaryEmbedding(head_dim, max_pos, theta=500000.0, scaling=LLAMA3_SCALING).to(device)
    qkv, q, k, v = qkv_slices(tokens, q_heads, kv_heads, head_dim, dtype, gen, device)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[2] = -1  # a padding row: rotated, but its K/V are not written
    slots = slots.to(device)
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
    v_cache = k_cache.clone()

    expected_q, expected_k = rope(positions, q.clone(), k.clone())
    expected_k_cache, expected_v_cache = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    write_kv(expected_k_cache, expected_v_cache, expected_k[keep], v[keep], slots[keep])
    v_before = v.clone()

    rope_and_cache_kv(q, k, v, positions, rope.cos, rope.sin, k_cache, v_cache, slots)

    if dtype == torch.float32:
        check = lambda a, e: torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, equal_nan=True)  # noqa: E731
    else:
        def check(a, e):
            written = ~torch.isnan(e)
            assert torch.equal(torch.isnan(a), ~written)  # exactly the same elements written
            assert_close_ulps(a[written], e[written], ulps=ulps_for(dtype, 1), atol=1e-6)
    check(q, expected_q)
    check(k, expected_k)
    assert torch.equal(v, v_before)
    check(k_cache, expected_k_cache)
    check(v_cache, expected_v_cache)
    assert torch.equal(torch.isnan(k_cache), torch.isnan(expected_k_cache))  # nothing written for slot -1


def test_rope_takes_int32_positions_and_rejects_wrong_tables(device):
    gen = torch.Generator().manual_seed(1)
    rope = RotaryEmbedding(64, 32, theta=10000.0, scaling=None).to(device)
    _, q, k, v = qkv_slices(2, 2, 2, 64, torch.float32, gen, device)
    cache = torch.zeros(2, 16, 2, 64, device=device)
    ints = lambda values, dtype=torch.int64: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
    expected_q, _ = rope(ints([3, 5]), q.clone(), k.clone())
    rope_and_cache_kv(q, k, v, ints([3, 5], torch.int32), rope.cos, rope.sin, cache, cache.clone(), ints([0, 1]))
    torch.testing.assert_close(q, expected_q, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cos"):
        rope_and_cache_kv(q, k, v, ints([0, 1]), rope.cos[:, :16], rope.sin, cache, cache.clone(), ints([0, 1]))
    with pytest.raises(TypeError, match="slot_mapping"):
        rope_and_cache_kv(q, k, v, ints([0, 1]), rope.cos, rope.sin, cache, cache.clone(), ints([0, 1], torch.int32))


def fp8_comparable(x: torch.Tensor) -> torch.Tensor:
    """Where Triton's CPU interpreter converts bf16 -> float8_e4m3fn as the GPU and torch do. It rounds exact
    ties away from even, loses the carry when rounding up reaches the next power of two (1.98 -> 1.0) and
    flushes subnormals. On a GPU: everywhere."""
    if x.device.type == "cuda":
        return torch.ones_like(x, dtype=torch.bool)
    mantissa = x.to(torch.bfloat16).view(torch.int16).int() & 0x7F  # bf16 keeps 7 bits, e4m3 3 of them
    return ((mantissa & 0xF) != 0x8) & (mantissa < 0x78) & (x.abs() >= 2.0**-6)


def test_rope_writes_an_fp8_cache_as_write_kv_does(device):
    """kv_cache_dtype="fp8": rotated k rounded to q's dtype, then to float8_e4m3fn; the same bytes as torch."""
    gen = torch.Generator().manual_seed(9)
    tokens, heads, kv_heads, head_dim = 5, 4, 2, 64
    rope = RotaryEmbedding(head_dim, 64, theta=10000.0, scaling=None).to(device)
    qkv = (4 * torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)).to(torch.bfloat16).to(device)
    q, k, v = (t.view(tokens, -1, head_dim) for t in qkv.split([heads * head_dim, kv_heads * head_dim,
                                                              kv_heads * head_dim], dim=-1))
    positions = torch.arange(tokens, device=device) * 7
    slots = torch.tensor([3, 9, 17, -1, 30], device=device)
    k_cache = torch.zeros(4, 16, kv_heads, head_dim, dtype=torch.float8_e4m3fn, device=device)
    v_cache = torch.zeros_like(k_cache)
    _, expected_k = rope(positions, q.clone(), k.clone())
    keep = slots >= 0
    rope_and_cache_kv(q, k, v, positions, rope.cos, rope.sin, k_cache, v_cache, slots)
    for cache, rows in ((k_cache, expected_k[keep]), (v_cache, v[keep])):
        written = cache.view(-1, kv_heads, head_dim)[slots[keep]]
        comparable = fp8_comparable(rows)
        assert comparable.float().mean() > 0.8
        got, want = written.view(torch.uint8)[comparable], rows.to(torch.float8_e4m3fn).view(torch.uint8)[comparable]
        assert torch.equal(got, want)
    assert not k_cache.view(-1, kv_heads, head_dim)[slots[keep].max() + 1:].float().any()  # nothing else written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_with_qk_norm_normalizes_each_head_first(dtype, device):
    """Qwen3: q/k-norm weights given, each head is RMS-normalized (rounded as layers.rms_norm rounds it) before
    it is rotated and k is cached, as the per-head norms and then rope_and_cache_kv would do."""
    from photoninfer.model.layers import rms_norm

    gen = torch.Generator().manual_seed(7)
    tokens, q_heads, kv_heads, head_dim, block_size = 5, 4, 2, 64, 16
    rope = RotaryEmbedding(head_dim, 128, theta=1000000.0, scaling=None).to(device)
    _, q, k, v = qkv_slices(tokens, q_heads, kv_heads, head_dim, dtype, gen, device)
    weights = [(1 + 0.3 * torch.randn(head_dim, generator=gen)).to(dtype).to(device) for _ in range(2)]
    positions = torch.randint(0, 128, (tokens,), generator=gen).to(device)
    slots = torch.arange(tokens, device=device) * 3
    k_cache = torch.zeros((4, block_size, kv_heads, head_dim), dtype=dtype, device=device)
    v_cache = k_cache.clone()

    expected_q, expected_k = rope(positions, rms_norm(q, weights[0], 1e-6), rms_norm(k, weights[1], 1e-6))
    expected_k_cache = k_cache.clone()
    write_kv(expected_k_cache, v_cache.clone(), expected_k, v, slots)

    rope_and_cache_kv(q, k, v, positions, rope.cos, rope.sin, k_cache, v_cache, slots, *weights, 1e-6)
    # float32 checks the math; bf16 may differ by an ulp of the normalized value (the sums' order differs), which
    # the rotation can turn into 2 ulps of values near |x| ~ 2-4, where an ulp is 0.016
    ulps = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=4e-2)
    torch.testing.assert_close(q, expected_q, **ulps)
    torch.testing.assert_close(k, expected_k, **ulps)
    torch.testing.assert_close(k_cache, expected_k_cache, **ulps)
    with pytest.raises(ValueError, match="come together"):
        rope_and_cache_kv(q, k, v, positions, rope.cos, rope.sin, k_cache, v_cache, slots, weights[0])
