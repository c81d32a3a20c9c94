"""small_m_linear against F.linear (float64 reference of the same bf16/fp16 inputs)."""

import pytest
import torch
from ulp import poisoned

from photoninfer.kernels.gemv import GemvConfig, default_config, small_m_linear


def reference(x, weight, bias=None):
    """float64 on the CPU."""
    y = x.cpu().double() @ weight.cpu().double().t()
    return y + bias.cpu().double() if bias is not None else y


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k,config", [
    (1, 96, 256, GemvConfig(block_n=32, block_k=64, split_k=1)),  # direct store
    (3, 80, 320, GemvConfig(block_n=32, block_k=64, split_k=4)),  # ragged N and K, split-K + reduction
    (16, 64, 512, GemvConfig(block_n=64, block_k=128, split_k=2)),
    (5, 48, 200, GemvConfig(block_n=16, block_k=32, split_k=16)),  # more splits than needed
])
def test_small_m_linear_matches_reference(dtype, m, n, k, config, device):
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    weight = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype).to(device)
    out = poisoned((m, n), dtype, device)
    small_m_linear(x, weight, config=config, out=out)
    # float32 accumulation, one rounding to the output dtype
    torch.testing.assert_close(out.cpu().double(), reference(x, weight), rtol=2 ** -7, atol=1e-3)


def test_small_m_linear_bias_and_strided_rows(device):
    gen = torch.Generator().manual_seed(4)
    wide = torch.randn(4, 300, generator=gen).to(torch.bfloat16).to(device)
    x = wide[:, :256]
    weight = (torch.randn(40, 256, generator=gen) / 16).to(torch.bfloat16).to(device)
    bias = torch.randn(40, generator=gen).to(torch.bfloat16).to(device)
    for split_k in (1, 2):
        out = small_m_linear(x, weight, bias, config=GemvConfig(block_n=16, block_k=64, split_k=split_k))
        torch.testing.assert_close(out.cpu().double(), reference(x, weight, bias), rtol=2 ** -7, atol=1e-2)


def test_default_config_fills_the_card():
    o_proj = default_config(2048, 2048)  # narrow: split K as far as two steps per program allow
    assert o_proj.split_k == 2048 // (2 * o_proj.block_k)
    down = default_config(2048, 8192)  # long K: enough splits for ~4 programs per SM
    assert (2048 // down.block_n) * down.split_k >= 4 * 132 and 8192 % (down.block_k * down.split_k) == 0
    assert default_config(128256, 2048).split_k == 1  # the LM head has tiles enough


def test_small_m_linear_rejects_what_it_does_not_handle(device):
    w = torch.zeros(8, 32, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="16 rows"):
        small_m_linear(torch.zeros(17, 32, dtype=torch.bfloat16, device=device), w)
    with pytest.raises(TypeError, match="bfloat16"):
        small_m_linear(torch.zeros(1, 32, device=device), w.float())
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        small_m_linear(torch.zeros(1, 16, dtype=torch.bfloat16, device=device), w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k,config", [
    (1, 96, 256, GemvConfig(block_n=16, block_k=128, split_k=1, fma=True)),  # direct store
    (2, 80, 320, GemvConfig(block_n=32, block_k=64, split_k=4, fma=True)),  # ragged N and K, split-K
    (3, 64, 512, GemvConfig(block_n=8, block_k=256, split_k=2, fma=True)),  # M padded to 4
    (4, 48, 200, GemvConfig(block_n=16, block_k=32, split_k=1, fma=True)),
])
def test_fma_kernel_matches_reference(dtype, m, n, k, config, device):
    gen = torch.Generator().manual_seed(7 * m + n + k)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    weight = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype).to(device)
    bias = torch.randn(n, generator=gen).to(dtype).to(device)
    out = poisoned((m, n), dtype, device)
    small_m_linear(x, weight, bias, config=config, out=out)
    torch.testing.assert_close(out.cpu().double(), reference(x, weight, bias), rtol=2 ** -7, atol=1e-3)


def test_fma_kernel_refuses_many_rows(device):
    x = torch.zeros(5, 64, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="at most 4 rows"):
        small_m_linear(x, torch.zeros(16, 64, dtype=torch.bfloat16, device=device), config=GemvConfig(fma=True))
