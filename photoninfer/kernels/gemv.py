"""Split-K matmul for a few rows (decode): y = x @ W^T with M <= 16 (Triton).

Torch reference: `torch.nn.functional.linear(x, weight, bias)` (what `layers.Linear` runs).

At decode batch sizes a linear layer is a pass over its weight: time = bytes of W / memory bandwidth,
if enough loads are in flight. cuBLAS reaches ~2.16 TB/s on the H100 here; the aim is >= 2.6 TB/s. So
the grid is (ceil(N / BLOCK_N), SPLIT_K): each program streams a BLOCK_N x (K / SPLIT_K) slab of W
(rows contiguous along K, so loads coalesce) in BLOCK_K steps and multiplies it with the matching slice
of x, padded to 16 rows for tl.dot (the tensor cores idle either way; tl.dot is what Triton's software
pipeliner prefetches for, num_stages deep). SPLIT_K > 1 writes float32 partials [SPLIT_K, M, N] and a
second small kernel sums them in a fixed order (deterministic, so CUDA-graph replays equal eager runs);
SPLIT_K == 1 writes y directly.

Tile choices (to be confirmed per shape on the H100 with scripts/bench_kernels.py, which sweeps them):
- BLOCK_K = 128..256 bf16 elements: 256-512 contiguous bytes per weight row per step, whole sectors.
- BLOCK_N = 32..128 rows: small enough that ceil(N / BLOCK_N) * SPLIT_K covers the 132 SMs several
  times over for the narrow matrices (N = 2048), large enough to amortize x's reload.
- SPLIT_K: raise it until programs >= ~4 per SM; the partials cost 4 * SPLIT_K * M * N bytes, negligible
  next to W for M <= 16. `default_config` encodes this rule.
- num_stages 3-4, num_warps 4: several tiles in flight per SM, which is what bandwidth needs.

`GemvConfig(fma=True)` (M <= 4) multiplies on CUDA cores instead of a tl.dot padded to 16 rows. Neither
kernel is wired into the model: timed inside CUDA graphs over cold weights (scripts/bench_gemv.py) they beat
cuBLAS only on some shapes, and a start-up choice per shape made whole decode steps slower
(docs/benchmarks.md). What decode steps run instead of cuBLAS on Hopper is `norm_linear.decode_linear`
(no split-K, long K steps, launched with PDL); this file stays as the split-K and FMA study.

Shapes: x [M, K] (last dim contiguous), weight [N, K] contiguous, optional bias [N]; y [M, N] in x's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from photoninfer.kernels import interpreting
from photoninfer.kernels._checks import check_dim, check_last_contiguous, check_power_of_two, check_shape

MAX_M = 16
FMA_MAX_M = 4  # the FMA kernel holds a [M, BLOCK_N, BLOCK_K] product per step: small M only
H100_SMS = 132


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    fma: bool = False  # CUDA-core multiply-adds instead of tl.dot (M <= FMA_MAX_M): no 16-row padding


def default_config(n: int, k: int, num_sms: int = H100_SMS) -> GemvConfig:
    """Tiles by the rule in the module docstring: split K until ~4 programs per SM, keeping at least two
    BLOCK_K steps per program (something to pipeline) and every split a whole number of steps."""
    block_n, block_k = 64, 128
    n_tiles = triton.cdiv(n, block_n)
    split_k = 1
    while n_tiles * split_k < 4 * num_sms and k % (block_k * split_k * 4) == 0:
        split_k *= 2
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split_k)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, part_ptr,
    M, N, K, k_per_split,
    x_sm, w_sn, y_sm, part_ss, part_sm,
    HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, FMA: tl.constexpr,
):
    """With FMA (M <= 4), each step multiplies the [BLOCK_N, BLOCK_K] weight tile with the M rows of x on CUDA
    cores and sums along K, instead of a tl.dot padded to 16 rows."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows_m = tl.arange(0, BLOCK_M)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rows_m < M
    n_mask = rows_n < N
    k_begin = split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_mask = cols < k_end
        x = tl.load(x_ptr + rows_m[:, None] * x_sm + cols[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + rows_n[:, None].to(tl.int64) * w_sn + cols[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if FMA:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        elif UPCAST:  # interpreter only: it would multiply bfloat16 bit patterns
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    out_mask = m_mask[:, None] & n_mask[None, :]
    if DIRECT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows_m[:, None] * y_sm + rows_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(part_ptr + split * part_ss + rows_m[:, None] * part_sm + rows_n[None, :], acc, mask=out_mask)


@triton.jit
def _gemv_reduce_kernel(part_ptr, bias_ptr, y_ptr, N, part_ss, part_sm, y_sm,
                        SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros([BLOCK], tl.float32)
    for split in tl.static_range(SPLIT_K):  # fixed order: the same sum on every run
        acc += tl.load(part_ptr + split * part_ss + m * part_sm + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * y_sm + cols, acc.to(y_ptr.dtype.element_ty), mask=mask)


def small_m_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                   config: Optional[GemvConfig] = None, out: Optional[torch.Tensor] = None,
                   workspace: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias) -> [M, N] in x's dtype, for M <= 16 and bf16/fp16 weights.

    `workspace` (float32, at least split_k * M * N elements) holds the split-K partials; pass one
    preallocated for CUDA graphs, else it is allocated per call.
    """
    check_dim("x", x, 2)
    check_dim("weight", weight, 2)
    check_last_contiguous("x", x)
    check_last_contiguous("weight", weight)
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_M:
        raise ValueError(f"small_m_linear handles at most {MAX_M} rows, got {m}: use F.linear")
    if weight.shape[1] != k:
        raise ValueError(f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}: expected [N, {k}]")
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        raise TypeError(f"small_m_linear takes bfloat16/float16 x and weight of one dtype, got {x.dtype} and "
                        f"{weight.dtype}")
    if bias is not None:
        check_shape("bias", bias, (n,))
    config = config or default_config(n, k)
    check_power_of_two("block_n", config.block_n, 4 if config.fma else 16, 1024)
    check_power_of_two("block_k", config.block_k, 16, 4096)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    check_shape("out", out, (m, n))
    check_last_contiguous("out", out)
    if m == 0 or n == 0:
        return out
    split_k = max(1, min(config.split_k, triton.cdiv(k, config.block_k)))
    # each split covers a whole number of BLOCK_K tiles
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), config.block_k) * config.block_k
    direct = split_k == 1
    if direct:
        partials = out  # unused
        part_ss = part_sm = 0
    else:
        if workspace is None:
            workspace = torch.empty(split_k * m * n, dtype=torch.float32, device=x.device)
        if workspace.dtype != torch.float32 or workspace.numel() < split_k * m * n:
            raise ValueError(f"workspace must be float32 with >= {split_k * m * n} elements")
        partials = workspace
        part_ss, part_sm = m * n, n
    bias_arg = bias if bias is not None else out
    grid = (triton.cdiv(n, config.block_n), split_k)
    if config.fma and m > FMA_MAX_M:
        raise ValueError(f"the FMA kernel handles at most {FMA_MAX_M} rows, got {m}")
    _gemv_kernel[grid](
        x, weight, bias_arg, out, partials, m, n, k, k_per_split,
        x.stride(0), weight.stride(0), out.stride(0), part_ss, part_sm,
        HAS_BIAS=bias is not None, DIRECT=direct, BLOCK_M=triton.next_power_of_2(m) if config.fma else MAX_M,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, UPCAST=interpreting(), FMA=config.fma,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if not direct:
        block = min(1024, triton.next_power_of_2(n))
        _gemv_reduce_kernel[(m, triton.cdiv(n, block))](
            partials, bias_arg, out, n, part_ss, part_sm, out.stride(0),
            SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4,
        )
    return out
