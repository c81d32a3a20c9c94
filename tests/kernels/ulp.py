"""Comparison helpers shared by the kernel tests."""

import torch


def poisoned(shape, dtype, device="cpu") -> torch.Tensor:
    """A tensor full of NaN: any element a kernel forgets to write stays NaN."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_close_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 1.0, atol: float = 0.0) -> None:
    """Every element within `ulps` units in the last place of expected's dtype (and no NaN anywhere)."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert not torch.isnan(actual).any(), "output holds NaN: some element was not written"
    eps = torch.finfo(expected.dtype).eps
    a, e = actual.double(), expected.double()
    # spacing of expected's dtype at |e|: eps * 2**floor(log2 |e|)
    spacing = eps * torch.exp2(torch.floor(torch.log2(e.abs().clamp_min(torch.finfo(expected.dtype).tiny))))
    err = (a - e).abs()
    bad = err > ulps * spacing + atol
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} elements off by more than {ulps} ulp; worst "
                           f"{float((err / spacing)[bad].max()):.2f} ulp at actual={a[bad][:4].tolist()} "
                           f"expected={e[bad][:4].tolist()}")


def ulps_for(dtype: torch.dtype, rounding_steps: int) -> float:
    """Tolerance in ulps for a kernel that rounds to `dtype` after `rounding_steps` float32 steps in the
    same places as its torch reference.

    float16 gets one ulp per rounding step: exp/rsqrt approximations can move the first rounding by one
    ulp, which the next rounding can carry into a second (seen on the H100 and the H200: silu·mul, 1 element
    in 3,000 off by 2 ulp). bfloat16 gets one more: Triton's interpreter converts float32 to bfloat16 by
    truncation, not round-to-nearest as the GPU does (scripts/bench_kernels.py checks bfloat16 on the GPU).
    0 means "exact" for a result that is a single rounding of exact inputs, like the residual add.
    """
    if dtype == torch.bfloat16:
        return 1 + rounding_steps
    return rounding_steps
