"""RMSNorm, alone and fused with the residual add that precedes it (Triton).

Torch reference: `photoninfer.model.layers.RMSNorm` (normalize / forward with a residual). The rounding
steps are the reference's: the residual add is rounded to the input dtype, the normalization runs in
float32 and is rounded to the input dtype, then multiplied by the weight and rounded again. So float32
agrees to ~1e-6 and bfloat16/float16 to one ulp (rsqrt approximations may differ in the last bit).

Shapes: x [rows, width] or [T, H, width] (e.g. Qwen3's per-head q/k-norm on a [T, Hq, D] slice of the
fused qkv output); any strides with the last dimension contiguous; width <= 8192. weight [width]. With a
residual, x may also be float32 (norm_linear.fused_mlp's output), rounded to the residual's dtype first.
One program normalizes one row, held entirely in registers.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from photoninfer.kernels._checks import check_float, check_last_contiguous, check_shape
from photoninfer.kernels.pdl import begin as pdl_begin, end as pdl_end, use_pdl

MAX_WIDTH = 8192


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    inner, width, eps,
    x_s0, x_s1, r_s0, r_s1, o_s0, o_s1, ro_s0, ro_s1,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    pdl_begin(PDL)
    # Row r of the (outer x inner) leading dims sits at (r // inner) * s0 + (r % inner) * s1.
    row = tl.program_id(0).to(tl.int64)
    outer = row // inner
    in_ = row % inner
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(x_ptr + outer * x_s0 + in_ * x_s1 + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + outer * r_s0 + in_ * r_s1 + cols, mask=mask, other=0.0).to(tl.float32)
        # torch adds in the model dtype; a float32 x (fused_mlp's sum) is rounded to it first, as the reference
        # rounds its down projection's output
        x = x.to(res_out_ptr.dtype.element_ty).to(tl.float32)
        summed = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + outer * ro_s0 + in_ * ro_s1 + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    pdl_end(PDL)
    mean_square = tl.sum(x * x, axis=0) / width
    normed = (x * tl.rsqrt(mean_square + eps)).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + outer * o_s0 + in_ * o_s1 + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _row_layout(name: str, t: torch.Tensor) -> tuple[int, int, int, int]:
    """(outer, inner, s0, s1) addressing the rows of a 2-D or 3-D tensor."""
    check_float(name, t)
    check_last_contiguous(name, t)
    if t.dim() == 2:
        return t.shape[0], 1, t.stride(0), 0
    if t.dim() == 3:
        return t.shape[0], t.shape[1], t.stride(0), t.stride(1)
    raise ValueError(f"{name} must be 2-D [rows, width] or 3-D [T, H, width], got shape {tuple(t.shape)}")


def _launch(x, residual, weight, eps, out, residual_out) -> None:
    outer, inner, x_s0, x_s1 = _row_layout("x", x)
    width = x.shape[-1]
    if width > MAX_WIDTH:
        raise ValueError(f"rms_norm supports rows up to {MAX_WIDTH} wide, got {width}")
    check_shape("weight", weight, (width,))
    check_shape("out", out, tuple(x.shape))
    model_dtype = residual.dtype if residual is not None else x.dtype
    if out.dtype != model_dtype:
        raise TypeError(f"out must have the dtype {model_dtype} of {'residual' if residual is not None else 'x'}, "
                        f"got {out.dtype}")
    _, _, o_s0, o_s1 = _row_layout("out", out)
    r_s0 = r_s1 = ro_s0 = ro_s1 = 0
    if residual is not None:
        check_shape("residual", residual, tuple(x.shape))
        if residual.dtype != x.dtype and x.dtype != torch.float32:
            raise TypeError(f"residual must have x's dtype {x.dtype} (or x float32), got {residual.dtype}")
        _, _, r_s0, r_s1 = _row_layout("residual", residual)
        _, _, ro_s0, ro_s1 = _row_layout("residual_out", residual_out)
    rows = outer * inner
    if rows == 0:
        return
    block = triton.next_power_of_2(width)
    pdl = use_pdl(x.device, rows)
    _rms_norm_kernel[(rows,)](
        x, residual if residual is not None else x, weight, out,
        residual_out if residual_out is not None else out,
        inner, width, eps, x_s0, x_s1, r_s0, r_s1, o_s0, o_s1, ro_s0, ro_s1,
        HAS_RESIDUAL=residual is not None, BLOCK=block, PDL=pdl,
        num_warps=min(max(block // 512, 1), 16), launch_pdl=pdl > 0,
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """weight * norm(x) per row, like `RMSNorm.normalize`. x: [rows, width] or [T, H, width].

    `out` (same shape and dtype as x) may be x itself: each row is read whole before it is written, so
    q/k-norm can normalize a slice of the fused qkv buffer in place. Without it a new tensor is returned.
    """
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, None, weight, eps, out, None)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       inplace: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * norm(x + residual), x + residual), like `RMSNorm.forward(x, residual)`.

    With `inplace` (the default, no allocation) the normed rows overwrite x and the new residual
    overwrites residual, and the two input tensors are returned; otherwise new tensors are returned.
    x may be float32 with a residual of the model dtype (fused_mlp's output): x is rounded to that dtype before
    the add, and the normed rows are a new tensor of that dtype.
    """
    if inplace and x.dtype == residual.dtype:
        out, residual_out = x, residual
    else:
        out = torch.empty(x.shape, dtype=residual.dtype, device=x.device)
        residual_out = residual if inplace else torch.empty(x.shape, dtype=residual.dtype, device=x.device)
    _launch(x, residual, weight, eps, out, residual_out)
    return out, residual_out
