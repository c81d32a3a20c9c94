"""Row-wise arg-max of the logits: greedy sampling (Triton).

Torch reference: `torch.argmax(logits, dim=-1)`, the first index of the largest value of each row. It is
the same on the model-dtype logits as on their float32 copy (widening is exact and keeps the order), so a
greedy step needs no float32 logits at all.

torch runs one thread block per row: at batch 1 that is one SM reading the whole vocabulary (28 us for
Llama-3's 128256 logits on an H100). Here grid (rows, chunks): each program finds the best of `CHUNK`
columns, then a second kernel, grid (rows,), picks the best chunk, earliest on ties, so ties resolve to
the first index as in torch. NaN logits are not handled (a NaN row has no meaningful greedy token).

Shapes: logits [S, V] (last dim contiguous) -> out [S] int64.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from photoninfer.kernels._checks import check_dim, check_float, check_last_contiguous, check_shape
from photoninfer.kernels.pdl import begin as pdl_begin, end as pdl_end, use_pdl

CHUNK = 4096  # columns per first-stage program: Llama-3's vocabulary -> 32 programs per row
BLOCK = 1024  # columns loaded at a time


@triton.jit
def _chunk_argmax_kernel(x_ptr, best_val_ptr, best_idx_ptr, vocab, x_stride, num_chunks,
                         CHUNK: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_at = tl.full([BLOCK], 2**31 - 1, tl.int32)
    for start in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, vocab), BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * x_stride + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        better = x > best  # strictly: an earlier column keeps a tie
        best_at = tl.where(better, cols, best_at)
        best = tl.where(better, x, best)
    pdl_end(PDL)
    value = tl.max(best, 0)
    index = tl.min(tl.where(best == value, best_at, 2**31 - 1), 0)
    tl.store(best_val_ptr + row * num_chunks + chunk, value)
    tl.store(best_idx_ptr + row * num_chunks + chunk, index)


@triton.jit
def _pick_chunk_kernel(best_val_ptr, best_idx_ptr, out_ptr, num_chunks, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    mask = c < num_chunks
    values = tl.load(best_val_ptr + row * num_chunks + c, mask=mask, other=float("-inf"))
    indices = tl.load(best_idx_ptr + row * num_chunks + c, mask=mask, other=2**31 - 1)
    pdl_end(PDL)
    value = tl.max(values, 0)
    index = tl.min(tl.where(values == value, indices, 2**31 - 1), 0)
    # a row of -inf only names column 0, as torch does
    tl.store(out_ptr + row, tl.where(value > float("-inf"), index, 0).to(tl.int64))


def argmax_rows(logits: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """First index of each row's maximum: [S, V] float logits -> [S] int64 (`out` may be preallocated)."""
    check_dim("logits", logits, 2)
    check_float("logits", logits)
    check_last_contiguous("logits", logits)
    rows, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits have no columns: no arg-max")
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    check_shape("out", out, (rows,))
    if out.dtype != torch.int64:
        raise TypeError(f"out must be int64, got {out.dtype}")
    if rows == 0:
        return out
    num_chunks = triton.cdiv(vocab, CHUNK)
    pdl = use_pdl(logits.device, rows)
    best_val = torch.empty((rows, num_chunks), dtype=torch.float32, device=logits.device)
    best_idx = torch.empty((rows, num_chunks), dtype=torch.int32, device=logits.device)
    block = min(BLOCK, triton.next_power_of_2(vocab))
    _chunk_argmax_kernel[(rows, num_chunks)](logits, best_val, best_idx, vocab, logits.stride(0), num_chunks,
                                             CHUNK=CHUNK, BLOCK=block, PDL=pdl, num_warps=4, launch_pdl=pdl > 0)
    _pick_chunk_kernel[(rows,)](best_val, best_idx, out, num_chunks,
                                BLOCK_C=max(2, triton.next_power_of_2(num_chunks)), PDL=pdl, num_warps=1,
                                launch_pdl=pdl > 0)
    return out
