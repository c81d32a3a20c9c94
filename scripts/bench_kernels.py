"""Check each Triton kernel against its torch reference at real shapes and time both (CUDA).

Shapes are Llama-3.2-1B's (hidden 2048, 32 q heads, 8 kv heads, head_dim 64, ffn 8192, vocab 128256):
decode at batch 1/16/64/256 with ~1k tokens of context, and a 100-token prefill. Times are medians of
`triton.testing.do_bench` (which clears the L2 cache before every run, so weights come from HBM). Prints
a table and writes $OUT/bench_kernels.json when OUT is set.

    python scripts/bench_kernels.py                 # checks + timings with the default tiles (~1 minute)
    python scripts/bench_kernels.py --sweep --only decode   # also time a tile/partition sweep (minutes each:
                                                            # decode, prefill, linear) and report the fastest
    python scripts/bench_kernels.py --smoke         # CPU, Triton interpreter, tiny shapes: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

if "--smoke" in sys.argv:  # read by triton when the kernels are decorated, so before importing them
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from photoninfer.kernels.activation import silu_and_mul  # noqa: E402
from photoninfer.kernels.gemv import GemvConfig, default_config, small_m_linear  # noqa: E402
from photoninfer.kernels.paged_attention import (DecodeWorkspace, decode_tiles, default_partition,  # noqa: E402
                                                 paged_decode_attention, paged_prefill_attention)
from photoninfer.kernels.rmsnorm import fused_add_rms_norm, rms_norm  # noqa: E402
from photoninfer.kernels.rope import rope_and_cache_kv  # noqa: E402
from photoninfer.model.layers import RMSNorm, RotaryEmbedding  # noqa: E402
from photoninfer.runner.attention import TorchPagedAttention, write_kv  # noqa: E402
from photoninfer.runner.batch import ForwardBatch  # noqa: E402


@dataclass
class Shape:
    hidden: int = 2048
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 64
    ffn: int = 8192
    vocab: int = 128256
    block_size: int = 16
    context: int = 1024
    max_model_len: int = 4096
    batches: tuple = (1, 16, 64, 256)
    prefill_len: int = 100


SHAPES = {"llama-3.2-1b": Shape(),
          "qwen3-0.6b": Shape(hidden=1024, q_heads=16, kv_heads=8, head_dim=128, ffn=3072, vocab=151936, context=600,
                              batches=(16, 64, 256))}
SMOKE = Shape(hidden=64, q_heads=4, kv_heads=2, head_dim=64, ffn=128, vocab=256, context=40, max_model_len=128,
              batches=(1, 3), prefill_len=20)
# Norm and silu round twice in the input dtype, as their references do; a last-bit difference of rsqrt/exp
# or of the summation order can flip the first rounding, which the second can widen to 2 ulps.
HALF_ULPS = 2
LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@dataclass
class Row:
    kernel: str
    shape: str
    dtype: str
    triton_us: float
    torch_us: float
    max_err: float
    ok: bool
    check: str
    extra: dict = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.torch_us / self.triton_us if self.triton_us else float("nan")


class Bench:
    def __init__(self, device: str, smoke: bool):
        self.device = torch.device(device)
        self.smoke = smoke
        self.rows: list[Row] = []
        # the interpreter converts float32 to bfloat16 by truncation: one more ulp per rounding step
        self.half_ulps = HALF_ULPS + 2 if smoke else HALF_ULPS

    def time_us(self, fn) -> float:
        if self.smoke:  # the interpreter: one run, only to exercise the code
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e6
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3

    def add(self, kernel, shape, dtype, triton_fn, torch_fn, err, ok, check, **extra) -> Row:
        row = Row(kernel, shape, str(dtype).replace("torch.", ""), self.time_us(triton_fn),
                  self.time_us(torch_fn) if torch_fn else float("nan"), float(err), bool(ok), check, extra)
        self.rows.append(row)
        print(f"{row.kernel:<22} {row.shape:<34} {row.dtype:<9} {row.triton_us:>9.1f} {row.torch_us:>9.1f} "
              f"{row.speedup:>7.2f}x  {'ok ' if row.ok else 'BAD'} {row.check} (max err {row.max_err:.3g})"
              + (f" {extra['config']}" if "config" in extra else ""), flush=True)
        return row

    def limit(self, configs: list) -> list:
        """A tuning sweep's configs; the smoke run tries two, to exercise the sweep without the time."""
        return configs[:2] if self.smoke else configs

    def randn(self, *shape, dtype=torch.bfloat16, scale=1.0):
        return (scale * torch.randn(*shape, device=self.device)).to(dtype)


def ulps(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest error in units in the last place of expected's dtype."""
    eps = torch.finfo(expected.dtype).eps
    e = expected.double()
    spacing = eps * torch.exp2(torch.floor(torch.log2(e.abs().clamp_min(torch.finfo(expected.dtype).tiny))))
    return float(((actual.double() - e).abs() / spacing).max())


def max_abs(actual, expected) -> float:
    return float((actual.double() - expected.double()).abs().max())


def bench_norms(b: Bench, shape: Shape) -> None:
    rows_list = sorted(set(shape.batches) | {shape.prefill_len})
    for dtype in (torch.bfloat16, torch.float32):
        for rows in rows_list if dtype == torch.bfloat16 else rows_list[-1:]:
            norm = RMSNorm(shape.hidden, 1e-5).to(b.device)
            norm.weight.data = b.randn(shape.hidden, dtype=dtype, scale=0.2) + 1
            x, res = b.randn(rows, shape.hidden, dtype=dtype), b.randn(rows, shape.hidden, dtype=dtype, scale=4)
            out = rms_norm(x, norm.weight, 1e-5)
            expected = norm(x)
            err = ulps(out, expected) if dtype != torch.float32 else max_abs(out, expected)
            ok = err <= b.half_ulps if dtype != torch.float32 else err <= 1e-5
            b.add("rms_norm", f"[{rows}, {shape.hidden}]", dtype, lambda: rms_norm(x, norm.weight, 1e-5),
                  lambda: norm(x), err, ok, "ulps" if dtype != torch.float32 else "abs")

            expected_out, expected_res = norm(x, res)
            out, new_res = fused_add_rms_norm(x.clone(), res.clone(), norm.weight, 1e-5)
            err = ulps(out, expected_out) if dtype != torch.float32 else max_abs(out, expected_out)
            residual_ok = ulps(new_res, expected_res) <= (1 if b.smoke else 0)  # exact on the GPU
            ok = residual_ok and (err <= b.half_ulps if dtype != torch.float32 else err <= 1e-5)
            xs, rs = x.clone(), res.clone()
            b.add("fused_add_rms_norm", f"[{rows}, {shape.hidden}] in place", dtype,
                  lambda: fused_add_rms_norm(xs, rs, norm.weight, 1e-5), lambda: norm(x, res), err, ok,
                  "ulps, residual exact" if dtype != torch.float32 else "abs, residual exact")
    # Qwen3-style per-head q-norm in place on a slice of the fused qkv output
    tokens = shape.batches[-1]
    norm = RMSNorm(shape.head_dim, 1e-6).to(b.device)
    norm.weight.data = b.randn(shape.head_dim, scale=0.2) + 1
    qkv = b.randn(tokens, (shape.q_heads + 2 * shape.kv_heads) * shape.head_dim)
    q = qkv[:, :shape.q_heads * shape.head_dim].view(tokens, shape.q_heads, shape.head_dim)
    expected = norm(q.clone())
    out = rms_norm(q, norm.weight, 1e-6)
    b.add("rms_norm (q-norm)", f"[{tokens}, {shape.q_heads}, {shape.head_dim}] strided", torch.bfloat16,
          lambda: rms_norm(q, norm.weight, 1e-6, out=q), lambda: norm(q), ulps(out, expected),
          ulps(out, expected) <= b.half_ulps, "ulps")


def bench_silu(b: Bench, shape: Shape) -> None:
    for rows in sorted(set(shape.batches) | {shape.prefill_len}):
        gate_up = b.randn(rows, 2 * shape.ffn, scale=3)
        reference = lambda: F.silu(gate_up[:, :shape.ffn]) * gate_up[:, shape.ffn:]  # noqa: E731
        err = ulps(silu_and_mul(gate_up), reference())
        b.add("silu_and_mul", f"[{rows}, {2 * shape.ffn}]", torch.bfloat16, lambda: silu_and_mul(gate_up), reference,
              err, err <= b.half_ulps, "ulps")


def bench_rope(b: Bench, shape: Shape) -> None:
    rope = RotaryEmbedding(shape.head_dim, shape.max_model_len, 500000.0, LLAMA3).to(b.device)
    num_blocks = 4 * shape.max_model_len // shape.block_size
    for tokens in sorted(set(shape.batches) | {shape.prefill_len}):
        qkv = b.randn(tokens, (shape.q_heads + 2 * shape.kv_heads) * shape.head_dim)
        sizes = [shape.q_heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.kv_heads * shape.head_dim]
        q, k, v = (t.view(tokens, -1, shape.head_dim) for t in qkv.split(sizes, dim=-1))
        positions = torch.randint(0, shape.max_model_len, (tokens,), device=b.device)
        slots = torch.randperm(num_blocks * shape.block_size, device=b.device)[:tokens]
        k_cache = torch.zeros(num_blocks, shape.block_size, shape.kv_heads, shape.head_dim, dtype=torch.bfloat16,
                              device=b.device)
        v_cache = torch.zeros_like(k_cache)
        ref_q, ref_k = rope(positions, q.clone(), k.clone())
        ref_kc, ref_vc = k_cache.clone(), v_cache.clone()
        write_kv(ref_kc, ref_vc, ref_k, v, slots)
        q0, k0 = q.clone(), k.clone()
        rope_and_cache_kv(q, k, v, positions, rope.cos, rope.sin, k_cache, v_cache, slots)
        err = max(ulps(q, ref_q), ulps(k, ref_k))
        written_k = k_cache.view(-1, shape.kv_heads, shape.head_dim)[slots]
        ok = err <= 1 and ulps(written_k, ref_k) <= 1 and torch.equal(v_cache, ref_vc)
        q.copy_(q0)
        k.copy_(k0)

        def reference():
            rq, rk = rope(positions, q, k)
            write_kv(k_cache, v_cache, rk, v, slots)

        b.add("rope_and_cache_kv", f"T={tokens} Hq={shape.q_heads} Hkv={shape.kv_heads} D={shape.head_dim}",
              torch.bfloat16,
              lambda: rope_and_cache_kv(q, k, v, positions, rope.cos, rope.sin, k_cache, v_cache, slots),
              reference, err, ok, "ulps, cache")


def paged_setup(b: Bench, shape: Shape, seq_lens: list[int], q_lens: list[int], dtype, cache_dtype=None):
    """A paged cache holding the given contexts (blocks in random order) and the reference's metadata. With a
    `cache_dtype` (FP8), the kernels get the cache in it and the reference the same values widened to dtype."""
    bs = shape.block_size
    blocks_needed = [-(-n // bs) for n in seq_lens]
    num_blocks = sum(blocks_needed) + 1
    order = (torch.randperm(num_blocks - 1) + 1).tolist()
    tables = [[order.pop() for _ in range(n)] for n in blocks_needed]
    width = -(-shape.max_model_len // bs)
    block_tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        block_tables[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
    k_cache = b.randn(num_blocks, bs, shape.kv_heads, shape.head_dim, dtype=dtype)
    v_cache = b.randn(num_blocks, bs, shape.kv_heads, shape.head_dim, dtype=dtype)
    cache_dtype = cache_dtype or dtype
    for cache in (k_cache, v_cache):
        cache.copy_(cache.to(cache_dtype))  # values the narrower cache can hold
    new_slots = []
    for t, n, ql in zip(tables, seq_lens, q_lens):
        pos = torch.arange(n - ql, n)
        new_slots.append(torch.tensor(t)[pos // bs] * bs + pos % bs)
    slot_mapping = torch.cat(new_slots).to(b.device)
    query_start = [0]
    for ql in q_lens:
        query_start.append(query_start[-1] + ql)
    reference_backend = TorchPagedAttention(shape.head_dim ** -0.5, bs)
    meta = reference_backend.prepare(ForwardBatch.for_attention(slot_mapping, query_start, seq_lens, tables))
    q = b.randn(query_start[-1], shape.q_heads, shape.head_dim, dtype=dtype)
    k_new = k_cache.view(-1, shape.kv_heads, shape.head_dim)[slot_mapping]
    v_new = v_cache.view(-1, shape.kv_heads, shape.head_dim)[slot_mapping]
    reference = lambda: (write_kv(k_cache, v_cache, k_new, v_new, slot_mapping),  # noqa: E731
                         reference_backend.attend(q, k_cache, v_cache, meta))[1]
    seq = dict(block_tables=block_tables.to(b.device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32,
               device=b.device), query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=b.device))
    return q, k_cache.to(cache_dtype), v_cache.to(cache_dtype), seq, reference


def attention_tolerance(dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 2e-2


def sweep(b: Bench, kernel: str, shape_desc: str, dtype, make_run, reference, expected, tolerance: float,
          configs: list[dict], **extra) -> Row:
    """Checks and times make_run(**config) for each config; the row is the first (default) config, with
    the fastest one noted in `extra` (and printed) when there are several."""
    results = []
    for config in configs:
        run = make_run(**config)
        out = run()
        err = max_abs(out, expected)
        results.append((b.time_us(run) if len(configs) > 1 else None, config, err))
    _, default, err = results[0]
    row = b.add(kernel, shape_desc, dtype, make_run(**default), reference, err, err <= tolerance, "abs",
                config=default, **extra)
    if len(configs) > 1:
        t_best, best, err_best = min(results, key=lambda r: r[0])
        row.extra.update(best_us=round(t_best, 2), best_config=best, best_ok=bool(err_best <= tolerance),
                         sweep=[{"config": c, "us": round(t, 2)} for t, c, _ in results])
        print(f"    best of {len(configs)}: {t_best:.1f} us with {best} (max err {err_best:.3g})", flush=True)
    return row


def bench_decode(b: Bench, shape: Shape, tune: bool, caches=("model", "float32", "fp8")) -> None:
    scale = shape.head_dim ** -0.5
    # the kernel's own tiles (decode_tiles), then the fixed tiles it used before them
    default = dict(partition_size=None, block_n=None, num_warps=None, max_num_partitions=None,
                   num_stages=None)
    configs = [default, dict(default, block_n=64, num_warps=4, num_stages=3)]
    if tune:  # max_num_partitions None = the kernel's own cap (DECODE_TARGET_PROGRAMS programs)
        configs += [dict(partition_size=p, block_n=n, num_warps=w, max_num_partitions=None, num_stages=st)
                    for p in (64, 256) for n in (16, 32, 64, 128) for w in (2, 4, 8) for st in (1, 2, 3, 4)
                    if n <= p and dict(partition_size=p, block_n=n, num_warps=w, max_num_partitions=None,
                                       num_stages=st) != default]
    # (q dtype, cache dtype): the model dtype, float32 at one batch, and kv_cache_dtype="fp8"
    cases = {"model": (torch.bfloat16, torch.bfloat16, shape.batches),
             "float32": (torch.float32, torch.float32, shape.batches[:1]),
             "fp8": (torch.bfloat16, torch.float8_e4m3fn, shape.batches)}
    cases = [case for name, case in cases.items() if name in caches]
    for dtype, cache_dtype, batches in cases:
        for batch in batches:
            gen = torch.Generator().manual_seed(batch)
            seq_lens = torch.randint(shape.context * 7 // 8, shape.context * 9 // 8, (batch,), generator=gen).tolist()
            q, k_cache, v_cache, seq, reference = paged_setup(b, shape, seq_lens, [1] * batch, dtype, cache_dtype)
            expected = reference()
            kv_bytes = sum(seq_lens) * shape.kv_heads * shape.head_dim * 2 * k_cache.element_size()
            out = torch.empty_like(q)
            # "max_model_len": the grid a CUDA graph replays; "exact": eager, sized by the longest sequence
            for hint, hint_name in ((shape.max_model_len, "max_model_len"), (max(seq_lens), "exact")):
                def make_run(partition_size, block_n, num_warps, max_num_partitions, num_stages, hint=hint):
                    tile = block_n or decode_tiles(batch, shape.kv_heads, cache_dtype == torch.float8_e4m3fn)[0]
                    partition_size = partition_size or default_partition(tile)  # the workspace needs it
                    ws = DecodeWorkspace.allocate(batch, shape.q_heads, shape.head_dim, hint, b.device, partition_size,
                                                  max_num_partitions)

                    def run():
                        return paged_decode_attention(q, k_cache, v_cache, seq["block_tables"], seq["seq_lens"], scale,
                                                      out.fill_(float("nan")) if b.smoke else out, hint,
                                                      partition_size=partition_size, workspace=ws, block_n=block_n,
                                                      num_warps=num_warps, max_num_partitions=max_num_partitions,
                                                      num_stages=num_stages)
                    return run
                kind = "paged_decode" if cache_dtype == dtype else "paged_decode_fp8_cache"
                row = sweep(b, kind, f"B={batch} ctx~{shape.context} hint={hint_name}", dtype, make_run,
                            reference, expected, attention_tolerance(dtype),
                            b.limit(configs) if dtype == torch.bfloat16 and hint_name == "max_model_len" else [default])
                row.extra["kv_tb_per_s"] = round(kv_bytes / (row.triton_us * 1e-6) / 1e12, 3)
                print(f"    K/V read at {row.extra['kv_tb_per_s']} TB/s", flush=True)


def bench_prefill(b: Bench, shape: Shape, tune: bool) -> None:
    scale = shape.head_dim ** -0.5
    n = shape.prefill_len
    cases = [("1 prompt", [n], [n]),
             ("4 prompts", [n] * 4, [n] * 4),
             ("chunk after prefix + decodes", [shape.context + n] + [shape.context] * 3, [n, 1, 1, 1])]
    default = dict(block_m=16, block_n=16, num_warps=4, num_stages=2) if b.smoke else \
        dict(block_m=64, block_n=64, num_warps=4, num_stages=2)
    configs = [default]
    if tune:
        configs += [dict(block_m=m, block_n=bn, num_warps=w, num_stages=st) for m in (32, 64, 128) for bn in (32, 64)
                    for w in (4, 8) for st in (2, 3)
                    if dict(block_m=m, block_n=bn, num_warps=w, num_stages=st) != default]
    for dtype in (torch.bfloat16, torch.float32):
        for name, seq_lens, q_lens in cases if dtype == torch.bfloat16 else cases[:1]:
            q, k_cache, v_cache, seq, reference = paged_setup(b, shape, seq_lens, q_lens, dtype)
            expected = reference()
            out = torch.full_like(q, float("nan"))

            def make_run(**tiles):
                return lambda: paged_prefill_attention(q, k_cache, v_cache, seq["block_tables"], seq["query_start_loc"],
                                                       seq["seq_lens"], scale, out, max(q_lens), **tiles)
            sweep(b, "paged_prefill", f"{name} q={q_lens[0]} ctx={seq_lens[0]}", dtype, make_run, reference,
                  expected, attention_tolerance(dtype), b.limit(configs) if dtype == torch.bfloat16 else [default])


def linear_shapes(shape: Shape) -> dict:
    qkv = (shape.q_heads + 2 * shape.kv_heads) * shape.head_dim
    return {"qkv": (qkv, shape.hidden), "o": (shape.hidden, shape.q_heads * shape.head_dim),
            "gate_up": (2 * shape.ffn, shape.hidden), "down": (shape.hidden, shape.ffn),
            "lm_head": (shape.vocab, shape.hidden)}


def linear_configs(n: int, k: int) -> list[dict]:
    configs = []
    for block_n in (32, 64, 128):
        for block_k in (128, 256):
            for split_k in (1, 2, 4, 8, 16):
                if k % (block_k * split_k) == 0 and (n // block_n) * split_k <= 8192:
                    for stages in (3, 4):
                        configs.append(asdict(GemvConfig(block_n, block_k, split_k, num_warps=4, num_stages=stages)))
    return configs


def bench_linear(b: Bench, shape: Shape, tune: bool) -> None:
    for name, (n, k) in linear_shapes(shape).items():
        weight = b.randn(n, k, scale=k ** -0.5)
        gigabytes = n * k * 2 / 1e9
        for m in (1, 3) if b.smoke else (1, 4, 16):
            x = b.randn(m, k)
            expected = F.linear(x.float(), weight.float())
            configs = [asdict(default_config(n, k))] + (linear_configs(n, k) if tune and m in (1, 16) else [])

            def make_run(**tiles):
                config = GemvConfig(**tiles)
                ws = torch.empty(config.split_k * m * n, dtype=torch.float32, device=b.device)
                return lambda: small_m_linear(x, weight, config=config, workspace=ws)
            row = sweep(b, "small_m_linear", f"{name} [{m}, {k}] x [{n}, {k}]^T", torch.bfloat16, make_run,
                        lambda: F.linear(x, weight), expected, 2e-2 * float(expected.abs().max()) + 1e-2,
                        b.limit(configs))
            row.extra["tb_per_s"] = round(gigabytes / (row.triton_us * 1e-6) / 1e3, 3)
            row.extra["torch_tb_per_s"] = round(gigabytes / (row.torch_us * 1e-6) / 1e3, 3)
            if "best_us" in row.extra:
                row.extra["best_tb_per_s"] = round(gigabytes / (row.extra["best_us"] * 1e-6) / 1e3, 3)
            print(f"    {row.extra['tb_per_s']} TB/s (torch {row.extra['torch_tb_per_s']})"
                  + (f", best {row.extra['best_tb_per_s']} TB/s" if "best_us" in row.extra else ""), flush=True)


def environment(device: torch.device) -> dict:
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        commit = ""
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (triton interpreter)",
            "torch": torch.__version__, "triton": triton.__version__, "git_commit": commit}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes (checks the script)")
    parser.add_argument("--sweep", action="store_true", help="also time a sweep of tiles per shape (slow)")
    parser.add_argument("--shape", default="llama-3.2-1b", choices=list(SHAPES))
    parser.add_argument("--only", default="", help="comma-separated subset: norm,silu,rope,decode,prefill,linear")
    parser.add_argument("--batches", default="", help="decode batch sizes instead of the shape's, e.g. 256")
    parser.add_argument("--decode-caches", default="model,float32,fp8",
                        help="decode cases: the model dtype (bf16), float32, an FP8 cache")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("bench_kernels needs CUDA (or --smoke for the CPU interpreter)", file=sys.stderr)
        return 2
    b = Bench("cpu" if args.smoke else "cuda", args.smoke)
    shape = SMOKE if args.smoke else SHAPES[args.shape]
    if args.batches:
        shape = replace(shape, batches=tuple(int(x) for x in args.batches.split(",")))
    torch.manual_seed(0)
    only = set(filter(None, args.only.split(",")))
    want = lambda part: not only or part in only  # noqa: E731
    print(f"{'kernel':<22} {'shape':<34} {'dtype':<9} {'triton us':>9} {'torch us':>9} {'speedup':>8}", flush=True)
    tune = args.sweep
    started = time.perf_counter()
    if want("norm"):
        bench_norms(b, shape)
    if want("silu"):
        bench_silu(b, shape)
    if want("rope"):
        bench_rope(b, shape)
    if want("decode"):
        bench_decode(b, shape, tune, set(args.decode_caches.split(",")))
    if want("prefill"):
        bench_prefill(b, shape, tune)
    if want("linear"):
        bench_linear(b, shape, tune)
    failed = [r for r in b.rows if not r.ok]
    print(f"\n{len(b.rows) - len(failed)} of {len(b.rows)} checks passed in {time.perf_counter() - started:.0f} s")
    for r in failed:
        print(f"FAILED {r.kernel} {r.shape} {r.dtype}: max err {r.max_err:.3g} ({r.check})")
    report = {"environment": environment(b.device), "shape": asdict(shape),
              "rows": [{**asdict(r), "speedup": r.speedup} for r in b.rows]}
    out_dir = os.environ.get("OUT")
    if out_dir:
        path = Path(out_dir) / "bench_kernels.json"
        path.write_text(json.dumps(report, indent=1))
        print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
