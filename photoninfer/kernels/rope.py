"""Rotary embedding of q and k fused with writing k and v into the paged KV cache (Triton).

Torch references: `photoninfer.model.layers.RotaryEmbedding.forward` / `_rotate` (HF "rotate half"
layout: out = [x1*cos - x2*sin, x2*cos + x1*sin] in float32, rounded to the input dtype) followed by
`photoninfer.runner.attention.write_kv` (scatter into the cache by slot mapping).

Shapes: q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D] (any token/head strides, last dim contiguous: they may
be column slices of the fused qkv output [T, Hq*D + 2*Hkv*D]); positions [T] int; cos, sin
[max_pos, D/2] float32 (the RotaryEmbedding tables, llama3 scaling already folded in); k_cache, v_cache
[num_blocks, block_size, Hkv, D] in q's dtype or FP8 (rotated k is rounded to q's dtype first, then to
the cache's, as write_kv rounds it; FP8 saturates at +-448 as torch's conversion does); slot_mapping [T]
int64, -1 = padding row (its K/V are not written).
One program handles one token: all its q heads and k heads, so cos/sin are loaded once per token.

Qwen3's q/k-norm (q_norm_weight, k_norm_weight [D]): each head is RMS-normalized before it is rotated, rounded
as `layers.RMSNorm` rounds it (normalized, rounded, times the weight, rounded), which saves two norm kernels
and the copies of q and k out of the fused qkv output that they needed.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from photoninfer.kernels._checks import (check_cache_dtype, check_dim, check_dtype, check_float, check_last_contiguous,
                                         check_shape)


@triton.jit
def rms_normed(x32, rstd, weight, dtype: tl.constexpr):
    """x32 (float32) times its row's rstd, rounded to dtype, times the norm weight, rounded: how layers.RMSNorm
    rounds Qwen3's q/k-norm (here and in the decode attention kernel)."""
    return ((x32 * rstd).to(dtype).to(tl.float32) * weight.to(tl.float32)).to(dtype)


@triton.jit
def _rotate_heads(ptr, stride_h, num_heads, cos, sin, norm_ptr, eps, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                  QK_NORM: tl.constexpr):
    """Rotates `num_heads` heads starting at ptr in place (RMS-normalizing each by the weight at norm_ptr first,
    with QK_NORM); returns the rotated tile [BLOCK_H, 2*HALF] halves (x1', x2') in the stored dtype so the
    caller can also write them to the cache."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, HALF)[None, :]
    mask = heads < num_heads
    first = ptr + heads * stride_h + cols
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = ptr.dtype.element_ty
    if QK_NORM:  # per head row, over both halves
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1, keep_dims=True) + tl.sum(x2 * x2, axis=1, keep_dims=True))
                        / (2 * HALF) + eps)
        x1 = rms_normed(x1, rstd, tl.load(norm_ptr + cols), dtype).to(tl.float32)
        x2 = rms_normed(x2, rstd, tl.load(norm_ptr + HALF + cols), dtype).to(tl.float32)
    out1 = (x1 * cos - x2 * sin).to(dtype)
    out2 = (x2 * cos + x1 * sin).to(dtype)
    tl.store(first, out1, mask=mask)
    tl.store(first + HALF, out2, mask=mask)
    return out1, out2


@triton.jit
def _rope_and_cache_kv_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, q_norm_ptr, k_norm_ptr,
    norm_eps, num_q_heads, num_kv_heads, block_size,
    q_st, q_sh, k_st, k_sh, v_st, v_sh, cos_stride, sin_stride,
    kc_sb, kc_so, kc_sh, vc_sb, vc_so, vc_sh,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, QK_NORM: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    cols = tl.arange(0, HALF)[None, :]
    cos = tl.load(cos_ptr + pos * cos_stride + cols)
    sin = tl.load(sin_ptr + pos * sin_stride + cols)
    _rotate_heads(q_ptr + token * q_st, q_sh, num_q_heads, cos, sin, q_norm_ptr, norm_eps, HALF, BLOCK_HQ, QK_NORM)
    k1, k2 = _rotate_heads(k_ptr + token * k_st, k_sh, num_kv_heads, cos, sin, k_norm_ptr, norm_eps, HALF,
                           BLOCK_HKV, QK_NORM)

    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        heads = tl.arange(0, BLOCK_HKV)[:, None]
        mask = heads < num_kv_heads
        block = slot // block_size
        offset = slot % block_size
        k_dst = k_cache_ptr + block * kc_sb + offset * kc_so + heads * kc_sh + cols
        cache_dtype = k_cache_ptr.dtype.element_ty
        tl.store(k_dst, k1.to(cache_dtype), mask=mask)
        tl.store(k_dst + HALF, k2.to(cache_dtype), mask=mask)
        v_src = v_ptr + token * v_st + heads * v_sh + cols
        v_dst = v_cache_ptr + block * vc_sb + offset * vc_so + heads * vc_sh + cols
        v1 = tl.load(v_src, mask=mask, other=0.0)
        v2 = tl.load(v_src + HALF, mask=mask, other=0.0)
        tl.store(v_dst, v1.to(v_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_dst + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rope_and_cache_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, q_norm_weight: Optional[torch.Tensor] = None,
                      k_norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 0.0) -> None:
    """Rotates q and k in place and writes the rotated k and v into their cache slots (skips slot -1). With
    q_norm_weight and k_norm_weight (Qwen3), each head of q and k is RMS-normalized first (also in place)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_dim(name, t, 3)
        check_float(name, t)
        check_last_contiguous(name, t)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    check_shape("k", k, (num_tokens, num_kv_heads, head_dim))
    check_shape("v", v, (num_tokens, num_kv_heads, head_dim))
    if head_dim < 2 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two, got {head_dim}")
    half = head_dim // 2
    for name, t in (("cos", cos), ("sin", sin)):
        check_dim(name, t, 2)
        check_dtype(name, t, (torch.float32,))
        check_last_contiguous(name, t)
        if t.shape[1] != half:
            raise ValueError(f"{name} must be [max_pos, {half}] (head_dim / 2), got {tuple(t.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_dim(name, t, 4)
        check_cache_dtype(name, t)
        check_last_contiguous(name, t)
        if tuple(t.shape[2:]) != (num_kv_heads, head_dim):
            raise ValueError(f"{name} must be [num_blocks, block_size, {num_kv_heads}, {head_dim}], "
                             f"got {tuple(t.shape)}")
    check_shape("positions", positions, (num_tokens,))
    check_shape("slot_mapping", slot_mapping, (num_tokens,))
    check_dtype("positions", positions, (torch.int64, torch.int32))
    check_dtype("slot_mapping", slot_mapping, (torch.int64,))
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("q_norm_weight and k_norm_weight come together (Qwen3's q/k-norm) or not at all")
    qk_norm = q_norm_weight is not None
    if qk_norm:
        for name, t in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
            check_shape(name, t, (head_dim,))
            check_dtype(name, t, (q.dtype,))
    if num_tokens == 0:
        return
    _rope_and_cache_kv_kernel[(num_tokens,)](
        q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping,
        q_norm_weight if qk_norm else q, k_norm_weight if qk_norm else q, norm_eps,
        num_q_heads, num_kv_heads, k_cache.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HALF=half, BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HKV=triton.next_power_of_2(num_kv_heads), QK_NORM=qk_norm, num_warps=4,
    )
