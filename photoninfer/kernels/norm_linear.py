"""RMSNorm (after an optional residual add) feeding a linear layer, in one kernel for a few rows (decode).

Torch reference: `fused_norm_linear_reference` below, i.e. `layers.RMSNorm` then `layers.Linear` (then
`layers.silu_and_mul` when GATED) as the decoder runs them one after the other.

Why: at decode batch sizes each of those ops is a separate, latency-bound kernel of a few microseconds, and a
decode step runs them for every layer (Llama-3.2-1B: 155 kernels a step at batch 1, most of them small). The
norm is a per-row scale, so it commutes with the matmul: norm(h) @ W^T = rstd * ((h * g) @ W^T), with
rstd = 1 / sqrt(mean(h^2) + eps) summed in the same pass over K that streams W. So the norm costs no extra pass
and no launch; with GATED the gate and up rows of an output column are multiplied in the same program, which
applies silu(gate) * up before the store (half the bytes written, no SiLU kernel).

Rounding differs from the reference in one place: the reference rounds norm(h) to the model dtype and then
multiplies by g, the kernel rounds h * g and scales the float32 sums by rstd. Both are within one bf16 ulp
per element; the tests bound the difference.

Grid: one program per BLOCK_N output columns over all of K (no split-K: the norm needs the whole row). The
residual sum h = x + residual is written to `residual_out` by program 0 only (every program computes it).

`decode_linear` is the same kernel without the norm (x @ W^T + bias, torch reference F.linear): decode steps
on Hopper run o, down and unfused q/k/v on it, so that every kernel of a layer launches with programmatic
dependent launch (kernels/pdl.py), which cuBLAS's do not. It loads x inside the loop (X_AHEAD=False), where
the pipeliner prefetches it with the weights.

W_AHEAD: the first W_AHEAD columns of the program's weight tile are loaded before the PDL wait (no earlier
kernel writes weights), so they stream in while the kernel before is still running. That pays after a kernel
whose time is latency rather than bandwidth: o after the attention kernel, for rows short enough to hold
whole (SmolLM2-135M; default_config).

PREFETCH (launches with PDL on Hopper): before its PDL wait, each program asks the TMA unit to bring the start
of its weight tile into L2 (`cp.async.bulk.prefetch.L2`, one instruction, no registers), so DRAM streams this
kernel's weights while the kernel before it finishes, and the loads after the wait start from L2. The prefetch
is only a cache hint: what the kernel reads is unchanged. Only weights of at most L2_PREFETCH_BUDGET bytes are
prefetched, whole (see `prefetch_bytes`). Larger weights get the start of each row instead, the part the loop
reads first (ROW_PREFETCH: fused_mlp's gate/up, while o finishes), and o also asks for the start of each of the
MLP's rows while attention runs where its own weights leave room (NEXT_BYTES, `next_rows_bytes`).

`fused_mlp` (up to FUSED_MLP_MAX_M rows) is the gated kernel with down inside (DOWN): each program multiplies
its SiLU·mul columns by its columns of the down weight and adds the [M, hidden] partial into a float32 output
with atomics, so down's weights stream right after the program's gate/up tile instead of waiting for the whole
of gate/up to finish (H100, Llama-3.2-1B decode: 860 -> 898 tok/s at 1 row, 2,962 -> 3,133-3,225 at 4). The output is
zeroed by o's decode_linear(zero=...) before, and read (rounded to the model dtype) by the next layer's norm
(the rms_norm kernel, or this kernel's q/k/v or LM head with the norm inside). float32 atomics add in no fixed
order: the sum can differ in its last bits from run to run.

Shapes: x [M, K] with M <= 16 (last dim contiguous), residual/residual_out [M, K], norm_weight [K],
weight [N, K] ([2I, K] gate rows then up rows when GATED), optional bias [N]; y [M, N] (or [M, I]).
bf16/fp16 only: float32 keeps the separate kernels (tl.dot would round float32 operands to tf32).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from photoninfer.kernels import interpreting
from photoninfer.kernels.pdl import (begin as pdl_begin, end as pdl_end, prefetch_l2, prefetch_l2_each, prefetches,
                                     use_pdl)
from photoninfer.kernels._checks import (check_accumulator, check_dim, check_last_contiguous, check_power_of_two,
                                         check_shape)

MAX_M = 16  # tl.dot's smallest tile; the rows are padded to it
# The input norm fused into q/k/v pays for rows up to 1024 wide: on an H100 at 1 / 16 rows, SmolLM2 (576)
# 5.1 -> 3.7 / 5.4 -> 4.0 us, Qwen3-0.6B (1024) 7.5 -> 6.4 / 7.6 -> 7.1 us, but Llama-3.2-1B (2048) 9.2 -> 9.1 /
# 9.5 -> 10.5 us (the prologue's work per step grows with the row; with 32-column tiles, session 6, Llama's
# decode steps went 834 -> 839 tok/s at 1 row but 12.2k -> 11.5k at 16). gate/up always pays (SiLU·mul
# included): Llama 30.9 -> 26.7 / 32.1 -> 27.3 us; and so does the LM head after the final norm: 224 -> 176 /
# 196 -> 184 us.
FUSE_QKV_MAX_K = 1024
# `weights_ahead` (decode_linear) loads a whole weight row before the PDL wait up to this K
WEIGHTS_AHEAD_MAX_K = 1024
# the largest weight prefetched into L2 (whole) before the PDL wait: a third of an H100's 50 MB L2, so that
# nothing prefetched is evicted before its program reads it
L2_PREFETCH_BUDGET = 16 << 20
DTYPES = (torch.bfloat16, torch.float16)
# fused_mlp (gate/up, SiLU·mul and down in one kernel) up to this many rows: its float32 atomics grow with the
# rows (H100, Llama-3.2-1B's down alone as 128 programs of 64 columns: 14.3 / 15.2 / 20.4 us at 1 / 4 / 16 rows
# against the row-tiled kernel's 14.8 / 16.4 / 14.9)
FUSED_MLP_MAX_M = 4
FUSED_MLP = os.environ.get("PHOTONINFER_FUSED_MLP", "1") != "0"  # "0": gate/up and down as two kernels (comparison)
FUSED_MLP_BLOCK_H = 256  # down's output rows per step of its loop
# Row starts asked of L2 before a PDL wait (pdl.prefetch_l2_each; one-row steps, pdl.prefetches), H100 decode graphs
# at 1 row (scripts/decode_graph_ab.py, docs/benchmarks.md, eleventh session):
# - fused_mlp's programs: the first MLP_ROW_PREFETCH bytes of each of their gate and up rows, which their loop reads
#   first, while o finishes. Llama-3.2-1B 1,102-1,107 -> 1,086-1,088 us a step (384 and 640 alike; 256: 1,091;
#   1,024: 1,115 and 2,048: 1,180, where the prefetch slows o); Qwen3-0.6B and SmolLM2-135M within noise.
MLP_ROW_PREFETCH = 512
# - o's programs, while attention runs: besides their own weights (PREFETCH), an equal share of each of the MLP's
#   gate/up rows, within NEXT_ROWS_BUDGET bytes in all (next_rows_bytes). Qwen3-0.6B 955-966 -> 930 us (1,024 bytes a
#   row; 512: 935, 2,048: 942). Llama-3.2-1B's o alone is 8.4 MB and leaves it none (512 bytes a row: 1,084 ->
#   1,093); whole rows lost for SmolLM2-135M (578-580 -> 582-583 us), so at most half of each.
NEXT_ROWS_BUDGET = 11 << 20
# decode steps run q/k/v (where not fused), o and down through decode_linear rather than cuBLAS
DECODE_LINEARS = os.environ.get("PHOTONINFER_DECODE_LINEARS", "1") != "0"


@dataclass(frozen=True)
class NormLinearConfig:
    block_n: int = 32
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4
    x_ahead: bool = True  # x loaded a step ahead by hand; False: in the loop (where the pipeliner prefetches it)
    w_ahead: int = 0  # leading K columns of the weights loaded before the PDL wait (0 or a power of two)


def fused_mlp_config(inter: int) -> NormLinearConfig:
    """fused_mlp's tiles: intermediate columns a program so that ~100 programs cover the SMs (Llama-3.2-1B's 8192
    in 128 programs of 64; Qwen3-0.6B's 3072 and SmolLM2-135M's 1536 in 96 of 32 and 16). The widest take 256-wide
    K steps over 8 warps: Llama-3.2-1B's decode graph 1,094.8 -> 1,091.1 us a step at 1 row, 1,151.7 -> 1,147.6 at 4
    (H100, twice each in one process; 4 warps with those steps: 1,112 / 1,795 us)."""
    if inter >= 8192:
        return NormLinearConfig(block_n=64, block_k=256, num_warps=8, num_stages=3)
    return NormLinearConfig(block_n=32 if inter >= 3072 else 16, block_k=128, num_warps=4, num_stages=3)


def default_config(n_out: int, k: int, gated: bool, m: int = 1, norm: bool = True,
                   weights_ahead: bool = False) -> NormLinearConfig:
    """Tiles measured best on an H100 (scripts/bench_norm_linear.py, scripts/bench_decode_linear.py,
    docs/benchmarks.md). With the norm: narrow outputs (SmolLM2's q/k/v and gate/up) 16 columns a program so
    that the programs still cover the SMs; wider ones 32, or 64 for up to 4 rows (less of the prologue's work
    per weight byte); 256-wide K steps, 128 for gate/up (two weight tiles a step) beyond 4 rows and where
    wide (Llama-3.2-1B's decode steps at 1 row 846-847 -> 853 tok/s, twice each in one call on an H100).

    Without the norm (decode_linear) x is loaded in the loop, where the pipeliner prefetches it with the
    weights, in long K steps: 32 x 512 four stages deep for K >= 2048 (Llama-3.2-1B q/k/v, o, down at 1 row:
    6.8, 5.8, 14.9 us against cuBLAS's 7.4, 6.4, 16.6), shorter for SmolLM2's narrow layers (o 2.4 us against
    3.3, down 3.6 against 5.4).

    `weights_ahead` (o after the attention kernel) loads the program's whole weight tile before its PDL wait,
    16 columns over 8 warps, for K <= WEIGHTS_AHEAD_MAX_K: SmolLM2-135M's decode steps at 1 row went from
    1,408 to 1,521-1,539 tok/s (H100; the same tiles loading after the wait: 1,437). Llama-3.2-1B's 2048-wide
    o lost the same way (839 -> 790 tok/s), so it keeps its tiles."""
    if not norm:
        if weights_ahead and k <= WEIGHTS_AHEAD_MAX_K:
            return NormLinearConfig(16, 512, 8, 3, x_ahead=False, w_ahead=triton.next_power_of_2(k))
        if k >= 2048:
            return NormLinearConfig(32, 512, 4, 4, x_ahead=False)
        if k > 1024:
            return NormLinearConfig(16, 512, 4, 3, x_ahead=False)
        return NormLinearConfig(32, 256, 4, 3, x_ahead=False)
    block_n = 16 if n_out < 2048 else 64 if m <= 4 else 32
    if gated:
        block_n = min(block_n, 32)
    return NormLinearConfig(block_n=block_n, block_k=128 if gated and (m > 4 or n_out >= 2048) else 256, num_stages=3)


@triton.jit
def _norm_linear_kernel(
    x_ptr, res_ptr, res_out_ptr, g_ptr, w_ptr, bias_ptr, y_ptr,
    M, N, K, eps, x_sm, r_sm, ro_sm, w_sn, y_sm, up_rows, prefetch_bytes, down_ptr, down_sn, zero_ptr,
    NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    PDL: tl.constexpr, X_AHEAD: tl.constexpr, W_AHEAD: tl.constexpr, PREFETCH: tl.constexpr,
    DOWN: tl.constexpr, BLOCK_H: tl.constexpr, ZERO: tl.constexpr, ROW_PREFETCH: tl.constexpr,
    next_ptr, next_sn, next_rows, NEXT_ROWS: tl.constexpr, NEXT_BYTES: tl.constexpr,
):
    pid = tl.program_id(0)
    dtype = w_ptr.dtype.element_ty  # the model dtype (fused_mlp: y_ptr is its float32 accumulator)
    rows_m = tl.arange(0, BLOCK_M)
    rows_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rows_m < M
    n_mask = rows_n < N
    w_rows = w_ptr + rows_n[:, None].to(tl.int64) * w_sn
    if PREFETCH:  # the tile's rows are contiguous (w_sn == K): prefetch its first bytes, up to the last row
        first_row = pid * BLOCK_N
        tile = w_ptr + first_row.to(tl.int64) * w_sn
        row_bytes = w_sn * (w_ptr.dtype.element_ty.primitive_bitwidth // 8)
        nbytes = tl.minimum(prefetch_bytes, tl.minimum(N - first_row, BLOCK_N) * row_bytes)
        prefetch_l2(tile, nbytes)
        if GATED:
            prefetch_l2(tile + up_rows * w_sn, nbytes)
    if ROW_PREFETCH > 0:  # the start of each of its weight rows: what its loop reads first
        starts = w_ptr + tl.where(n_mask, rows_n, 0).to(tl.int64) * w_sn
        nbytes = tl.zeros_like(rows_n) + ROW_PREFETCH
        prefetch_l2_each(starts, nbytes)
        if GATED:
            prefetch_l2_each(starts + up_rows * w_sn, nbytes)
    if NEXT_BYTES > 0:  # the start of NEXT_ROWS rows of a later kernel's weight (o: the MLP's gate/up)
        rows = pid * NEXT_ROWS + tl.arange(0, NEXT_ROWS)
        rows = tl.where(rows < next_rows, rows, 0).to(tl.int64)
        prefetch_l2_each(next_ptr + rows * next_sn, tl.zeros_like(rows).to(tl.int32) + NEXT_BYTES)
    if W_AHEAD > 0:  # no earlier kernel writes the weights: their first columns load while this one waits
        w_first, u_first = _load_weights(w_rows, up_rows * w_sn, tl.arange(0, W_AHEAD), n_mask, K, GATED)
    pdl_begin(PDL)
    first = (tl.zeros([BLOCK_M], tl.int32) + pid) == 0  # program 0 writes the residual sum
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    sum_sq = tl.zeros([BLOCK_M], tl.float32)
    if W_AHEAD > 0:  # (in a function of its own: its tiles are W_AHEAD wide, the loop's BLOCK_K)
        acc, acc_up, sum_sq = _first_columns(x_ptr, res_ptr, g_ptr, w_first, u_first, acc, acc_up, sum_sq,
                                             res_out_ptr, rows_m, tl.arange(0, W_AHEAD), m_mask, first, K, x_sm,
                                             r_sm, ro_sm, NORM, HAS_RESIDUAL, GATED, UPCAST)
    # x, residual and g are loaded one step ahead, by hand: Triton's pipeliner prefetches only loads that
    # feed tl.dot directly, and left these waiting on memory every step (2-3x the time of a plain GEMV)
    # (a plain linear may instead load x in the loop, X_AHEAD=False, where the pipeliner prefetches it)
    cols = W_AHEAD + tl.arange(0, BLOCK_K)
    x_next, r_next, g_next = _load_inputs(x_ptr, res_ptr, g_ptr, rows_m, cols, m_mask, K, x_sm, r_sm, NORM,
                                          HAS_RESIDUAL)
    for k0 in range(W_AHEAD, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        if X_AHEAD:
            h, r, g = x_next, r_next, g_next
            x_next, r_next, g_next = _load_inputs(x_ptr, res_ptr, g_ptr, rows_m, cols + BLOCK_K, m_mask, K, x_sm,
                                                  r_sm, NORM, HAS_RESIDUAL)
        else:
            h, r, g = _load_inputs(x_ptr, res_ptr, g_ptr, rows_m, cols, m_mask, K, x_sm, r_sm, NORM, HAS_RESIDUAL)
        w, u = _load_weights(w_rows, up_rows * w_sn, cols, n_mask, K, GATED)
        acc, acc_up, sum_sq = _accumulate(h, r, g, w, u, acc, acc_up, sum_sq, res_out_ptr, rows_m, cols, m_mask,
                                          first, K, ro_sm, NORM, HAS_RESIDUAL, GATED, UPCAST)
    pdl_end(PDL)
    if NORM:
        rstd = tl.rsqrt(sum_sq / K + eps)
    else:
        rstd = tl.full([BLOCK_M], 1.0, tl.float32)
    if ZERO:  # zero_ptr [M, N] float32: cleared for the accumulating kernel after this one (fused_mlp)
        tl.store(zero_ptr + rows_m[:, None] * N + rows_n[None, :], tl.zeros([BLOCK_M, BLOCK_N], tl.float32),
                 mask=m_mask[:, None] & n_mask[None, :])
    if not GATED:
        _store_output(acc * rstd[:, None], bias_ptr, y_ptr, rows_m, rows_n, m_mask, n_mask, y_sm, HAS_BIAS)
        return
    # gated (no bias): as the reference, gate and up rounded to the dtype, silu rounded, then the product
    gate = (acc * rstd[:, None]).to(dtype).to(tl.float32)
    up = (acc_up * rstd[:, None]).to(dtype).to(tl.float32)
    act = ((gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up).to(dtype)
    if DOWN:
        _down_partial(act, down_ptr, down_sn, y_ptr, rows_m, rows_n, m_mask, n_mask, K, BLOCK_M, BLOCK_H, UPCAST)
    else:
        tl.store(y_ptr + rows_m[:, None] * y_sm + rows_n[None, :], act, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _down_partial(act, down_ptr, down_sn, acc_ptr, rows_m, rows_n, m_mask, n_mask, H, BLOCK_M: tl.constexpr,
                  BLOCK_H: tl.constexpr, UPCAST: tl.constexpr):
    """acc[:, :H] += act @ Wd[:, rows_n]^T (fused_mlp): this program's share of the down projection (its columns
    of the intermediate dim, rows of Wd down_sn apart), added into the float32 output with atomics."""
    for h0 in range(0, H, BLOCK_H):
        rows_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = rows_h < H
        w = tl.load(down_ptr + rows_h[:, None].to(tl.int64) * down_sn + rows_n[None, :],
                    mask=h_mask[:, None] & n_mask[None, :], other=0.0)
        part = _dot_t(act, w, tl.zeros([BLOCK_M, BLOCK_H], tl.float32), UPCAST)
        tl.atomic_add(acc_ptr + rows_m[:, None] * H + rows_h[None, :], part, mask=m_mask[:, None] & h_mask[None, :],
                      sem="relaxed")


@triton.jit
def _first_columns(x_ptr, res_ptr, g_ptr, w, u, acc, acc_up, sum_sq, res_out_ptr, rows_m, cols, m_mask, first, K,
                   x_sm, r_sm, ro_sm, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GATED: tl.constexpr,
                   UPCAST: tl.constexpr):
    """The step over the columns whose weights (w, u) were loaded before the PDL wait."""
    h, r, g = _load_inputs(x_ptr, res_ptr, g_ptr, rows_m, cols, m_mask, K, x_sm, r_sm, NORM, HAS_RESIDUAL)
    return _accumulate(h, r, g, w, u, acc, acc_up, sum_sq, res_out_ptr, rows_m, cols, m_mask, first, K, ro_sm,
                       NORM, HAS_RESIDUAL, GATED, UPCAST)


@triton.jit
def _load_weights(w_rows, up_offset, cols, n_mask, K, GATED: tl.constexpr):
    """The weight tile [BLOCK_N, len(cols)] at `cols`, and with GATED the up rows' tile (else w again)."""
    mask = n_mask[:, None] & (cols < K)[None, :]
    w = tl.load(w_rows + cols[None, :], mask=mask, other=0.0)
    u = w
    if GATED:
        u = tl.load(w_rows + up_offset + cols[None, :], mask=mask, other=0.0)
    return w, u


@triton.jit
def _accumulate(h, r, g, w, u, acc, acc_up, sum_sq, res_out_ptr, rows_m, cols, m_mask, first, K, ro_sm,
                NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GATED: tl.constexpr, UPCAST: tl.constexpr):
    """One step over K: the residual sum h = x + r (program 0 stores it), its squares into sum_sq, and
    (h * g) @ w^T (and @ u^T when GATED) into the accumulators."""
    dtype = w.dtype  # the model dtype (x may be fused_mlp's float32 output, rounded to it first as the reference
    if HAS_RESIDUAL:  # rounds its down projection's output; the reference adds in the model dtype)
        h = (h.to(dtype).to(tl.float32) + r.to(tl.float32)).to(dtype)
        mask = m_mask[:, None] & (cols < K)[None, :] & first[:, None]
        tl.store(res_out_ptr + rows_m[:, None] * ro_sm + cols[None, :], h, mask=mask)
    if NORM:
        h32 = h.to(tl.float32)
        sum_sq += tl.sum(h32 * h32, axis=1)
        a = (h32 * g.to(tl.float32)[None, :]).to(dtype)
    else:
        a = h
    acc = _dot_t(a, w, acc, UPCAST)
    if GATED:
        acc_up = _dot_t(a, u, acc_up, UPCAST)
    return acc, acc_up, sum_sq


@triton.jit
def _dot_t(a, w, acc, UPCAST: tl.constexpr):
    """acc + a @ w^T in float32."""
    if UPCAST:  # interpreter only: it would multiply bfloat16 bit patterns
        return tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
    return tl.dot(a, tl.trans(w), acc)


@triton.jit
def _store_output(y, bias_ptr, y_ptr, rows_m, rows_n, m_mask, n_mask, y_sm, HAS_BIAS: tl.constexpr):
    """y (+ bias) rounded to the output's dtype, stored to the valid rows and columns."""
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows_m[:, None] * y_sm + rows_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _load_inputs(x_ptr, res_ptr, g_ptr, rows_m, cols, m_mask, K, x_sm, r_sm, NORM: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr):
    """One step over K (columns `cols`, those < K valid) of x, residual (x again when there is none: never
    used) and the norm weight (zeros, never used, without NORM)."""
    k_mask = cols < K
    mask = m_mask[:, None] & k_mask[None, :]
    x = tl.load(x_ptr + rows_m[:, None] * x_sm + cols[None, :], mask=mask, other=0.0)
    r = x
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows_m[:, None] * r_sm + cols[None, :], mask=mask, other=0.0)
    if NORM:
        g = tl.load(g_ptr + cols, mask=k_mask, other=0.0)
    else:
        g = tl.zeros(cols.shape, g_ptr.dtype.element_ty)
    return x, r, g


def fused_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                      bias: Optional[torch.Tensor] = None, *, residual: Optional[torch.Tensor] = None,
                      gated: bool = False, config: Optional[NormLinearConfig] = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h): h = x + residual (x when no residual), y = rms_norm(h) * norm_weight @ weight^T (+ bias),
    and with `gated` y = silu(y[:, :I]) * y[:, I:] for weight [2I, K]. h is a new tensor when residual is
    given (x and residual are read by every program, so it cannot be written in place). With a residual, x may
    be float32 (fused_mlp's output): it is rounded to the model dtype before the add."""
    _check(x, norm_weight, weight, bias, residual, gated)
    h = torch.empty_like(residual) if residual is not None else x
    return _launch(x, norm_weight, eps, weight, bias, residual, h, gated, config), h


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                  config: Optional[NormLinearConfig] = None, weights_ahead: bool = False,
                  zero: Optional[torch.Tensor] = None, next_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight^T (+ bias) for at most MAX_M rows: the same kernel without the norm, so that a decode
    step's o and down projections are PDL kernels like their neighbours (cuBLAS's are not: each would make
    the next kernel wait for a full drain and launch). `weights_ahead` picks tiles that load the weights
    while the kernel before is still running (default_config). `zero` (float32, y's shape) is cleared on the
    way: the accumulator that the fused_mlp after o adds into. `next_weight` (the fused_mlp's gate/up): the
    start of each of its rows is asked of L2 with this kernel's own weights (next_rows_bytes), a cache hint only."""
    _check(x, None, weight, bias, None, False)
    if zero is not None:
        check_accumulator("zero", zero, x.shape[0], weight.shape[0])
    config = config or default_config(weight.shape[0], x.shape[1], False, x.shape[0], norm=False,
                                      weights_ahead=weights_ahead)
    return _launch(x, None, 0.0, weight, bias, None, x, False, config, zero=zero, next_weight=next_weight)


def fused_mlp(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, gate_up: torch.Tensor, down: torch.Tensor,
              out: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, h): h = x + residual, out += silu(g) * u @ down^T with [g | u] = rms_norm(h) * norm_weight @
    gate_up^T: the whole MLP of a decode step in one kernel, for at most FUSED_MLP_MAX_M rows. Each program
    takes fused_mlp_config's block_n intermediate columns through gate/up and SiLU·mul, then multiplies them by
    its columns of down and adds the partial result into `out` (float32 [M, hidden], zeroed before: o's
    decode_linear(zero=out)) with atomics, so down's weights stream without waiting for the whole of gate/up.
    The sum's order varies from run to run (float32 atomics); the reference rounds down's output to the model
    dtype, which the next kernel does when it reads `out` (rms_norm or fused_norm_linear with a float32 x)."""
    _check(x, norm_weight, gate_up, None, residual, True)
    m, hidden = x.shape
    if m > FUSED_MLP_MAX_M:
        raise ValueError(f"fused_mlp handles at most {FUSED_MLP_MAX_M} rows, got {m}")
    check_shape("down", down, (hidden, gate_up.shape[0] // 2))
    check_last_contiguous("down", down)
    if down.dtype != x.dtype:
        raise TypeError(f"down must have x's dtype {x.dtype}, got {down.dtype}")
    check_accumulator("out", out, m, hidden)
    h = torch.empty_like(residual)
    _launch(x, norm_weight, eps, gate_up, None, residual, h, True, fused_mlp_config(down.shape[1]), down=down,
            out=out, row_prefetch=MLP_ROW_PREFETCH)
    return out, h


def _launch(x, norm_weight, eps, weight, bias, residual, h, gated, config, down=None, out=None,
            zero=None, row_prefetch=0, next_weight=None) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    n_out = n // 2 if gated else n
    y = out if down is not None else torch.empty((m, n_out), dtype=weight.dtype, device=x.device)
    if m == 0 or n_out == 0:
        return y
    config = config or default_config(n_out, k, gated, m, norm=norm_weight is not None)
    check_power_of_two("block_n", config.block_n, 16, 256)
    check_power_of_two("block_k", config.block_k, 16, 1024)
    if config.w_ahead:
        check_power_of_two("w_ahead", config.w_ahead, 16, 8192)
    res = residual if residual is not None else x
    pdl = use_pdl(x.device, m)
    programs = triton.cdiv(n_out, config.block_n)
    hints = pdl and prefetches(m)  # cache hints before the PDL wait
    prefetch = prefetch_bytes(weight, config.block_n) if hints else 0
    next_bytes = next_rows_bytes(next_weight, NEXT_ROWS_BUDGET - prefetch * programs) if hints else 0
    _norm_linear_kernel[(programs,)](
        x, res, h, norm_weight if norm_weight is not None else weight, weight, bias if bias is not None else weight,
        y, m, n_out, k, eps, x.stride(0), res.stride(0), h.stride(0), weight.stride(0), y.stride(0), n_out, prefetch,
        down if down is not None else weight, down.stride(0) if down is not None else 0,
        zero if zero is not None else y,
        NORM=norm_weight is not None, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, GATED=gated,
        BLOCK_M=MAX_M, BLOCK_N=config.block_n, BLOCK_K=config.block_k, UPCAST=interpreting(),
        PDL=pdl, X_AHEAD=config.x_ahead, W_AHEAD=config.w_ahead, PREFETCH=prefetch > 0,
        DOWN=down is not None, BLOCK_H=FUSED_MLP_BLOCK_H, ZERO=zero is not None,
        ROW_PREFETCH=_row_start_bytes(weight, row_prefetch) if hints else 0,
        next_ptr=next_weight if next_bytes else weight, next_sn=next_weight.stride(0) if next_bytes else 0,
        next_rows=next_weight.shape[0] if next_bytes else 0,
        NEXT_ROWS=triton.next_power_of_2(triton.cdiv(next_weight.shape[0], programs)) if next_bytes else 1,
        NEXT_BYTES=next_bytes,
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl > 0,
    )
    return y


def _row_start_bytes(weight: torch.Tensor, nbytes: int) -> int:
    """nbytes at the start of each row, at most the row, in 16-byte units; 0 where the rows are not each one 16-byte
    aligned run (what a bulk prefetch needs)."""
    if not _rows_bulk_aligned(weight):
        return 0
    return min(nbytes, weight.shape[1] * weight.element_size()) // 16 * 16


def _rows_bulk_aligned(weight: torch.Tensor) -> bool:
    """Every row of `weight` starts on a 16-byte boundary and runs contiguously: what a bulk prefetch of it needs."""
    row_stride_bytes = weight.stride(0) * weight.element_size()
    return weight.stride(1) == 1 and weight.data_ptr() % 16 == 0 and row_stride_bytes % 16 == 0


def next_rows_bytes(weight: Optional[torch.Tensor], budget: int) -> int:
    """Bytes at the start of each row of `weight` prefetched by the kernel before it (NEXT_ROWS_BUDGET): the most
    that fits `budget`, at most half a row, a power of two and at least 256 (else 0: none)."""
    if weight is None:
        return 0
    share = min(max(budget, 0) // weight.shape[0], weight.shape[1] * weight.element_size() // 2)
    return _row_start_bytes(weight, 1 << (share.bit_length() - 1)) if share >= 256 else 0


def prefetch_bytes(weight: torch.Tensor, block_n: int) -> int:
    """Bytes at the start of its weight tile (block_n rows; gate and up tiles alike when gated) that each program
    prefetches into L2 before its PDL wait: the whole tile where the whole weight fits in L2_PREFETCH_BUDGET, else
    none (H100: prefetching part of Llama-3.2-1B's 34-67 MB gate/up, down and LM head tiles made its decode steps
    7-15% slower, while SmolLM2-135M's small layers, prefetched whole, gained 5-6%). 0 (none) also where the
    weight's rows are not one contiguous, 16-byte aligned run (what a bulk prefetch needs). (Whether a launch
    prefetches at all: pdl.prefetches.)"""
    row_bytes = weight.shape[1] * weight.element_size()
    if not weight.is_contiguous() or not _rows_bulk_aligned(weight) or weight.shape[0] * row_bytes > L2_PREFETCH_BUDGET:
        return 0
    return block_n * row_bytes


def _check(x, norm_weight, weight, bias, residual, gated) -> None:
    check_dim("x", x, 2)
    check_dim("weight", weight, 2)
    check_last_contiguous("x", x)
    check_last_contiguous("weight", weight)
    m, k = x.shape
    if m > MAX_M:
        raise ValueError(f"fused_norm_linear handles at most {MAX_M} rows, got {m}: run the norm and F.linear")
    g_dtype = weight.dtype if norm_weight is None else norm_weight.dtype
    x_ok = x.dtype == weight.dtype or (x.dtype == torch.float32 and residual is not None)  # fused_mlp's output
    if weight.dtype not in DTYPES or not x_ok or g_dtype != weight.dtype:
        raise TypeError(f"fused_norm_linear takes bfloat16/float16 x, weight and norm_weight of one dtype (x may be "
                        f"float32 with a residual), got {x.dtype}, {weight.dtype} and {g_dtype}")
    if weight.shape[1] != k:
        raise ValueError(f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}: expected [N, {k}]")
    if norm_weight is not None:
        check_shape("norm_weight", norm_weight, (k,))
    if residual is not None:
        check_shape("residual", residual, (m, k))
        check_last_contiguous("residual", residual)
        if residual.dtype != weight.dtype:
            raise TypeError(f"residual must have the weight's dtype {weight.dtype}, got {residual.dtype}")
    if gated:
        if weight.shape[0] % 2:
            raise ValueError(f"a gated weight stacks gate and up rows: its row count must be even, got "
                             f"{weight.shape[0]}")
        if bias is not None:
            raise ValueError("a gated fused_norm_linear takes no bias")
    elif bias is not None:
        check_shape("bias", bias, (weight.shape[0],))


def fused_norm_linear_reference(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                                bias: Optional[torch.Tensor] = None, *, residual: Optional[torch.Tensor] = None,
                                gated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's ops one by one (layers.RMSNorm, layers.Linear, layers.silu_and_mul)."""
    from photoninfer.model.layers import rms_norm, silu_and_mul

    h = x if residual is None else x + residual
    y = torch.nn.functional.linear(rms_norm(h, norm_weight, eps), weight, bias)
    return (silu_and_mul(y) if gated else y), h
