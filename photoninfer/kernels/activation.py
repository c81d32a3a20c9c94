"""SiLU-and-multiply of the fused gate/up projection (Triton).

Torch reference: `photoninfer.model.llama.MLP.forward`'s `F.silu(gate) * up`, where gate and up are the
two halves of gate_up. Same rounding steps: silu in float32 rounded to the input dtype, then the product
in float32 rounded again, so the result is bit-for-bit torch's on CPU.

Shapes: gate_up [T, 2I] (last dimension contiguous) -> out [T, I].
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from photoninfer.kernels._checks import check_dim, check_float, check_last_contiguous, check_shape

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, x_stride, out_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (silu * up).to(dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(gate_up[:, :I]) * gate_up[:, I:] -> [T, I] in gate_up's dtype (`out` may be preallocated)."""
    check_dim("gate_up", gate_up, 2)
    check_float("gate_up", gate_up)
    check_last_contiguous("gate_up", gate_up)
    rows, width = gate_up.shape
    if width % 2:
        raise ValueError(f"gate_up's last dimension must be even (gate and up halves), got {width}")
    inter = width // 2
    if out is None:
        out = torch.empty((rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    check_shape("out", out, (rows, inter))
    check_last_contiguous("out", out)
    if out.dtype != gate_up.dtype:
        raise TypeError(f"out must have gate_up's dtype {gate_up.dtype}, got {out.dtype}")
    if rows and inter:
        block = min(BLOCK, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(rows, triton.cdiv(inter, block))](
            gate_up, out, inter, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out
