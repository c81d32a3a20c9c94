"""Attention over the paged KV cache: split-K decode and varlen causal prefill (Triton).

Torch reference: `photoninfer.runner.attention.TorchPagedAttention` (`_decode` for one query per
sequence, `_prefill` for several), which reads the same cache layout.

Layouts. k_cache, v_cache: [num_blocks, block_size, Hkv, D] (last dim contiguous); token t of sequence i
is at block block_tables[i, t // block_size], offset t % block_size. block_tables: [S, max_blocks] int32.
seq_lens: [S] int32, context length after this step. Hq is a multiple of Hkv (GQA); D a power of two.
The cache holds q's dtype or FP8 (float8_e4m3fn, kv_cache_dtype="fp8"): tiles are widened to q's dtype
as they are loaded, as the reference widens what it gathers; the decode kernel widens FP8 to float16 instead
(and multiplies in float16, finer than bf16) when q is 16-bit: the conversion to bf16 took ~40% more
registers per thread, which cut the resident programs and left the kernel latency-bound (ncu on an H100).
Math in float32 with an online softmax in base 2 (scores pre-multiplied by scale * log2(e)); the
probabilities are rounded to q's dtype before the P.V product, as the reference rounds them.

Decode ("flash-decoding"): grid (B, Hkv, P). Program (b, h, p) takes the whole group of query heads that
share kv head h (one K/V tile load serves the group; the group is padded to 16 rows for tl.dot) over the
p-th span of sequence b's context and writes a partial result with its running max and sum; the last
program of (b, h) to finish (an atomic counter in the workspace says which) merges the partials, so a
decode is one launch. A span is a whole number of partitions (`partition_size`
tokens): one partition while the context has no more partitions than P, more beyond. P =
min(ceil(max_seq_len_hint / partition), cap) where the cap is max_num_partitions, or by default what
fills the GPU for this batch (DECODE_TARGET_PROGRAMS / (B * Hkv)); it depends only on the call's
arguments, so a CUDA graph (hint = max_model_len) replays one grid. Programs past a sequence's length do
nothing. A program that holds a whole context (P == 1, or a context of one span) writes the output
directly, with no partials. Given the step's unrotated q, k, v (`NewTokens`), the kernel also does the
RoPE kernel's work (saving a launch per layer): every program rotates its q heads, and the program whose
span ends the context rotates k and stores K/V into the cache. Where it `preloads` (small batches, heads up to 64
wide) that program takes the context's last token from its registers, so no tile a program reads holds anything
the kernel before this one writes, and each program loads its first tile before its PDL wait, while q/k/v still
run; otherwise the tiles are loaded after the wait (and a barrier) as they are. For a lone sequence
(pdl.prefetches) the kv-head-0 programs first ask L2 for their span's cache blocks, before the PDL wait.

Prefill: grid (S, ceil(max_query_len / BLOCK_M), Hq). Program (i, m, h) takes query rows
[m * BLOCK_M, (m + 1) * BLOCK_M) of sequence i (positions seq_len - q_len + row) against keys
0..last row's position in BLOCK_N tiles, masking by absolute position. Programs past q_len do nothing.

Rows that see no key (seq_len 0: CUDA-graph padding) get zeros, never NaN, and read nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from photoninfer.kernels import interpreting
from photoninfer.kernels._checks import (check_cache_dtype, check_dim, check_dtype, check_float,
                                         check_last_contiguous, check_power_of_two, check_shape)
from photoninfer.kernels.pdl import begin as pdl_begin, end as pdl_end, prefetch_l2, prefetches, use_pdl
from photoninfer.kernels.rope import rms_normed

LOG2E = 1.4426950408889634
# Tokens per decode program (a multiple of the key tile); a long context spans several. Short partitions pay
# at small batches, where a program's time is a chain of dependent loads (the step's K/V write, the block
# table, the tiles) rather than bandwidth: on an H100 at 1 / 16 sequences of 100..356 tokens, 64 took
# Llama-3.2-1B 7.4 -> 5.9 / 11.8 -> 9.9 us a layer, SmolLM2 7.3 -> 5.6 / 10.7 -> 8.1, Qwen3-0.6B
# 11.3 -> 7.8 / 17.2 -> 14.9 against 256 (scripts/bench_decode_attention.py; 32 and 128 in between). Batches
# that fill the GPU run one program per (sequence, kv head) whatever the partition.
DEFAULT_PARTITION = 64
# Decode programs worth launching (~8 per H100 SM): beyond that, splitting the context further only adds
# partials to write and merge. At batch 256 x 8 kv heads the batch alone fills the card, and P = 1.
DECODE_TARGET_PROGRAMS = 1024
# FP8 caches: from this many (sequence, kv head) programs on, decode programs take 128-key tiles (decode_tiles)
FP8_WIDE_TILES_MIN_PROGRAMS = 512
# Decode with the step's new tokens (NewTokens), up to PRELOAD_MAX_ROWS sequences (the PDL launches, where it was
# measured) and heads up to PRELOAD_MAX_HEAD_DIM wide: each program loads the first K/V tile of its span before its PDL
# wait, with the step's inputs (seq_lens, block table, positions, slots), and takes the new token's K/V from its
# registers rather than from the cache it writes them to (no barrier, no reload). H100
# decode graphs (scripts/decode_graph_ab.py, twice each in one process): Llama-3.2-1B at 1 / 4 / 16 rows 1,077-1,080 ->
# 1,075-1,079 / 1,163 -> 1,127-1,137 / 1,260 -> 1,219-1,229 us a step, SmolLM2-135M at 1 / 16 rows 580 -> 567-571 /
# 750 -> 693-720. Qwen3-0.6B's 128-wide heads hold twice the registers waiting: at 16 rows 1,373 -> 1,506 us, so they
# load after the wait.
PRELOAD_FIRST_TILE = True
PRELOAD_MAX_HEAD_DIM = 64
PRELOAD_MAX_ROWS = 16
DEFAULT_BLOCK_N = 64  # keys per tile (prefill; decode picks its own: decode_tiles)
DEFAULT_BLOCK_M = 64  # query rows per prefill program
# a prefill of up to SHORT_PREFILL_ROWS query rows a sequence and no tile map (a lone prompt's graph) is latency-bound:
# more programs of fewer rows, each taking 128 keys a tile (Llama-3.2-1B's 128-token prefill graph on an H100:
# 1,633 -> 1,564 us a step; 32 x 128: 1,582; 16 x 256: 1,580; docs/benchmarks.md, fourteenth session). Only where
# a key tile stays within SHORT_PREFILL_TILE_BYTES (measured: 64-wide bf16 heads; wider ones keep the default)
SHORT_PREFILL_ROWS = 128
SHORT_PREFILL_BLOCK_M = 16
SHORT_PREFILL_BLOCK_N = 128
SHORT_PREFILL_TILE_BYTES = 16 << 10
MIN_DOT = 16  # tl.dot needs every dimension >= 16 on the GPU


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b in float32 ("ieee" keeps float32 operands exact: Triton would otherwise use tf32)."""
    if UPCAST:  # interpreter only: it would multiply bfloat16 bit patterns
        result = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    else:
        result = tl.dot(a, b, acc, input_precision=PRECISION)
    return result


@triton.jit
def _online_softmax_step(s, m_i, l_i, acc, v, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one tile of scores s [R, N] (log2 domain, -inf where masked) and its values v [N, D] into the
    running max m_i, sum l_i and output acc. A row with no visible key yet keeps m = -inf and adds nothing."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attend_tile(q, k, v, toks, valid, new_tok, k_new, v_new, m_i, l_i, acc, qk_scale, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr):
    """One decode tile: k, v [N, D] as stored in the cache for tokens `toks` (those not `valid` masked), token
    `new_tok` (-1: none) taken from k_new, v_new [D] instead (this step's, written by this program), folded into
    the running softmax."""
    is_new = (toks == new_tok)[:, None]
    k = tl.where(is_new, k_new.to(q.dtype)[None, :], k.to(q.dtype))
    v = tl.where(is_new, v_new.to(q.dtype)[None, :], v.to(q.dtype))
    s = _dot(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], tl.float32), UPCAST, PRECISION) * qk_scale
    s = tl.where(valid[None, :], s, float("-inf"))
    return _online_softmax_step(s, m_i, l_i, acc, v, UPCAST, PRECISION)


@triton.jit
def _normalized(acc, l_i):
    """The attention output of each row: acc / l, zeros for a row that saw no key."""
    return tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)


@triton.jit
def _load_kv_tile(cache_ptr, block_table_row, toks, valid, kv_head, block_size, s_block, s_offset, s_head,
                  HEAD_DIM: tl.constexpr):
    """[BLOCK_N, D] tile of the cache for tokens `toks` of one sequence (rows not `valid` read as 0)."""
    blocks = tl.load(block_table_row + toks // block_size, mask=valid, other=0).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    ptrs = cache_ptr + blocks[:, None] * s_block + (toks % block_size)[:, None] * s_offset \
        + kv_head * s_head + d[None, :]
    return tl.load(ptrs, mask=valid[:, None], other=0.0)


@triton.jit
def _program_span(seq_len, split, num_splits, PARTITION: tl.constexpr):
    """(span, start, end): the tokens each of a sequence's `num_splits` programs covers (whole partitions, as
    few as spread the context over all of them, at least one: a short context leaves the later programs
    idle), and program `split`'s share of them, start..end (empty past the context)."""
    span = tl.maximum(tl.cdiv(tl.cdiv(seq_len, PARTITION), num_splits), 1) * PARTITION
    start = split * span
    return span, start, tl.minimum(start + span, seq_len)


@triton.jit
def _rotated(rows, d, cos, sin, mask, norm_ptr, eps, HEAD_DIM: tl.constexpr, QK_NORM: tl.constexpr):
    """Rotary embedding of the head rows at `rows` (columns d), rounded to the stored dtype as the RoPE
    kernel rounds it: [x1*cos - x2*sin, x2*cos + x1*sin], with the sign in the first half of `sin`.
    With QK_NORM (Qwen3) each head row is RMS-normalized by the weight at `norm_ptr` first, rounded as
    layers.RMSNorm rounds it (normalized, rounded, times the weight, rounded)."""
    swapped_d = (d + HEAD_DIM // 2) % HEAD_DIM
    x = tl.load(rows + d, mask=mask, other=0.0)
    swapped = tl.load(rows + swapped_d, mask=mask, other=0.0)  # [x2, x1]
    if QK_NORM:
        x32 = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x32 * x32, axis=-1, keep_dims=True) / HEAD_DIM + eps)  # per head row
        x = rms_normed(x32, rstd, tl.load(norm_ptr + d), x.dtype)
        swapped = rms_normed(swapped.to(tl.float32), rstd, tl.load(norm_ptr + swapped_d), x.dtype)
    return (x.to(tl.float32) * cos + swapped.to(tl.float32) * sin).to(x.dtype)


@triton.jit
def _prefetch_span(k_cache_ptr, v_cache_ptr, block_table_row, seq_len, split, num_splits, block_size, kc_sb, vc_sb,
                   PARTITION: tl.constexpr):
    """Asks L2 for the cache blocks (every kv head's K and V: one contiguous run each) of program `split`'s span
    of the context. Before the PDL wait: the block table and seq_lens come from the step's input copy, which
    every kernel that can still be running (the one before this) started after, so they are in place."""
    _, start, end = _program_span(seq_len, split, num_splits, PARTITION)
    k_bytes = kc_sb * (k_cache_ptr.dtype.element_ty.primitive_bitwidth // 8)
    v_bytes = vc_sb * (v_cache_ptr.dtype.element_ty.primitive_bitwidth // 8)
    for b in range(start // block_size, tl.cdiv(end, block_size)):
        block = tl.load(block_table_row + b).to(tl.int64)
        prefetch_l2(k_cache_ptr + block * kc_sb, k_bytes)
        prefetch_l2(v_cache_ptr + block * vc_sb, v_bytes)


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr,
    part_out_ptr, part_max_ptr, part_sum_ptr, done_ptr,
    k_new_ptr, v_new_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, q_norm_ptr, k_norm_ptr, norm_eps,
    qk_scale, group, block_size, num_splits,
    q_sb, q_sh, o_sb, o_sh,
    kc_sb, kc_so, kc_sh, vc_sb, vc_so, vc_sh, bt_stride,
    po_sb, po_sh, po_sp, pm_sb, pm_sh, done_sb,
    kn_sb, kn_sh, vn_sb, vn_sh, cos_stride, sin_stride,
    HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, PARTITION: tl.constexpr,
    DIRECT: tl.constexpr, ROPE: tl.constexpr, QK_NORM: tl.constexpr, DOT_F16: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr, PRELOAD: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if PREFETCH:
        if kv_head == 0:
            _prefetch_span(k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * bt_stride, tl.load(seq_lens_ptr + seq),
                           split, num_splits, block_size, kc_sb, vc_sb, PARTITION)
    g = tl.arange(0, BLOCK_G)
    heads = kv_head * group + g
    g_mask = g < group
    d = tl.arange(0, HEAD_DIM)
    q_rows = q_ptr + seq * q_sb + heads[:, None] * q_sh
    block_table_row = block_tables_ptr + seq * bt_stride
    if PRELOAD:  # before the wait: the step's inputs and the span's first tile of earlier tokens (see the docstring)
        seq_len = tl.load(seq_lens_ptr + seq)
        span, start, end = _program_span(seq_len, split, num_splits, PARTITION)
        first_toks = start + tl.arange(0, BLOCK_N)
        first_valid = first_toks < end
        first_k = _load_kv_tile(k_cache_ptr, block_table_row, first_toks, first_valid, kv_head, block_size, kc_sb,
                                kc_so, kc_sh, HEAD_DIM)
        first_v = _load_kv_tile(v_cache_ptr, block_table_row, first_toks, first_valid, kv_head, block_size, vc_sb,
                                vc_so, vc_sh, HEAD_DIM)
    if ROPE:  # positions, slots and the rotary tables are step inputs too
        pos = tl.load(pos_ptr + seq).to(tl.int64)
        cos = tl.load(cos_ptr + pos * cos_stride + d % (HEAD_DIM // 2))
        sin = tl.load(sin_ptr + pos * sin_stride + d % (HEAD_DIM // 2)) * tl.where(d < HEAD_DIM // 2, -1.0, 1.0)
        slot = tl.load(slot_ptr + seq)
    pdl_begin(PDL)
    if not PRELOAD:
        seq_len = tl.load(seq_lens_ptr + seq)
        span, start, end = _program_span(seq_len, split, num_splits, PARTITION)

    new_tok = -1  # the context's last token, whose K/V this program holds in registers (ROPE), else none
    k_new = tl.zeros([HEAD_DIM], q_ptr.dtype.element_ty)  # as the cache holds them, in q's dtype
    v_new = tl.zeros([HEAD_DIM], q_ptr.dtype.element_ty)
    if ROPE:  # q and the new k arrive unrotated; this step's K/V are written here, not by the RoPE kernel
        q = _rotated(q_rows, d[None, :], cos[None, :], sin[None, :], g_mask[:, None], q_norm_ptr, norm_eps, HEAD_DIM,
                     QK_NORM)
        if (start < seq_len) & (seq_len <= start + span) & (slot >= 0):  # this program's span ends the context
            k = _rotated(k_new_ptr + seq * kn_sb + kv_head * kn_sh, d, cos, sin, d < HEAD_DIM, k_norm_ptr, norm_eps,
                         HEAD_DIM, QK_NORM).to(k_cache_ptr.dtype.element_ty)
            v = tl.load(v_new_ptr + seq * vn_sb + kv_head * vn_sh + d).to(v_cache_ptr.dtype.element_ty)
            block, offset = slot // block_size, slot % block_size
            tl.store(k_cache_ptr + block * kc_sb + offset * kc_so + kv_head * kc_sh + d, k)
            tl.store(v_cache_ptr + block * vc_sb + offset * vc_so + kv_head * vc_sh + d, v)
            k_new, v_new, new_tok = k.to(k_new.dtype), v.to(v_new.dtype), seq_len - 1
        if not PRELOAD:
            tl.debug_barrier()  # the block's threads see the new K/V before they load the tiles holding it
            new_tok = -1
    else:
        q = tl.load(q_rows + d[None, :], mask=g_mask[:, None], other=0.0)
    if DOT_F16:  # FP8 K/V widen to float16 in one instruction (to bf16 in several, with twice the registers)
        q = q.to(tl.float16)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    loop_start = start
    if PRELOAD:
        m_i, l_i, acc = _attend_tile(q, first_k, first_v, first_toks, first_valid, new_tok, k_new, v_new, m_i, l_i,
                                     acc, qk_scale, UPCAST, PRECISION)
        loop_start = start + BLOCK_N
    for n0 in range(loop_start, end, BLOCK_N):  # every tile holds at least one valid key
        toks = n0 + tl.arange(0, BLOCK_N)
        valid = toks < end
        k = _load_kv_tile(k_cache_ptr, block_table_row, toks, valid, kv_head, block_size, kc_sb, kc_so, kc_sh,
                          HEAD_DIM)
        v = _load_kv_tile(v_cache_ptr, block_table_row, toks, valid, kv_head, block_size, vc_sb, vc_so, vc_sh,
                          HEAD_DIM)
        m_i, l_i, acc = _attend_tile(q, k, v, toks, valid, new_tok, k_new, v_new, m_i, l_i, acc, qk_scale, UPCAST,
                                     PRECISION)

    pdl_end(PDL)
    result = _normalized(acc, l_i)
    out_rows = out_ptr + seq * o_sb + heads[:, None] * o_sh + d[None, :]
    num_parts = tl.cdiv(seq_len, span)  # the programs that see part of the context
    if DIRECT or num_parts <= 1:  # one program holds the whole context (or none: zeros for padding)
        if split == 0:
            tl.store(out_rows, result.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    elif start < seq_len:
        parts_out = part_out_ptr + seq * po_sb + heads[:, None] * po_sh + d[None, :]
        parts_max = part_max_ptr + seq * pm_sb + heads * pm_sh
        parts_sum = part_sum_ptr + seq * pm_sb + heads * pm_sh
        tl.store(parts_out + split * po_sp, result, mask=g_mask[:, None])
        tl.store(parts_max + split, m_i, mask=g_mask)
        tl.store(parts_sum + split, l_i, mask=g_mask)
        tl.debug_barrier()  # all of this program's partials are stored before it counts itself done
        done = done_ptr + seq * done_sb + kv_head
        if tl.atomic_add(done, 1, sem="acq_rel", scope="gpu") == num_parts - 1:
            # the last of them merges everyone's partials and re-arms the counter for the next call
            _merge_partials(out_rows, parts_out, parts_max, parts_sum, num_parts, po_sp, g_mask, BLOCK_G, HEAD_DIM)
            tl.atomic_xchg(done, 0, sem="relaxed", scope="gpu")


@triton.jit
def _merge_partials(out_rows, parts_out, parts_max, parts_sum, num_parts, po_sp, g_mask,
                    BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr):
    """out = sum_p w_p * partial_p / sum_p w_p with w_p = sum_p * 2^(max_p - max), per query head of the
    group, in one pass (rescaled as the running max grows). The partials come from other programs: they
    are loaded from L2 (".cg"), past this SM's L1."""
    running_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for p in range(0, num_parts):  # every part saw at least one key: its max is finite
        m = tl.load(parts_max + p, mask=g_mask, other=0.0, cache_modifier=".cg")
        l = tl.load(parts_sum + p, mask=g_mask, other=0.0, cache_modifier=".cg")
        partial = tl.load(parts_out + p * po_sp, mask=g_mask[:, None], other=0.0, cache_modifier=".cg")
        new_max = tl.maximum(running_max, m)
        old_scale = tl.exp2(running_max - new_max)  # 0 at the first part
        weight = l * tl.exp2(m - new_max)
        acc = acc * old_scale[:, None] + weight[:, None] * partial
        total = total * old_scale + weight
        running_max = new_max
    result = tl.where(total[:, None] > 0, acc / tl.maximum(total, 1e-30)[:, None], 0.0)
    tl.store(out_rows, result.to(out_rows.dtype.element_ty), mask=g_mask[:, None])


@dataclass
class DecodeWorkspace:
    """Partial results of split-K decode: out [B, Hq, P, D], max and sum [B, Hq, P], all float32, and
    `done` [B, >= Hkv] int32: how many programs of each (sequence, kv head) have finished, zero between
    calls (the last program of a pair resets it).

    Allocate once for the largest batch and the grid's P (CUDA graphs need stable addresses) and pass it
    to every call; a smaller batch uses its leading rows. Calls that share one must not run concurrently.
    """

    out: torch.Tensor
    max: torch.Tensor
    sum: torch.Tensor
    done: torch.Tensor

    @classmethod
    def allocate(cls, max_batch: int, num_q_heads: int, head_dim: int, max_seq_len: int, device,
                 partition_size: int = DEFAULT_PARTITION,
                 max_num_partitions: Optional[int] = None) -> "DecodeWorkspace":
        """Sized for calls with max_seq_len_hint <= max_seq_len and the same partition_size and cap."""
        parts = decode_splits(max_seq_len, partition_size, max_num_partitions)
        stats = torch.empty((max_batch, num_q_heads, parts), dtype=torch.float32, device=device)
        return cls(torch.empty((max_batch, num_q_heads, parts, head_dim), dtype=torch.float32, device=device),
                   stats, torch.empty_like(stats), torch.zeros((max_batch, num_q_heads), dtype=torch.int32,
                                                               device=device))


@dataclass
class NewTokens:
    """This step's tokens for the decode kernel to rotate and store itself (what `rope.rope_and_cache_kv`
    would do before it): unrotated k and v [B, Hkv, D] (any row/head strides, last dim contiguous), their
    positions [B] and cache slots [B] int64 (-1: not written), the rotary tables cos, sin [max_pos, D/2]
    float32. q is then unrotated too and is left as it is. With q_norm_weight and k_norm_weight [D] (Qwen3's
    q/k-norm, in q's dtype) q and k arrive unnormalized too, and the kernel normalizes each head first."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    slot_mapping: torch.Tensor
    q_norm_weight: Optional[torch.Tensor] = None
    k_norm_weight: Optional[torch.Tensor] = None
    norm_eps: float = 0.0

    def check(self, batch: int, num_kv_heads: int, head_dim: int) -> None:
        for name in ("k", "v"):
            t = getattr(self, name)
            check_float(name, t)
            check_last_contiguous(name, t)
            check_shape(name, t, (batch, num_kv_heads, head_dim))
        for name in ("cos", "sin"):
            t = getattr(self, name)
            check_dim(name, t, 2)
            check_dtype(name, t, (torch.float32,))
            check_last_contiguous(name, t)
            if t.shape[1] != head_dim // 2:
                raise ValueError(f"{name} must be [max_pos, {head_dim // 2}] (head_dim / 2), got {tuple(t.shape)}")
        check_shape("positions", self.positions, (batch,))
        check_dtype("positions", self.positions, (torch.int64, torch.int32))
        check_shape("slot_mapping", self.slot_mapping, (batch,))
        check_dtype("slot_mapping", self.slot_mapping, (torch.int64,))
        if (self.q_norm_weight is None) != (self.k_norm_weight is None):
            raise ValueError("q_norm_weight and k_norm_weight come together (Qwen3's q/k-norm) or not at all")
        if self.q_norm_weight is not None:
            for name in ("q_norm_weight", "k_norm_weight"):
                t = getattr(self, name)
                check_shape(name, t, (head_dim,))
                check_dtype(name, t, (self.k.dtype,))


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    """(block_size, num_kv_heads, head_dim) of a valid cache pair."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_dim(name, t, 4)
        check_cache_dtype(name, t)
        check_last_contiguous(name, t)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    check_power_of_two("head_dim", head_dim, 16, 256)
    return block_size, num_kv_heads, head_dim


def _check_q_out(q: torch.Tensor, out: torch.Tensor, num_kv_heads: int, head_dim: int) -> int:
    """Group size (query heads per kv head) for q and out of shape [rows, Hq, D]."""
    for name, t in (("q", q), ("out", out)):
        check_dim(name, t, 3)
        check_float(name, t)
        check_last_contiguous(name, t)
    check_shape("out", out, tuple(q.shape))
    if q.shape[2] != head_dim:
        raise ValueError(f"q's head_dim {q.shape[2]} differs from the cache's {head_dim}")
    if q.shape[1] % num_kv_heads:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({num_kv_heads})")
    return q.shape[1] // num_kv_heads


def _check_tables(block_tables: torch.Tensor, seq_lens: torch.Tensor, num_seqs: int) -> None:
    check_dim("block_tables", block_tables, 2)
    check_dtype("block_tables", block_tables, (torch.int32,))
    check_last_contiguous("block_tables", block_tables)
    if block_tables.shape[0] < num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {num_seqs} sequences")
    check_shape("seq_lens", seq_lens, (num_seqs,))
    check_dtype("seq_lens", seq_lens, (torch.int32,))


def _whole_blocks(cache: torch.Tensor) -> bool:
    """Whether each cache block is one contiguous, 16-byte aligned run (what the L2 prefetch asks for)."""
    _, block_size, heads, dim = cache.shape
    return (cache[0].is_contiguous() and cache.stride(0) == block_size * heads * dim
            and cache.data_ptr() % 16 == 0 and cache.stride(0) * cache.element_size() % 16 == 0)


def _dot_precision(*dtypes: torch.dtype) -> str:
    """float32 operands multiply exactly ("ieee"); Triton's default for them would be tf32."""
    return "ieee" if torch.float32 in dtypes else "tf32"


def preloads(new_tokens: bool, batch: int, head_dim: int) -> bool:
    """Whether the decode kernel loads each program's first K/V tile before its PDL wait (PRELOAD_FIRST_TILE)."""
    return PRELOAD_FIRST_TILE and new_tokens and batch <= PRELOAD_MAX_ROWS and head_dim <= PRELOAD_MAX_HEAD_DIM


def decode_splits(max_seq_len_hint: int, partition_size: int = DEFAULT_PARTITION,
                  max_num_partitions: Optional[int] = None) -> int:
    """Programs per (sequence, kv head): one per partition of the longest context, at most max_num_partitions."""
    splits = max(1, triton.cdiv(max_seq_len_hint, partition_size))
    return min(splits, max_num_partitions) if max_num_partitions else splits


def default_partition(block_n: int) -> int:
    """The partition size when the caller gives none: DEFAULT_PARTITION, or one key tile where tiles are longer
    (a partition holds whole tiles)."""
    return max(DEFAULT_PARTITION, block_n)


def default_max_partitions(batch: int, num_kv_heads: int) -> int:
    """Cap on P when the caller gives none: enough programs to fill the GPU (DECODE_TARGET_PROGRAMS)."""
    return max(1, triton.cdiv(DECODE_TARGET_PROGRAMS, batch * num_kv_heads))


class DecodeTiles(NamedTuple):
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int
    max_registers: Optional[int] = None  # a cap on registers a thread (Triton's maxnreg); None: the compiler's


def decode_tiles(batch: int, num_kv_heads: int, fp8_cache: bool = False) -> DecodeTiles:
    """Tiles of the decode kernel: 64-key tiles, 4 warps, 2 stages. When the batch alone fills the GPU (one
    program per sequence and kv head), 2 stages instead of 3 leave room for more resident programs: 1-4% faster
    at batch 256 on an H100 and 8-10% on an H200 (scripts/bench_kernels.py, bf16, Llama-3.2-1B and Qwen3-0.6B
    shapes). At 1 and 16 sequences with 64-token partitions 2 stages led in 5 of 6 shapes too
    (scripts/bench_decode_attention.py, H100; Qwen3-0.6B at 1 sequence 7.8 against 8.9 us).

    Over an FP8 cache, from FP8_WIDE_TILES_MIN_PROGRAMS (sequence, kv head) pairs on, programs take 128-key
    tiles over 4 warps with no pipelining, at most 128 registers a thread. H100, Qwen3-0.6B shape
    (scripts/bench_decode_attention.py): at 256 sequences of 100..2048 tokens (the nano-vllm workload's) 351 us a
    layer for 64-key tiles over 2 warps, 277 us for these tiles, 256 us with the register cap; at 64 sequences of
    800..2048 tokens (its tail) 152 us for the default tiles against 95 us. The kernel is latency-bound there
    (ncu at 256 sequences: 168 registers, 3 programs an SM, the schedulers idle 60% of cycles, DRAM at 61% of its
    peak); the cap lets 4 programs share an SM (96 registers: 335 us; 8 warps, capped at 64-96 or not: 292-337 us).
    Loading K/V half a head dimension at a time cut registers too but not time; bf16 caches gained nothing from
    128-key tiles or the cap."""
    if fp8_cache and batch * num_kv_heads >= FP8_WIDE_TILES_MIN_PROGRAMS:
        return DecodeTiles(128, 4, 1, max_registers=128)
    return DecodeTiles(64, 4, 2)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, out: torch.Tensor,
                           max_seq_len_hint: int, *, partition_size: Optional[int] = None,
                           max_num_partitions: Optional[int] = None, workspace: Optional[DecodeWorkspace] = None,
                           block_n: Optional[int] = None, num_warps: Optional[int] = None,
                           num_stages: Optional[int] = None, new_tokens: Optional[NewTokens] = None,
                           max_registers: Optional[int] = None) -> torch.Tensor:
    """One query per sequence: q [B, Hq, D] attends to its sequence's seq_lens[b] cached tokens; writes out.
    With `new_tokens`, q is unrotated: the kernel rotates it and stores the step's rotated K and V itself
    (one launch instead of the RoPE kernel's and its own).

    The grid is (B, Hkv, P) with P = min(ceil(max_seq_len_hint / partition_size), max_num_partitions);
    without a cap, P is capped at what fills the GPU for this batch (`default_max_partitions`), so a
    large batch runs one program per (sequence, kv head) and no reduction. Under CUDA graphs pass
    max_model_len as the hint so P never changes for a captured batch size; in eager mode the batch's
    longest context saves idle programs. The hint only sizes the grid: a longer context is still attended
    whole (each program then covers several partitions). A row with seq_len 0 gets zeros.

    block_n, num_warps, num_stages and max_registers (a cap on registers a thread) default to `decode_tiles`;
    given any of the first three, the cap is only what the caller gives.
    """
    block_size, num_kv_heads, head_dim = _check_cache(k_cache, v_cache)
    group = _check_q_out(q, out, num_kv_heads, head_dim)
    batch = q.shape[0]
    _check_tables(block_tables, seq_lens, batch)
    tiles = decode_tiles(batch, num_kv_heads, k_cache.dtype == torch.float8_e4m3fn)
    if block_n is None and num_warps is None and num_stages is None:  # the default tiles, with their register cap
        max_registers = max_registers or tiles.max_registers
    block_n, num_warps = block_n or tiles.block_n, num_warps or tiles.num_warps
    num_stages = num_stages or tiles.num_stages
    partition_size = partition_size or default_partition(block_n)
    check_power_of_two("block_n", block_n, MIN_DOT, 1024)
    check_power_of_two("partition_size", partition_size, block_n, 1 << 20)
    if new_tokens is not None:
        new_tokens.check(batch, num_kv_heads, head_dim)
    if batch == 0:
        return out
    num_splits = decode_splits(max_seq_len_hint, partition_size,
                               max_num_partitions or default_max_partitions(batch, num_kv_heads))
    direct = num_splits == 1
    if direct:
        ws_out = ws_max = ws_sum = ws_done = out  # unused by the kernel
        po_strides, pm_strides, done_stride = (0, 0, 0), (0, 0), 0
    else:
        if workspace is None:
            workspace = DecodeWorkspace.allocate(batch, q.shape[1], head_dim, num_splits * partition_size, q.device,
                                                 partition_size)
        ws_out, ws_max, ws_sum, ws_done = workspace.out, workspace.max, workspace.sum, workspace.done
        if (ws_out.shape[0] < batch or ws_out.shape[1] != q.shape[1] or ws_out.shape[2] < num_splits
                or ws_out.shape[3] != head_dim or ws_done.shape[0] < batch or ws_done.shape[1] < num_kv_heads):
            raise ValueError(f"decode workspace {tuple(ws_out.shape)} cannot hold [{batch}, {q.shape[1]}, "
                             f"{num_splits}, {head_dim}] partials: allocate it with a larger max_batch/max_seq_len")
        check_dtype("workspace.done", ws_done, (torch.int32,))
        po_strides = ws_out.stride()[:3]
        pm_strides = ws_max.stride()[:2]
        done_stride = ws_done.stride(0)
    block_g = max(MIN_DOT, triton.next_power_of_2(group))
    new = new_tokens or NewTokens(q, q, seq_lens, q, q, seq_lens)  # unused without ROPE
    qk_norm = new.q_norm_weight is not None
    new_strides = ((new.k.stride(0), new.k.stride(1), new.v.stride(0), new.v.stride(1), new.cos.stride(0),
                    new.sin.stride(0)) if new_tokens else (0,) * 6)
    pdl = use_pdl(q.device, batch)
    # a lone sequence's programs ask L2 for their span's cache blocks before the PDL wait (H100, with the
    # linears' prefetch: Llama-3.2-1B 843 -> 860 tok/s, SmolLM2-135M 1,599 -> 1,618; at 16 SmolLM2 lost 22%)
    prefetch = bool(pdl) and prefetches(batch) and _whole_blocks(k_cache) and _whole_blocks(v_cache)
    _paged_decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, ws_out, ws_max, ws_sum, ws_done,
        new.k, new.v, new.positions, new.cos, new.sin, new.slot_mapping,
        new.q_norm_weight if qk_norm else q, new.k_norm_weight if qk_norm else q, new.norm_eps,
        scale * LOG2E, group, block_size, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        *po_strides, *pm_strides, done_stride, *new_strides,
        HEAD_DIM=head_dim, BLOCK_G=block_g, BLOCK_N=block_n, PARTITION=partition_size, DIRECT=direct,
        ROPE=new_tokens is not None, QK_NORM=qk_norm, DOT_F16=k_cache.dtype == torch.float8_e4m3fn and q.dtype != torch.float32,
        UPCAST=interpreting(), PRECISION=_dot_precision(q.dtype, k_cache.dtype), PDL=pdl, PREFETCH=prefetch,
        PRELOAD=preloads(new_tokens is not None, batch, head_dim),
        num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl > 0,
        **({"maxnreg": max_registers} if max_registers else {}),
    )
    return out


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_ptr, seq_lens_ptr, out_ptr, tiles_ptr,
    qk_scale, group, block_size,
    q_st, q_sh, o_st, o_sh,
    kc_sb, kc_so, kc_sh, vc_sb, vc_so, vc_sh, bt_stride,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, TILED: tl.constexpr,
):
    if TILED:  # program (t, h): query tile t of the map (its sequence, or -1 for none, and its row block)
        listed_seq = tl.load(tiles_ptr + 2 * tl.program_id(0))
        seq = tl.maximum(listed_seq, 0).to(tl.int64)
        first_row = tl.load(tiles_ptr + 2 * tl.program_id(0) + 1) * BLOCK_M
        head = tl.program_id(1)
    else:
        seq = tl.program_id(0).to(tl.int64)
        first_row = tl.program_id(1) * BLOCK_M
        head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq).to(tl.int64)
    q_len = (tl.load(query_start_ptr + seq + 1) - q_start).to(tl.int32)
    if TILED:
        q_len = tl.where(listed_seq >= 0, q_len, 0)  # an unlisted tile computes nothing
    if first_row < q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        rows = first_row + tl.arange(0, BLOCK_M)
        row_mask = rows < q_len
        q_pos = seq_len - q_len + rows  # absolute position of each query row
        kv_head = head // group
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + (q_start + rows)[:, None] * q_st + head * q_sh + d[None, :],
                    mask=row_mask[:, None], other=0.0)
        block_table_row = block_tables_ptr + seq * bt_stride

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        kv_end = tl.minimum(seq_len, seq_len - q_len + first_row + BLOCK_M)  # the tile's last position + 1
        for n0 in range(0, kv_end, BLOCK_N):
            toks = n0 + tl.arange(0, BLOCK_N)
            valid = toks < kv_end
            k = _load_kv_tile(k_cache_ptr, block_table_row, toks, valid, kv_head, block_size, kc_sb, kc_so, kc_sh,
                              HEAD_DIM)
            s = _dot(q, tl.trans(k.to(q.dtype)), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST,
                     PRECISION) * qk_scale
            s = tl.where(valid[None, :] & (toks[None, :] <= q_pos[:, None]), s, float("-inf"))
            v = _load_kv_tile(v_cache_ptr, block_table_row, toks, valid, kv_head, block_size, vc_sb, vc_so, vc_sh,
                              HEAD_DIM).to(q.dtype)
            m_i, l_i, acc = _online_softmax_step(s, m_i, l_i, acc, v, UPCAST, PRECISION)

        result = _normalized(acc, l_i)
        tl.store(out_ptr + (q_start + rows)[:, None] * o_st + head * o_sh + d[None, :],
                 result.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def short_prefill_tiles(mapped: bool, max_query_len: int, head_dim: int, cache_itemsize: int) -> bool:
    """Whether a prefill takes the short-prefill tiles: no tile map, queries of at most SHORT_PREFILL_ROWS, and a
    key tile of SHORT_PREFILL_BLOCK_N within SHORT_PREFILL_TILE_BYTES."""
    return (not mapped and max_query_len <= SHORT_PREFILL_ROWS
            and SHORT_PREFILL_BLOCK_N * head_dim * cache_itemsize <= SHORT_PREFILL_TILE_BYTES)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                            scale: float, out: torch.Tensor, max_query_len: int, *,
                            block_m: Optional[int] = None, block_n: Optional[int] = None,
                            num_warps: int = 4, num_stages: int = 2,
                            tiles: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Varlen causal attention: q [T, Hq, D] rows query_start_loc[i]:query_start_loc[i+1] of sequence i
    attend to its cached keys 0..(their position); this step's K/V must already be in the cache.

    max_query_len bounds every sequence's q_len (it sizes the grid). Rows outside
    [query_start_loc[0], query_start_loc[-1]) are not written.

    `tiles` (int32 [N, 2], runner.batch.prefill_tiles with block_m's rows a tile): the grid is (N, Hq) instead, one
    program per (sequence, row block) listed and none for the rest (rows -1): a CUDA graph of many short
    sequences then launches what its steps hold, not sequences x longest query. max_query_len is unused, and
    block_m must be the map's rows a tile.

    block_m and block_n default to SHORT_PREFILL_BLOCK_M x SHORT_PREFILL_BLOCK_N (short_prefill_tiles), else to
    DEFAULT_BLOCK_M x DEFAULT_BLOCK_N.
    """
    short = short_prefill_tiles(tiles is not None, max_query_len, q.shape[-1], k_cache.element_size())
    block_m = block_m or (SHORT_PREFILL_BLOCK_M if short else DEFAULT_BLOCK_M)
    block_n = block_n or (SHORT_PREFILL_BLOCK_N if short else DEFAULT_BLOCK_N)
    block_size, num_kv_heads, head_dim = _check_cache(k_cache, v_cache)
    group = _check_q_out(q, out, num_kv_heads, head_dim)
    check_dim("query_start_loc", query_start_loc, 1)
    check_dtype("query_start_loc", query_start_loc, (torch.int32,))
    num_seqs = query_start_loc.shape[0] - 1
    if num_seqs < 0:
        raise ValueError("query_start_loc must hold num_seqs + 1 offsets, got an empty tensor")
    _check_tables(block_tables, seq_lens, num_seqs)
    check_power_of_two("block_m", block_m, MIN_DOT, 1024)
    check_power_of_two("block_n", block_n, MIN_DOT, 1024)
    if num_seqs == 0 or (max_query_len <= 0 if tiles is None else tiles.shape[0] == 0):
        return out
    if tiles is not None:
        check_dtype("tiles", tiles, (torch.int32,))
        if tiles.dim() != 2 or tiles.shape[1] != 2 or not tiles.is_contiguous():
            raise ValueError(f"tiles must be a contiguous [N, 2] tensor, got {tuple(tiles.shape)}")
        grid = (tiles.shape[0], q.shape[1])
    else:
        grid = (num_seqs, triton.cdiv(max_query_len, block_m), q.shape[1])
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out, tiles if tiles is not None else seq_lens,
        scale * LOG2E, group, block_size,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        UPCAST=interpreting(), PRECISION=_dot_precision(q.dtype, k_cache.dtype), TILED=tiles is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
