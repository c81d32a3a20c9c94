"""fused_norm_linear against the decoder's ops one by one (fused_norm_linear_reference) and float64 math."""

import pytest
import torch
from ulp import assert_close_ulps, ulps_for

from photoninfer.kernels import norm_linear
from photoninfer.kernels.norm_linear import (L2_PREFETCH_BUDGET, NEXT_ROWS_BUDGET, NormLinearConfig, decode_linear,
                                             default_config, fused_mlp, fused_norm_linear, fused_norm_linear_reference,
                                             next_rows_bytes, prefetch_bytes)

EPS = 1e-5


def exact(x, norm_weight, weight, bias=None, residual=None, gated=False):
    """float64 on the CPU, no intermediate rounding except the residual sum (stored in the model dtype)."""
    h = (x if residual is None else x + residual).cpu().double()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * norm_weight.cpu().double()
    y = normed @ weight.cpu().double().t()
    if bias is not None:
        y = y + bias.cpu().double()
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    return y


def make(m, n, k, dtype, device, seed, residual=True, bias=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    res = torch.randn(m, k, generator=gen).to(dtype).to(device) if residual else None
    norm_weight = (1 + 0.2 * torch.randn(k, generator=gen)).to(dtype).to(device)
    weight = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype).to(device)
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    return x, res, norm_weight, weight, b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k,residual,bias,gated,config", [
    (1, 96, 256, True, False, False, NormLinearConfig(block_n=32, block_k=64)),
    (5, 80, 320, True, True, False, NormLinearConfig(block_n=16, block_k=64)),  # ragged N and K, bias
    (16, 64, 512, False, False, False, NormLinearConfig(block_n=64, block_k=128)),  # first layer: no residual
    (3, 96, 192, True, False, True, NormLinearConfig(block_n=16, block_k=64)),  # gate/up + SiLU, ragged I
    (16, 128, 96, True, False, True, None),  # default tiles
    (2, 2048, 64, True, False, False, None),  # default tiles, wide output
    (4, 96, 320, True, False, True, NormLinearConfig(block_n=32, block_k=64, x_ahead=False)),  # inputs in the loop
    (3, 96, 320, True, False, True, NormLinearConfig(block_n=16, block_k=64, w_ahead=128)),  # weights ahead
    (2, 80, 96, True, True, False, NormLinearConfig(block_n=16, block_k=64, w_ahead=128)),  # all of K ahead
])
def test_fused_norm_linear_matches_the_ops_one_by_one(dtype, m, n, k, residual, bias, gated, config, device):
    x, res, norm_weight, weight, b = make(m, n, k, dtype, device, seed=m * n + k, residual=residual, bias=bias)
    y, h = fused_norm_linear(x, norm_weight, EPS, weight, b, residual=res, gated=gated, config=config)
    ref_y, ref_h = fused_norm_linear_reference(x, norm_weight, EPS, weight, b, residual=res, gated=gated)
    assert y.shape == ref_y.shape == (m, n // 2 if gated else n)
    # the residual sum is one rounding, as the reference's (bf16 one ulp more: the interpreter truncates)
    assert_close_ulps(h.cpu(), ref_h.cpu(), ulps=ulps_for(dtype, 0))
    if res is not None:
        assert h.data_ptr() not in (x.data_ptr(), res.data_ptr())
    want = exact(x, norm_weight, weight, b, res, gated)
    scale = float(want.abs().max())
    # both round a few times in the model dtype (normed input, output; gated: gate, up, silu, product),
    # each rounding at most eps relative (the interpreter truncates bf16): a few eps from exact math
    rtol = (5 if gated else 3) * torch.finfo(dtype).eps
    torch.testing.assert_close(y.cpu().double(), want, rtol=rtol, atol=scale * rtol / 2)
    torch.testing.assert_close(y.cpu().double(), ref_y.cpu().double(), rtol=rtol, atol=scale * rtol / 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k,bias,config", [
    (1, 96, 256, False, NormLinearConfig(block_n=32, block_k=64)),
    (5, 80, 320, True, NormLinearConfig(block_n=16, block_k=64)),  # ragged N and K, bias
    (16, 48, 512, False, NormLinearConfig(block_n=16, block_k=128, num_stages=2, x_ahead=False)),  # x in the loop
    (3, 2048, 64, False, None),  # default tiles
    (5, 80, 320, True, NormLinearConfig(block_n=16, block_k=64, x_ahead=False, w_ahead=256)),  # weights ahead
    (1, 64, 96, False, NormLinearConfig(block_n=32, block_k=64, w_ahead=128)),  # all of K ahead, masked
])
def test_decode_linear_matches_f_linear(dtype, m, n, k, bias, config, device):
    x, _, _, weight, b = make(m, n, k, dtype, device, seed=m + n * k, residual=False, bias=bias)
    y = decode_linear(x, weight, b, config=config)
    want = torch.nn.functional.linear(x.cpu().double(), weight.cpu().double(),
                                      None if b is None else b.cpu().double())
    assert y.shape == (m, n) and y.dtype == dtype
    rtol = 2 * torch.finfo(dtype).eps  # float32 sums, one rounding of the output
    torch.testing.assert_close(y.cpu().double(), want, rtol=rtol, atol=float(want.abs().max()) * rtol / 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,hidden,inter", [(1, 64, 128), (3, 80, 96), (4, 320, 64),  # ragged tiles, several
                                           (2, 256, 8192)])  # the widest models' tiles (fused_mlp_config)
def test_fused_mlp_matches_the_ops_one_by_one(dtype, m, hidden, inter, device):
    """gate/up + SiLU·mul + down in one kernel, down's share of each program added into a float32 output that
    o's decode_linear cleared on the way: the decoder's ops one by one, to the roundings they make."""
    from photoninfer.model.layers import rms_norm, silu_and_mul

    gen = torch.Generator().manual_seed(m * hidden + inter)
    x, res, g, gate_up, _ = make(m, 2 * inter, hidden, dtype, device, seed=m + hidden + inter)
    down = (torch.randn(hidden, inter, generator=gen) / inter ** 0.5).to(dtype).to(device)
    attn = torch.randn(m, 48, generator=gen).to(dtype).to(device)
    o_weight = (torch.randn(hidden, 48, generator=gen) / 48 ** 0.5).to(dtype).to(device)
    out = torch.full((m, hidden), float("nan"), device=device)
    o = decode_linear(attn, o_weight, zero=out)  # o clears the accumulator as it runs
    assert torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(o, decode_linear(attn, o_weight))
    y, h = fused_mlp(x, g, EPS, gate_up, down, out, res)
    assert y is out and y.dtype == torch.float32 and h.shape == x.shape
    ref_h = x + res
    assert torch.equal(h.cpu(), ref_h.cpu()) or dtype == torch.bfloat16  # the interpreter truncates bf16 sums
    ref = torch.nn.functional.linear(silu_and_mul(torch.nn.functional.linear(rms_norm(ref_h, g, EPS), gate_up)), down)
    # the reference rounds gate, up, SiLU, the product and down's output; the kernel all but the last
    rtol = 6 * torch.finfo(dtype).eps
    torch.testing.assert_close(y.to(dtype).cpu().double(), ref.cpu().double(), rtol=rtol,
                               atol=float(ref.abs().max()) * rtol / 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_norm_linear_takes_fused_mlps_float32_output(dtype, device):
    """x float32 with a residual of the model dtype: x is rounded to that dtype before the add, as the reference
    rounds its down projection's output."""
    x, res, g, weight, _ = make(3, 96, 128, dtype, device, seed=5)
    x32 = x.float() + torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).to(device) * 1e-3
    y, h = fused_norm_linear(x32, g, EPS, weight, residual=res)
    ref_y, ref_h = fused_norm_linear_reference(x32.to(dtype), g, EPS, weight, residual=res)
    assert y.dtype == h.dtype == dtype
    x_ulp = torch.finfo(dtype).eps * float(x32.abs().max())  # the interpreter truncates x's rounding
    assert_close_ulps(h.cpu(), ref_h.cpu(), ulps=ulps_for(dtype, 0), atol=x_ulp)
    rtol = 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(y.cpu().double(), ref_y.cpu().double(), rtol=rtol,
                               atol=float(ref_y.abs().max()) * rtol / 2)


def test_fused_mlp_rejects_what_it_does_not_handle(device):
    x = torch.zeros(5, 32, dtype=torch.bfloat16, device=device)
    g = torch.ones(32, dtype=torch.bfloat16, device=device)
    gate_up = torch.zeros(64, 32, dtype=torch.bfloat16, device=device)
    down = torch.zeros(32, 32, dtype=torch.bfloat16, device=device)
    out = torch.zeros(5, 32, device=device)
    with pytest.raises(ValueError, match="at most 4 rows"):
        fused_mlp(x, g, EPS, gate_up, down, out, x)
    with pytest.raises(ValueError, match="float32"):
        fused_mlp(x[:1], g, EPS, gate_up, down, out[:1].to(torch.bfloat16), x[:1])
    with pytest.raises(ValueError, match="down"):
        fused_mlp(x[:1], g, EPS, gate_up, down[:, :16], out[:1], x[:1])
    with pytest.raises(ValueError, match="zero"):
        decode_linear(x, down, zero=out.to(torch.bfloat16))


def test_decode_linear_rejects_what_it_does_not_handle(device):
    w = torch.zeros(8, 32, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="16 rows"):
        decode_linear(torch.zeros(17, 32, dtype=torch.bfloat16, device=device), w)
    with pytest.raises(TypeError, match="bfloat16"):
        decode_linear(torch.zeros(1, 32, device=device), w.float())
    with pytest.raises(ValueError, match="bias"):
        decode_linear(torch.zeros(1, 32, dtype=torch.bfloat16, device=device), w,
                      torch.zeros(9, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="w_ahead"):
        decode_linear(torch.zeros(1, 32, dtype=torch.bfloat16, device=device), w, config=NormLinearConfig(w_ahead=48))


def test_default_config_keeps_the_card_busy():
    assert default_config(1536, 576, gated=True).block_n == 16  # SmolLM2 gate/up: 96 programs
    assert default_config(960, 576, gated=False).block_n == 16  # SmolLM2 q/k/v: 60 programs
    assert default_config(8192, 2048, gated=True, m=16) == NormLinearConfig(32, 128, num_stages=3)
    assert default_config(8192, 2048, gated=True, m=1) == NormLinearConfig(32, 128, num_stages=3)  # wide
    assert default_config(1536, 576, gated=True, m=1).block_k == 256  # narrow, few rows
    assert default_config(128256, 2048, gated=False, m=1).block_n == 64  # the LM head, one row
    assert default_config(2048, 8192, gated=False, norm=False) == NormLinearConfig(32, 512, 4, 4, x_ahead=False)


def test_weights_ahead_loads_a_whole_row_of_short_layers():
    """o after attention: the whole weight tile before the PDL wait, up to WEIGHTS_AHEAD_MAX_K columns
    (padded to a power of two, the loop then empty); longer rows keep the plain tiles."""
    smol = default_config(576, 576, gated=False, norm=False, weights_ahead=True)
    assert (smol.w_ahead, smol.block_n, smol.num_warps) == (1024, 16, 8)
    assert default_config(1024, 1024, gated=False, norm=False, weights_ahead=True).w_ahead == 1024
    llama = default_config(2048, 2048, gated=False, norm=False, weights_ahead=True)
    assert llama == default_config(2048, 2048, gated=False, norm=False) and llama.w_ahead == 0


def test_prefetch_takes_whole_tiles_of_weights_that_fit_and_nothing_of_larger_ones():
    """Bytes each program asks L2 for before its PDL wait."""
    o = torch.empty(2048, 2048, dtype=torch.bfloat16)  # Llama-3.2-1B o: 8 MiB, 32-row tiles
    assert prefetch_bytes(o, 32) == 32 * 2048 * 2
    down = torch.empty(2048, 8192, dtype=torch.bfloat16)  # 32 MiB: larger than the budget
    assert down.numel() * 2 > L2_PREFETCH_BUDGET and prefetch_bytes(down, 32) == 0
    assert prefetch_bytes(torch.empty(4096, 2048, dtype=torch.bfloat16)[:, :1000], 32) == 0  # rows not contiguous
    assert prefetch_bytes(torch.empty(64, 36, dtype=torch.bfloat16), 32) == 0  # 72-byte rows: not 16-byte runs


def test_o_prefetches_the_mlps_row_starts_only_where_its_own_weights_leave_room():
    """o asks L2 for its own weights and, within NEXT_ROWS_BUDGET, the start of each gate/up row (decode_linear's
    next_weight): Qwen3-0.6B gets 1 KB of each row, Llama-3.2-1B none, SmolLM2-135M at most half a row."""
    bf16 = torch.bfloat16
    budget = lambda o: NEXT_ROWS_BUDGET - o.numel() * o.element_size()  # noqa: E731  (o prefetched whole)
    qwen_o, qwen_gate_up = torch.empty(1024, 2048, dtype=bf16), torch.empty(6144, 1024, dtype=bf16)
    assert next_rows_bytes(qwen_gate_up, budget(qwen_o)) == 1024
    llama_o, llama_gate_up = torch.empty(2048, 2048, dtype=bf16), torch.empty(16384, 2048, dtype=bf16)
    assert next_rows_bytes(llama_gate_up, budget(llama_o)) == 0  # 192 bytes a row: not worth a prefetch
    smol_o, smol_gate_up = torch.empty(576, 576, dtype=bf16), torch.empty(3072, 576, dtype=bf16)
    assert next_rows_bytes(smol_gate_up, budget(smol_o)) == 512  # half of its 1,152-byte rows, a power of two
    assert next_rows_bytes(None, budget(qwen_o)) == 0
    assert next_rows_bytes(torch.empty(6144, 1100, dtype=bf16)[:, :1024], budget(qwen_o)) == 0  # 2,200-byte stride
    assert next_rows_bytes(qwen_gate_up, -1) == 0


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="the L2 prefetches are PTX: compiled kernels only (the interpreter has no PDL)")
def test_row_start_prefetches_leave_the_results_as_they_were(device):
    """The prefetches are cache hints: o's output with the MLP's row starts prefetched is bit for bit the same, and
    the fused MLP with its own row starts prefetched matches it without (to float32 atomics' order)."""
    dtype = torch.bfloat16
    x, res, g, gate_up, _ = make(1, 2 * 512, 256, dtype, device, seed=3)
    attn, _, _, o_weight, _ = make(1, 256, 192, dtype, device, seed=4, residual=False)
    assert next_rows_bytes(gate_up, NEXT_ROWS_BUDGET - o_weight.numel() * 2) == 256  # half of each 512-byte row
    torch.testing.assert_close(decode_linear(attn, o_weight, next_weight=gate_up), decode_linear(attn, o_weight),
                               rtol=0, atol=0)
    down = make(1, 256, 512, dtype, device, seed=5, residual=False)[3]
    results = []
    for row_prefetch in (norm_linear.MLP_ROW_PREFETCH, 0):
        old, norm_linear.MLP_ROW_PREFETCH = norm_linear.MLP_ROW_PREFETCH, row_prefetch
        try:
            results.append(fused_mlp(x, g, EPS, gate_up, down, torch.zeros(1, 256, device=device), res)[0])
        finally:
            norm_linear.MLP_ROW_PREFETCH = old
    assert norm_linear.MLP_ROW_PREFETCH > 0
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)


def test_fused_norm_linear_rejects_what_it_does_not_handle(device):
    w = torch.zeros(8, 32, dtype=torch.bfloat16, device=device)
    g = torch.ones(32, dtype=torch.bfloat16, device=device)
    x = torch.zeros(1, 32, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="16 rows"):
        fused_norm_linear(torch.zeros(17, 32, dtype=torch.bfloat16, device=device), g, EPS, w)
    with pytest.raises(TypeError, match="bfloat16"):
        fused_norm_linear(x.float(), g.float(), EPS, w.float())
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        fused_norm_linear(torch.zeros(1, 16, dtype=torch.bfloat16, device=device), g[:16], EPS, w)
    with pytest.raises(ValueError, match="even"):
        fused_norm_linear(x, g, EPS, w[:7], gated=True)
    with pytest.raises(ValueError, match="no bias"):
        fused_norm_linear(x, g, EPS, w, torch.zeros(8, dtype=torch.bfloat16, device=device), gated=True)
    with pytest.raises(ValueError, match="residual"):
        fused_norm_linear(x, g, EPS, w, residual=torch.zeros(2, 32, dtype=torch.bfloat16, device=device))
