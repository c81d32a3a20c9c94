"""silu_and_mul against the MLP's `F.silu(gate) * up`."""

import pytest
import torch
import torch.nn.functional as F
from ulp import assert_close_ulps, poisoned, ulps_for

from photoninfer.kernels.activation import silu_and_mul


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,inter", [(1, 64), (5, 48), (2, 1500)])
def test_silu_and_mul_matches_reference(dtype, rows, inter, device):
    gen = torch.Generator().manual_seed(rows * inter)
    gate_up = (4 * torch.randn(rows, 2 * inter, generator=gen)).to(dtype).to(device)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    out = poisoned((rows, inter), dtype, device)
    silu_and_mul(gate_up, out=out)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    else:
        assert_close_ulps(out, expected, ulps=ulps_for(dtype, 2))


def test_silu_and_mul_allocates_and_takes_strided_rows(device):
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(3, 200, generator=gen).to(device)
    gate_up = wide[:, :128]  # rows 200 apart
    out = silu_and_mul(gate_up)
    assert out.shape == (3, 64)
    torch.testing.assert_close(out, F.silu(gate_up[:, :64]) * gate_up[:, 64:], rtol=1e-5, atol=1e-6)


def test_silu_and_mul_rejects_odd_width(device):
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.randn(2, 7, device=device))
