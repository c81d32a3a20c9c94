"""One row through a linear layer, its weights loaded into registers before the PDL wait (decode at batch 1).

Torch reference: `decode_gemv_reference` below: `F.linear`, or with a norm `norm_linear.fused_norm_linear_reference`
(the residual add, RMSNorm, then the linear layer, as the decoder runs them).

Why: at one row a decode step's attention block is a chain of latency-bound kernels (norm, q/k/v, attention, o)
whose weights sit in L2 when each starts (prefetched there, kernels/pdl.py), and reading them from L2 is itself
the chain's cost: L2 gives an SM ~40 GB/s, so Llama-3.2-1B's q/k/v (12.6 MB, 128 KB a program) took 4.4 us
after its input was ready and o 4.5 us (H100, docs/benchmarks.md, thirteenth session). Here each program loads
its BLOCK_ROWS whole weight rows into registers at launch, before its PDL wait, so they stream in while the
kernels before it still run; once its input is ready the program only reads the row of x (and residual),
multiplies on CUDA cores (one row: no tensor-core tile to fill) and stores BLOCK_ROWS outputs. With `norm_weight`
the kernel also does the residual add and RMSNorm in front (program 0 stores the sum), so q/k/v needs no norm
kernel before it and launches while the MLP before it still runs (its registers, unlike norm_linear's shared
memory tiles, leave room beside the MLP's programs). Llama-3.2-1B's decode graph at 1 row: 1,075-1,080 ->
982-987 us a step (q/k/v with the norm and o through here).

Rounding as norm_linear's: h = x + residual rounded to the model dtype, h * norm_weight rounded, the float32
sum of products scaled by rstd. x may be float32 (fused_mlp's output) when a residual is given.

Shapes: x [1, K] (contiguous), weight [N, K] (rows contiguous), bias [N], norm_weight [K], residual [1, K],
token_ids [1] int32/int64 (then x is the contiguous embedding table [V, K]: a first layer gathers its own row, and
the step opens with no gather kernel), zero [1, N] float32 (cleared on the way: fused_mlp's accumulator, as
decode_linear(zero=...)). K <= MAX_K: a program holds BLOCK_ROWS x K weights in registers (sm_90,
scripts/compile_kernels.py: 80-114 registers a thread, no spills, 128 bytes of shared memory).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from photoninfer.kernels._checks import check_accumulator, check_dim, check_last_contiguous, check_shape
from photoninfer.kernels.pdl import begin as pdl_begin, use_pdl

MAX_K = 2048  # BLOCK_ROWS x MAX_K bf16 weights = 64 KB of registers a program (256 bytes a thread over 8 warps)
# weight rows a program, over NUM_WARPS warps (Llama-3.2-1B's decode graph at 1 row, H100: 16 rows over 8 warps
# 987 us a step; 8 over 8: 991; 4 over 4: 994-997; 8 over 4: 999)
BLOCK_ROWS = 16
NUM_WARPS = 8
DTYPES = (torch.bfloat16, torch.float16)
ENABLED = os.environ.get("PHOTONINFER_DECODE_GEMV", "1") != "0"  # "0": norm_linear's kernels instead (comparison)
GATHER_EMBEDDING = True  # the first layer's q/k/v reads its token's embedding row (False: a gather kernel first)


@triton.jit
def _decode_gemv_kernel(x_ptr, ids_ptr, res_ptr, res_out_ptr, g_ptr, w_ptr, bias_ptr, y_ptr, zero_ptr, N, K, w_sn,
                        eps, BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
                        GATHER: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, ZERO: tl.constexpr,
                        PDL: tl.constexpr):
    pid = tl.program_id(0)
    dtype = w_ptr.dtype.element_ty
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_K)
    n_mask = rows < N
    k_mask = cols < K
    # no earlier kernel writes weights: they load while the kernel before this one runs
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * w_sn + cols[None, :], mask=n_mask[:, None] & k_mask[None, :],
                other=0.0)
    if NORM:
        g = tl.load(g_ptr + cols, mask=k_mask, other=0.0).to(tl.float32)
    pdl_begin(PDL)
    if GATHER:  # x_ptr is the embedding table: this step's token picks the row (the ids are a step input)
        x_ptr += tl.load(ids_ptr).to(tl.int64) * K
    x = tl.load(x_ptr + cols, mask=k_mask, other=0.0)
    if HAS_RESIDUAL:  # x may be float32 (fused_mlp's output): rounded first, as the reference's down output is
        h = (x.to(dtype).to(tl.float32) + tl.load(res_ptr + cols, mask=k_mask, other=0.0).to(tl.float32)).to(dtype)
        if pid == 0:
            tl.store(res_out_ptr + cols, h, mask=k_mask)
    else:
        h = x.to(dtype)
        if GATHER:  # the gathered row is the residual stream's start
            if pid == 0:
                tl.store(res_out_ptr + cols, h, mask=k_mask)
    h32 = h.to(tl.float32)
    if NORM:
        rstd = tl.rsqrt(tl.sum(h32 * h32, 0) / K + eps)
        a = (h32 * g).to(dtype).to(tl.float32)
    else:
        rstd = 1.0
        a = h32
    y = tl.sum(w.to(tl.float32) * a[None, :], axis=1) * rstd
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(dtype), mask=n_mask)
    if ZERO:
        tl.store(zero_ptr + rows, tl.zeros([BLOCK_ROWS], tl.float32), mask=n_mask)


def takes(weight: torch.Tensor, rows: int, device: torch.device) -> bool:
    """Whether decode_gemv runs this layer for a batch of `rows`: one row, K <= MAX_K, a bf16/fp16 weight with
    contiguous rows, and PDL on this device (without it the weights cannot load ahead, and norm_linear is faster)."""
    return (ENABLED and rows == 1 and weight.dtype in DTYPES and weight.shape[1] <= MAX_K and weight.stride(1) == 1
            and use_pdl(device, 1) > 0)


def decode_gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0, residual: Optional[torch.Tensor] = None,
                zero: Optional[torch.Tensor] = None, token_ids: Optional[torch.Tensor] = None):
    """x @ weight^T (+ bias) for one row; with `norm_weight` (y, h): h = x + residual (x without one) and
    y = rms_norm(h) * norm_weight @ weight^T (+ bias). `zero` (float32 [1, N]) is cleared on the way.
    With `token_ids` ([1], a decoder's first layer) x is the embedding table [V, K] and the row is x[token_ids]:
    no gather kernel opens the step; h is that row."""
    _check(x, weight, bias, norm_weight, residual, zero, token_ids)
    n, k = weight.shape
    y = torch.empty((1, n), dtype=weight.dtype, device=x.device)
    if residual is not None or token_ids is not None:
        h = torch.empty((1, k), dtype=weight.dtype, device=x.device)
    else:
        h = x
    pdl = use_pdl(x.device, 1)
    _decode_gemv_kernel[(triton.cdiv(n, BLOCK_ROWS),)](
        x, token_ids if token_ids is not None else x, residual if residual is not None else x, h,
        norm_weight if norm_weight is not None else weight, weight, bias if bias is not None else weight, y,
        zero if zero is not None else y, n, k, weight.stride(0), eps,
        BLOCK_ROWS=BLOCK_ROWS, BLOCK_K=triton.next_power_of_2(k), NORM=norm_weight is not None,
        GATHER=token_ids is not None, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        ZERO=zero is not None, PDL=pdl, num_warps=NUM_WARPS, launch_pdl=pdl > 0)
    return (y, h) if norm_weight is not None else y


def _check(x, weight, bias, norm_weight, residual, zero, token_ids) -> None:
    check_dim("x", x, 2)
    check_dim("weight", weight, 2)
    check_last_contiguous("x", x)
    check_last_contiguous("weight", weight)
    n, k = weight.shape
    if token_ids is not None:
        _check_gather(x, weight, norm_weight, residual, token_ids)
    elif x.shape[0] != 1 or x.shape[1] != k:
        raise ValueError(f"decode_gemv takes one row of {k} (weight {tuple(weight.shape)}), got x {tuple(x.shape)}")
    if k > MAX_K:
        raise ValueError(f"decode_gemv holds rows of at most {MAX_K} in registers, got {k}")
    x_ok = x.dtype == weight.dtype or (x.dtype == torch.float32 and residual is not None)
    if weight.dtype not in DTYPES or not x_ok:
        raise TypeError(f"decode_gemv takes a bfloat16/float16 weight and x of its dtype (float32 with a residual), "
                        f"got {weight.dtype} and {x.dtype}")
    for name, t, shape in (("bias", bias, (n,)), ("norm_weight", norm_weight, (k,)), ("residual", residual, (1, k))):
        if t is not None:
            check_shape(name, t, shape)
            check_last_contiguous(name, t)
            if t.dtype != weight.dtype:
                raise TypeError(f"{name} must have the weight's dtype {weight.dtype}, got {t.dtype}")
    if residual is not None and norm_weight is None:
        raise ValueError("decode_gemv adds a residual only in front of its norm")
    if zero is not None:
        check_accumulator("zero", zero, 1, n)


def _check_gather(table, weight, norm_weight, residual, token_ids) -> None:
    """token_ids: one id into the embedding table `table` [V, K], rows contiguous (the kernel steps K a row)."""
    check_shape("token_ids", token_ids, (1,))
    if token_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"token_ids must be int32/int64, got {token_ids.dtype}")
    if table.shape[1] != weight.shape[1] or not table.is_contiguous():
        raise ValueError(f"decode_gemv gathers from a contiguous embedding table [V, {weight.shape[1]}], "
                         f"got {tuple(table.shape)} with strides {table.stride()}")
    if norm_weight is None or residual is not None:
        raise ValueError("decode_gemv gathers a token's row only for a first layer: with norm_weight, no residual")


def decode_gemv_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                          norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0,
                          residual: Optional[torch.Tensor] = None, zero: Optional[torch.Tensor] = None,
                          token_ids: Optional[torch.Tensor] = None):
    """The decoder's ops one by one (the embedding gather, norm_linear.fused_norm_linear_reference, F.linear)."""
    from photoninfer.kernels.norm_linear import fused_norm_linear_reference

    if token_ids is not None:
        x = x[token_ids]
    if zero is not None:
        zero.zero_()
    if norm_weight is None:
        return torch.nn.functional.linear(x, weight, bias)
    return fused_norm_linear_reference(x.to(weight.dtype), norm_weight, eps, weight, bias, residual=residual)
