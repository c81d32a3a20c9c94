"""rms_norm / fused_add_rms_norm against layers.RMSNorm (its normalize and residual forms)."""

import pytest
import torch
from ulp import assert_close_ulps, poisoned, ulps_for

from photoninfer.kernels.rmsnorm import fused_add_rms_norm, rms_norm
from photoninfer.model.layers import RMSNorm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-5


def make_norm(width, dtype, gen, device):
    norm = RMSNorm(width, EPS)
    norm.weight.data = (1 + 0.5 * torch.randn(width, generator=gen)).to(dtype)
    return norm.to(device)


def randn(gen, device, dtype, *shape, scale=1.0):
    return (scale * torch.randn(*shape, generator=gen)).to(dtype).to(device)


def assert_matches(actual, expected, rounding_steps=2):
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    else:
        assert_close_ulps(actual, expected, ulps=ulps_for(actual.dtype, rounding_steps))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", [(1, 64), (5, 100), (3, 2048)])
def test_rms_norm_matches_reference(dtype, rows, width, device):
    gen = torch.Generator().manual_seed(rows * width)
    norm = make_norm(width, dtype, gen, device)
    x = randn(gen, device, dtype, rows, width, scale=3)
    out = poisoned((rows, width), dtype, device)
    rms_norm(x, norm.weight, EPS, out=out)
    assert_matches(out, norm(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", [(1, 64), (4, 96), (2, 8192)])
def test_fused_add_rms_norm_matches_reference_in_place(dtype, rows, width, device):
    gen = torch.Generator().manual_seed(rows + width)
    norm = make_norm(width, dtype, gen, device)
    x = randn(gen, device, dtype, rows, width)
    residual = randn(gen, device, dtype, rows, width, scale=4)
    expected_normed, expected_residual = norm(x, residual)
    normed, new_residual = fused_add_rms_norm(x, residual, norm.weight, EPS)
    assert normed is x and new_residual is residual  # written in place
    assert_matches(new_residual, expected_residual, rounding_steps=0)  # the add rounds as torch's
    assert_matches(normed, expected_normed, rounding_steps=3)


def test_fused_add_rms_norm_out_of_place_keeps_inputs(device):
    gen = torch.Generator().manual_seed(7)
    norm = make_norm(64, torch.bfloat16, gen, device)
    x = randn(gen, device, torch.bfloat16, 3, 64)
    residual = randn(gen, device, torch.bfloat16, 3, 64)
    x_before, residual_before = x.clone(), residual.clone()
    normed, new_residual = fused_add_rms_norm(x, residual, norm.weight, EPS, inplace=False)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)
    expected_normed, expected_residual = norm(x, residual)
    assert_matches(new_residual, expected_residual, rounding_steps=0)
    assert_matches(normed, expected_normed, rounding_steps=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_add_rms_norm_takes_a_float32_x(dtype, device):
    """norm_linear.fused_mlp's float32 output: rounded to the residual's dtype first, as the reference rounds its
    down projection's output; the normed rows are a new tensor of that dtype, the residual sum is in place."""
    gen = torch.Generator().manual_seed(13)
    norm = make_norm(96, dtype, gen, device)
    x = randn(gen, device, torch.float32, 3, 96)
    residual = randn(gen, device, dtype, 3, 96, scale=4)
    expected_normed, expected_residual = norm(x.to(dtype), residual)
    normed, new_residual = fused_add_rms_norm(x, residual.clone(), norm.weight, EPS)
    assert normed.dtype == dtype
    # x's rounding may differ by one of its ulps (the interpreter truncates bf16), which a sum that cancels
    # shows as several of its own
    x_ulp = torch.finfo(dtype).eps * float(x.abs().max())
    assert_close_ulps(new_residual, expected_residual, ulps=ulps_for(dtype, 0), atol=x_ulp)
    # x already in the dtype's grid: the same roundings as the reference
    x = x.to(dtype).float()
    normed, new_residual = fused_add_rms_norm(x, residual, norm.weight, EPS)
    assert normed.dtype == dtype and new_residual is residual  # the residual sum in place
    assert_matches(new_residual, expected_residual, rounding_steps=0)
    assert_matches(normed, expected_normed, rounding_steps=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_head_norm_in_place_on_a_qkv_slice(dtype, device):
    """Qwen3's q-norm: normalize each head of the q columns of the fused qkv output, in place."""
    gen = torch.Generator().manual_seed(3)
    tokens, q_heads, kv_heads, head_dim = 3, 4, 2, 64
    norm = make_norm(head_dim, dtype, gen, device)
    qkv = randn(gen, device, dtype, tokens, (q_heads + 2 * kv_heads) * head_dim)
    before = qkv.clone()
    q = qkv[:, :q_heads * head_dim].view(tokens, q_heads, head_dim)  # strided rows, not contiguous
    expected = norm(q.clone())
    rms_norm(q, norm.weight, EPS, out=q)
    assert_matches(q, expected)
    assert torch.equal(qkv[:, q_heads * head_dim:], before[:, q_heads * head_dim:])  # k, v untouched


def test_rejects_bad_shapes(device):
    x = torch.randn(2, 64, device=device)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(32, device=device), EPS)
    with pytest.raises(ValueError, match="8192"):
        rms_norm(torch.randn(1, 8193, device=device), torch.ones(8193, device=device), EPS)
    with pytest.raises(TypeError, match="residual"):  # a float32 x goes with any residual; others must match
        fused_add_rms_norm(x.half(), torch.randn(2, 64, dtype=torch.bfloat16, device=device),
                           torch.ones(64, device=device), EPS)
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm(torch.randn(64, 2, device=device).t(), torch.ones(64, device=device), EPS)
