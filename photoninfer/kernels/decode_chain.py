"""The linear layers between two attention kernels of a decode step, in one persistent kernel: a layer's o
projection (+ residual), its post-attention norm + gate/up + SiLU·mul, its down projection (+ residual), and
the next layer's input norm + q/k/v.

Torch reference: `decode_chain_reference` below, i.e. the decoder's ops one by one (F.linear, the residual
adds, `layers.rms_norm`, `layers.silu_and_mul`) as `DecoderLayer` runs them.

Why: at one decode row a layer's matmuls are short (Llama-3.2-1B on an H100: o 5.8 us, gate/up 26.7, down
14.9, q/k/v 6.8 + a 2.5 us norm kernel), and each kernel boundary costs ~3 us above the weights' read time:
the last programs' tail, the next kernel's launch and its ramp-up. Here the programs stay resident (one per
SM) and move from one matmul to the next at a grid barrier; before it, each program asks for its next weight
tile into L2 (`pdl.prefetch_l2`), so DRAM keeps streaming while the slowest programs finish.

Phases (M rows, hidden H, intermediate I; h = residual stream, g = norm weights, P = programs):
  0  O    h1 = attn @ Wo^T + r;  stores h1, a1 = h1 * g_post and ss1 = per-program sums of h1^2 over its columns
  1  GU   act = silu(rstd1 * a1 @ Wg^T) * (rstd1 * a1 @ Wu^T),  rstd1 = 1 / sqrt(sum(ss1) / H + eps)
  2  D    h2 = act @ Wd^T + h1;  stores h2 (and, when a next layer follows, a2 = h2 * g_next and ss2)
  3  QKV  qkv = rstd2 * a2 @ Wqkv^T (+ bias)
The norm is a row scale (norm(h) @ W^T = rstd * ((h * g) @ W^T)), so a phase's producer writes h * g
elementwise and its partial sums of squares, and the consumer's main loop is a plain GEMV whose input feeds
tl.dot directly (which Triton's pipeliner prefetches). Rounding as kernels/norm_linear.py: the model dtype
for h, h * g, the outputs (and gate, up, silu); float32 sums scaled by rstd.

Each program takes a contiguous run of ceil(N / P) output columns of each phase, in BLOCK_N-wide tiles. The
barrier between phases (`_grid_barrier`) spins, which is safe only while all P programs are resident: P is at
most one program per SM (the wrapper's default), and the kernel launched after this one (PDL) is scheduled only
once every program here has started. The interpreter runs programs one after another, so there (and with
PHOTONINFER_DECODE_CHAIN=split, for comparison on a GPU) each phase is a launch of its own.

Shapes: attn [M, Q], residual [M, H] (M <= MAX_M, contiguous); Wo [H, Q], g_post [H], Wgu [2I, H] (gate rows
then up rows), Wd [H, I], g_next [H], Wqkv [N, H], bias [N]. bf16/fp16 only (tl.dot rounds float32 to tf32).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from photoninfer.kernels import interpreting
from photoninfer.kernels._checks import check_last_contiguous, check_shape
from photoninfer.kernels.norm_linear import DTYPES, MAX_M, _dot_t
from photoninfer.kernels.pdl import begin as pdl_begin, prefetch_l2, prefetches, use_pdl

MODE_ENV = "PHOTONINFER_DECODE_CHAIN"  # "0": the separate kernels (norm_linear.py); "split": a launch per phase
O, GATE_UP, DOWN, QKV = range(4)
MAX_BLOCK_N = 128  # a phase's tile width: a program's run of columns must fit one tile
TILE_ELEMENTS = 16384  # BLOCK_N x BLOCK_K of one weight tile (32 KB in bf16)
# each program prefetches at most this much of its next phase's weights into L2 before a barrier (all
# programs together: 132 x 128 KB = 17 MB of an H100's 50 MB L2)
PREFETCH_LIMIT = 128 << 10
NUM_STAGES = 3  # the pipeliner's depth in every phase's loop over K
NUM_WARPS = 4
MIN_SPAN = 0  # persistent: at least this many columns a program (fewer programs busy in narrow phases)
SPLIT_PREFETCH_BUDGET = 16 << 20  # as norm_linear.L2_PREFETCH_BUDGET


def enabled() -> bool:
    return os.environ.get(MODE_ENV, "1") != "0"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_programs(device: torch.device) -> int:
    """One program per SM on a GPU; a few (ragged column runs included) in the interpreter."""
    if device.type != "cuda":
        return 3
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def tiles(n: int, k: int, programs: int, gated: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K) of a phase: tiles as wide as a program's run of ceil(n / programs) columns (16 to
    MAX_BLOCK_N), as deep as a 32 KB weight tile allows (a gated tile is two: gate and up rows), up to 512."""
    block_n = max(16, triton.next_power_of_2(triton.cdiv(n, programs)))
    if block_n > MAX_BLOCK_N:
        raise ValueError(f"decode chain: {triton.cdiv(n, programs)} columns a program is more than one tile of "
                         f"{MAX_BLOCK_N}")
    depth = TILE_ELEMENTS // block_n // (2 if gated else 1)
    return block_n, max(16, min(512, depth, triton.next_power_of_2(k))), NUM_STAGES


def split_tiles(n: int, k: int, gated: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, stages) of a phase launched alone: norm_linear.default_config's measured tiles (32
    columns a program; 512-deep K steps four stages deep, gate/up 128 deep, three)."""
    if gated:
        return 32, min(128, max(16, triton.next_power_of_2(k))), 3
    return 32, min(512, max(16, triton.next_power_of_2(k))), 4


@triton.jit
def _grid_barrier(counter_ptr, num_programs):
    """Every program waits here until all `num_programs` have arrived; their stores before it are visible to
    all after it. counter_ptr is an int64 that only grows: each barrier adds num_programs, so the arrival
    count a program gets back names its barrier's end (nothing to reset between launches; 2^63 arrivals are
    centuries of steps). One atomic per program, then polling with acquire loads: two L2 round trips on the
    critical path."""
    tl.debug_barrier()  # this program's stores are issued before thread 0 arrives (release is cumulative)
    arrival = tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    target = (arrival // num_programs + 1) * num_programs
    while _load_acquire(counter_ptr) < target:
        pass


@triton.jit
def _load_acquire(ptr):
    """ptr's int64 value, read with acquire semantics at GPU scope (what other programs stored before their
    release is visible to this thread's loads after it)."""
    return tl.inline_asm_elementwise("ld.acquire.gpu.global.u64 $0, [$1];", "=l,l", [ptr], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _prefetch_run(w_ptr, N, K, span, up_offset, limit, GATED: tl.constexpr):
    """L2 prefetch of (the first `limit` bytes of) this program's run of weight rows (and its up rows)."""
    first = tl.program_id(0) * span
    rows = tl.maximum(tl.minimum(N - first, span), 0)
    nbytes = tl.minimum(rows * K * (w_ptr.dtype.element_ty.primitive_bitwidth // 8), limit) // 16 * 16
    if nbytes > 0:
        start = w_ptr + first.to(tl.int64) * K
        prefetch_l2(start, nbytes)
        if GATED:
            prefetch_l2(start + up_offset, nbytes)


@triton.jit
def _load_partial_sums(ss_ptr, M, ss_count, ss_stride, SS_ROWS: tl.constexpr, BLOCK_P: tl.constexpr):
    """The producer programs' partial sums of h^2, ss [M, ss_count] (rows ss_stride apart), as [SS_ROWS,
    BLOCK_P] (SS_ROWS: 1 for one row, else BLOCK_M; `_rstd` reduces them after the main loop, so that waiting
    for them does not delay its loads)."""
    rows = tl.arange(0, SS_ROWS)
    cols = tl.arange(0, BLOCK_P)
    return tl.load(ss_ptr + rows[:, None] * ss_stride + cols[None, :],
                   mask=(rows < M)[:, None] & (cols < ss_count)[None, :], other=0.0, cache_modifier=".cg")


@triton.jit
def _rstd(partial_sums, K, eps):
    """1 / sqrt(mean(h^2) + eps) per row, as a column [SS_ROWS, 1] that broadcasts over the output tile."""
    return tl.rsqrt(tl.sum(partial_sums, axis=1) / K + eps)[:, None]


@triton.jit
def _gemv(x_ptr, w_rows, up_offset, cols_n, n_mask, rows_m, m_mask, K, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATED: tl.constexpr, UPCAST: tl.constexpr):
    """x [M, K] @ W[cols_n]^T (and @ U[cols_n]^T when GATED) in float32. x feeds tl.dot directly, so the
    pipeliner prefetches it with the weights. (x was written by other programs before the barrier: no SM has
    read it earlier in this kernel, so no stale L1 line can hold it.)"""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_mask = cols < K
        x = tl.load(x_ptr + rows_m[:, None] * K + cols[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = n_mask[:, None] & k_mask[None, :]
        w = tl.load(w_rows + cols[None, :], mask=w_mask, other=0.0)
        acc = _dot_t(x, w, acc, UPCAST)
        if GATED:
            u = tl.load(w_rows + up_offset + cols[None, :], mask=w_mask, other=0.0)
            acc_up = _dot_t(x, u, acc_up, UPCAST)
    return acc, acc_up


@triton.jit
def _residual_phase(x_ptr, w_ptr, res_ptr, h_ptr, g_ptr, a_ptr, ss_ptr, M, N, K, span, ss_stride,
                    WRITE_NORMED: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """h = x @ W^T + res over this program's columns (o, down); with WRITE_NORMED also h * g and the row sums
    of h^2 over those columns (ss[m, program]) for the norm of the phase after."""
    pid = tl.program_id(0)
    dtype = h_ptr.dtype.element_ty
    rows_m = tl.arange(0, BLOCK_M)
    m_mask = rows_m < M
    first = pid * span
    stop = tl.minimum(first + span, N)  # one tile: span <= BLOCK_N (the wrapper's tiles)
    cols_n = first + tl.arange(0, BLOCK_N)
    n_mask = cols_n < stop
    mask = m_mask[:, None] & n_mask[None, :]
    offsets = rows_m[:, None] * N + cols_n[None, :]
    # loaded before the main loop and used only after it: their latency hides behind it
    r = tl.load(res_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
    g = tl.load(g_ptr + cols_n, mask=n_mask, other=0.0)
    acc, _ = _gemv(x_ptr, w_ptr + cols_n[:, None].to(tl.int64) * K, 0, cols_n, n_mask, rows_m, m_mask, K,
                   BLOCK_M, BLOCK_N, BLOCK_K, False, UPCAST)
    h = (acc.to(dtype).to(tl.float32) + r.to(tl.float32)).to(dtype)  # the reference rounds the output, then the sum
    tl.store(h_ptr + offsets, h, mask=mask)
    if WRITE_NORMED:
        h32 = h.to(tl.float32)
        tl.store(a_ptr + offsets, (h32 * g.to(tl.float32)[None, :]).to(dtype), mask=mask)
        tl.store(ss_ptr + rows_m * ss_stride + pid, tl.sum(tl.where(mask, h32 * h32, 0.0), axis=1), mask=m_mask)


@triton.jit
def _normed_phase(a_ptr, ss_ptr, ss_count, ss_stride, eps, w_ptr, bias_ptr, y_ptr, M, N, K, span,
                  HAS_BIAS: tl.constexpr,
                  GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  SS_ROWS: tl.constexpr, BLOCK_P: tl.constexpr, UPCAST: tl.constexpr):
    """y = rstd * (a @ W^T) (+ bias) over this program's columns, a = h * g; GATED: W is [2N, K], gate rows
    then up rows, and y = silu(gate) * up (gate/up)."""
    pid = tl.program_id(0)
    dtype = y_ptr.dtype.element_ty
    rows_m = tl.arange(0, BLOCK_M)
    m_mask = rows_m < M
    partial_sums = _load_partial_sums(ss_ptr, M, ss_count, ss_stride, SS_ROWS, BLOCK_P)
    first = pid * span
    stop = tl.minimum(first + span, N)  # one tile: span <= BLOCK_N (the wrapper's tiles)
    cols_n = first + tl.arange(0, BLOCK_N)
    n_mask = cols_n < stop
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols_n, mask=n_mask, other=0.0)
    acc, acc_up = _gemv(a_ptr, w_ptr + cols_n[:, None].to(tl.int64) * K, N.to(tl.int64) * K, cols_n, n_mask,
                        rows_m, m_mask, K, BLOCK_M, BLOCK_N, BLOCK_K, GATED, UPCAST)
    rstd = _rstd(partial_sums, K, eps)
    mask = m_mask[:, None] & n_mask[None, :]
    offsets = rows_m[:, None] * N + cols_n[None, :]
    if GATED:  # as the reference: gate and up rounded to the dtype, silu rounded, then the product
        gate = (acc * rstd).to(dtype).to(tl.float32)
        up = (acc_up * rstd).to(dtype).to(tl.float32)
        y = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up
    else:
        y = acc * rstd
        if HAS_BIAS:
            y += bias.to(tl.float32)[None, :]
    tl.store(y_ptr + offsets, y.to(dtype), mask=mask)


@triton.jit
def _decode_chain_kernel(
    attn_ptr, res_ptr, wo_ptr, g_post_ptr, wgu_ptr, wd_ptr, g_next_ptr, wqkv_ptr, bias_ptr,
    h1_ptr, a1_ptr, ss1_ptr, act_ptr, h2_ptr, a2_ptr, ss2_ptr, qkv_ptr, barrier_ptr,
    M, H, Q, I, N_QKV, eps_post, eps_next, prefetch_limit,
    span_o, span_gu, span_d, span_qkv, ss1_count, ss2_count, ss_stride,
    FIRST: tl.constexpr, LAST: tl.constexpr, HAS_NEXT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, SS_ROWS: tl.constexpr, BLOCK_P: tl.constexpr,
    BN_O: tl.constexpr, BK_O: tl.constexpr, BN_GU: tl.constexpr, BK_GU: tl.constexpr,
    BN_D: tl.constexpr, BK_D: tl.constexpr, BN_QKV: tl.constexpr, BK_QKV: tl.constexpr,
    UPCAST: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr,
):
    """Phases FIRST..LAST (O, GATE_UP, DOWN, QKV) with a grid barrier between consecutive ones; HAS_NEXT: down
    writes what the next layer's q/k/v phase reads. Each program takes span_* columns of a phase."""
    P = tl.num_programs(0)
    if PREFETCH:  # weights: no earlier kernel writes them, so they may stream in before the PDL wait
        if FIRST == 0:
            _prefetch_run(wo_ptr, H, Q, span_o, 0, prefetch_limit, False)
        elif FIRST == 1:
            _prefetch_run(wgu_ptr, I, H, span_gu, I.to(tl.int64) * H, prefetch_limit, True)
        elif FIRST == 2:
            _prefetch_run(wd_ptr, H, I, span_d, 0, prefetch_limit, False)
        else:
            _prefetch_run(wqkv_ptr, N_QKV, H, span_qkv, 0, prefetch_limit, False)
    pdl_begin(PDL)
    if FIRST <= 0 and LAST >= 0:
        _residual_phase(attn_ptr, wo_ptr, res_ptr, h1_ptr, g_post_ptr, a1_ptr, ss1_ptr, M, H, Q, span_o, ss_stride,
                        True, BLOCK_M, BN_O, BK_O, UPCAST)
        if LAST >= 1:
            if PREFETCH:
                _prefetch_run(wgu_ptr, I, H, span_gu, I.to(tl.int64) * H, prefetch_limit, True)
            _grid_barrier(barrier_ptr, P)
    if FIRST <= 1 and LAST >= 1:
        _normed_phase(a1_ptr, ss1_ptr, ss1_count, ss_stride, eps_post, wgu_ptr, wgu_ptr, act_ptr, M, I, H, span_gu,
                      False, True, BLOCK_M, BN_GU, BK_GU, SS_ROWS, BLOCK_P, UPCAST)
        if LAST >= 2:
            if PREFETCH:
                _prefetch_run(wd_ptr, H, I, span_d, 0, prefetch_limit, False)
            _grid_barrier(barrier_ptr, P)
    if FIRST <= 2 and LAST >= 2:
        _residual_phase(act_ptr, wd_ptr, h1_ptr, h2_ptr, g_next_ptr, a2_ptr, ss2_ptr, M, H, I, span_d, ss_stride,
                        HAS_NEXT, BLOCK_M, BN_D, BK_D, UPCAST)
        if LAST >= 3:
            if PREFETCH:
                _prefetch_run(wqkv_ptr, N_QKV, H, span_qkv, 0, prefetch_limit, False)
            _grid_barrier(barrier_ptr, P)
    if FIRST <= 3 and LAST >= 3:
        _normed_phase(a2_ptr, ss2_ptr, ss2_count, ss_stride, eps_next, wqkv_ptr, bias_ptr, qkv_ptr, M, N_QKV, H,
                      span_qkv, HAS_BIAS, False, BLOCK_M, BN_QKV, BK_QKV, SS_ROWS, BLOCK_P, UPCAST)


class DecodeChain:
    """Runs `_decode_chain_kernel` for a model: holds the barrier's counter (zeroed once, never reset) and the
    grid size. One per model: two chains must not share a barrier while they may run at once."""

    def __init__(self, device: torch.device, programs: Optional[int] = None):
        self.device = device
        self.programs = programs or default_programs(device)
        self.barrier = torch.zeros(1, dtype=torch.int64, device=device)

    def __call__(self, attn: torch.Tensor, residual: torch.Tensor, o_weight: torch.Tensor,
                 post_norm: torch.Tensor, post_eps: float, gate_up: torch.Tensor, down: torch.Tensor,
                 next_norm: Optional[torch.Tensor] = None, next_eps: float = 0.0,
                 next_qkv: Optional[torch.Tensor] = None, next_bias: Optional[torch.Tensor] = None,
                 phases: Optional[tuple[int, int]] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(h2, qkv): the residual stream after the layer's MLP, and the next layer's q/k/v from it (None
        when no next layer is given: the last layer, whose h2 the final norm takes). `phases` (first, last)
        runs only those (scripts/bench_decode_chain.py times them one by one)."""
        _check(attn, residual, o_weight, post_norm, gate_up, down, next_norm, next_qkv, next_bias)
        m, hidden = residual.shape
        inter = gate_up.shape[0] // 2
        n_qkv = next_qkv.shape[0] if next_qkv is not None else 0
        # h1, a1, h2, a2 [M, H] and act [M, I] in one buffer
        work = torch.empty(4 * m * hidden + m * inter, dtype=residual.dtype, device=residual.device)
        h1, a1, h2, a2 = work[:4 * m * hidden].view(4, m, hidden)
        act = work[4 * m * hidden:].view(m, inter)
        qkv = torch.empty((m, n_qkv), dtype=residual.dtype, device=residual.device) if next_qkv is not None else None
        if m == 0:
            return h2, qkv
        last = QKV if next_qkv is not None else DOWN
        pdl = use_pdl(residual.device, m)
        prefetch = bool(pdl) and prefetches(m) and _prefetchable(o_weight, gate_up, down, next_qkv)
        shapes = [(hidden, attn.shape[1], False), (inter, hidden, True), (hidden, inter, False),
                  (max(n_qkv, 1), hidden, False)]  # (columns, K, gated) of each phase
        split = os.environ.get(MODE_ENV, "1") == "split" or phases is not None
        if split:  # a launch per phase, each over as many programs as its tiles
            layout = [split_tiles(*shape) for shape in shapes]
            grids = [triton.cdiv(shape[0], tiles_[0]) for shape, tiles_ in zip(shapes, layout)]
            spans = [tiles_[0] for tiles_ in layout]
        else:  # one persistent launch, one program per SM, a run of columns each
            spans = [max(triton.cdiv(n, self.programs), MIN_SPAN) for n, _, _ in shapes]
            layout = [tiles(n, k, triton.cdiv(n, span), gated) for (n, k, gated), span in zip(shapes, spans)]
            grids = [self.programs] * 4
        # the partial sums of squares ss1 (from o), ss2 (from down): [M, producer programs]
        ss_stride = max(grids[O], grids[DOWN])
        ss1, ss2 = torch.empty((2, m, ss_stride), dtype=torch.float32, device=residual.device)
        tile = {}
        for name, (block_n, block_k, _) in zip(("O", "GU", "D", "QKV"), layout):
            tile[f"BN_{name}"], tile[f"BK_{name}"] = block_n, block_k
        # the interpreter runs programs one after another, where a barrier would never open
        launches = [(i, i) for i in range(last + 1)] if split or interpreting() else [(O, last)]
        if phases is not None:
            launches = [phases]
        for first, final in launches:
            limit = PREFETCH_LIMIT
            if split:  # a phase of its own: its whole tile where its whole weight fits the L2 budget
                n, k, gated = shapes[first]
                limit = spans[first] * k * 2 if n * k * 2 * (2 if gated else 1) <= SPLIT_PREFETCH_BUDGET else 0
            _decode_chain_kernel[(grids[first],)](
                attn, residual, o_weight, post_norm, gate_up, down,
                next_norm if next_norm is not None else post_norm, next_qkv if next_qkv is not None else o_weight,
                next_bias if next_bias is not None else post_norm,
                h1, a1, ss1, act, h2, a2, ss2, qkv if qkv is not None else h2, self.barrier,
                m, hidden, attn.shape[1], inter, n_qkv, post_eps, next_eps, limit,
                *spans, grids[O], grids[DOWN], ss_stride,
                FIRST=first, LAST=final, HAS_NEXT=next_qkv is not None, HAS_BIAS=next_bias is not None,
                BLOCK_M=MAX_M, SS_ROWS=1 if m == 1 else MAX_M, BLOCK_P=triton.next_power_of_2(ss_stride),
                UPCAST=interpreting(), PDL=pdl, PREFETCH=prefetch and limit > 0, **tile,
                num_warps=NUM_WARPS, num_stages=layout[first][2] if split else NUM_STAGES, launch_pdl=pdl > 0,
            )
        return h2, qkv


def _prefetchable(*weights) -> bool:
    """Bulk L2 prefetches need 16-byte aligned starts: contiguous weights with rows of a multiple of 16 bytes."""
    return all(w is None or (w.is_contiguous() and w.data_ptr() % 16 == 0 and w.shape[1] * w.element_size() % 16 == 0)
               for w in weights)


def _check(attn, residual, o_weight, post_norm, gate_up, down, next_norm, next_qkv, next_bias) -> None:
    for name, t in (("attn", attn), ("residual", residual)):
        if t.dim() != 2 or not t.is_contiguous():
            raise ValueError(f"decode chain: {name} must be a contiguous [rows, features] tensor, got "
                             f"{tuple(t.shape)} with strides {t.stride()}")
    m, hidden = residual.shape
    if m > MAX_M:
        raise ValueError(f"decode chain handles at most {MAX_M} rows, got {m}")
    tensors = [attn, residual, o_weight, post_norm, gate_up, down, next_norm, next_qkv, next_bias]
    if residual.dtype not in DTYPES or any(t is not None and t.dtype != residual.dtype for t in tensors):
        raise TypeError("decode chain takes bfloat16/float16 activations, weights and norm weights of one dtype, got "
                        + ", ".join(str(t.dtype) for t in tensors if t is not None))
    check_shape("attn", attn, (m, o_weight.shape[1]))
    check_shape("o_weight", o_weight, (hidden, attn.shape[1]))
    check_shape("post_norm", post_norm, (hidden,))
    if gate_up.dim() != 2 or gate_up.shape[0] % 2 or gate_up.shape[1] != hidden:
        raise ValueError(f"decode chain: gate_up must be [2 * intermediate, {hidden}], got {tuple(gate_up.shape)}")
    check_shape("down", down, (hidden, gate_up.shape[0] // 2))
    if (next_norm is None) != (next_qkv is None) or (next_bias is not None and next_qkv is None):
        raise ValueError("decode chain: the next layer needs both its input norm and its q/k/v weight")
    if next_qkv is not None:
        check_shape("next_norm", next_norm, (hidden,))
        check_shape("next_qkv", next_qkv, (next_qkv.shape[0], hidden))
        if next_bias is not None:
            check_shape("next_bias", next_bias, (next_qkv.shape[0],))
    for name, t in (("o_weight", o_weight), ("gate_up", gate_up), ("down", down), ("next_qkv", next_qkv)):
        if t is not None:
            check_last_contiguous(name, t)
            if t.stride(0) != t.shape[1]:
                raise ValueError(f"decode chain: {name} rows must be contiguous, got strides {t.stride()}")


def decode_chain_reference(attn, residual, o_weight, post_norm, post_eps, gate_up, down, next_norm=None,
                           next_eps=0.0, next_qkv=None, next_bias=None):
    """The decoder's ops one by one: (h2, qkv) as `DecodeChain.__call__` returns them."""
    from torch.nn.functional import linear

    from photoninfer.model.layers import rms_norm, silu_and_mul

    h1 = linear(attn, o_weight) + residual
    h2 = linear(silu_and_mul(linear(rms_norm(h1, post_norm, post_eps), gate_up)), down) + h1
    if next_qkv is None:
        return h2, None
    return h2, linear(rms_norm(h2, next_norm, next_eps), next_qkv, next_bias)
