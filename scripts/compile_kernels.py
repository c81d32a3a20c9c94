"""Compile every Triton kernel for an NVIDIA GPU ahead of time, on any machine (no GPU needed).

The CPU interpreter checks the kernels' arithmetic but not what only the GPU compiler enforces (tl.dot
shapes and dtypes, layouts, shared memory). This runs each wrapper in photoninfer/kernels at real
Llama-3.2-1B shapes with CPU tensors, records the launches instead of running them, compiles each distinct
launch for the target (sm_90 = H100 by default) with Triton's own toolchain, and prints registers,
spills and shared memory per kernel (read with the bundled cuobjdump). Exit status 1 if any kernel fails to compile.

    python scripts/compile_kernels.py [--arch 90]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # must be unset when the kernels are decorated

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from photoninfer.kernels import (activation, argmax, decode_gemv, gemv, norm_linear, paged_attention, pdl,  # noqa: E402
                                  rmsnorm, rope)

PDL_MODE = pdl.mode()  # the trigger placement compiled ($PHOTONINFER_PDL_TRIGGER)

TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
                 torch.int64: "i64", torch.float8_e4m3fn: "fp8e4nv"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")


class Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, fn, launches: list):
        self.fn = fn
        self.launches = launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.fn, grid, args, kwargs))
        return launch


def signature_of(fn, args, kwargs) -> tuple[dict, dict, dict, dict]:
    """Signature, constexprs, attributes and launch options, specialized as the JIT would at launch:
    ints equal to 1 become constants, 16-byte-aligned pointers and ints divisible by 16 are marked so
    (the alignment that lets loads vectorize and the software pipeliner use async copies)."""
    names = fn.arg_names
    constexprs = {n: kwargs[n] for n in names if n in kwargs}
    signature, attrs = {}, {}
    for name, value in zip([n for n in names if n not in constexprs], args):
        index = (names.index(name),)
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_DTYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[index] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int) and value == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif isinstance(value, int):
            signature[name] = "i64" if abs(value) >= 2 ** 31 else "i32"
            if value % 16 == 0:
                attrs[index] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    signature.update({n: "constexpr" for n in constexprs})
    options = {k: v for k, v in kwargs.items() if k in LAUNCH_OPTIONS}
    return signature, constexprs, attrs, options


def resource_usage(cubin: bytes) -> str:
    """Registers and spills (LOCAL bytes) of a compiled kernel, read with Triton's bundled cuobjdump."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(cuobjdump), "-res-usage", str(path)], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    return f"{regs.group(1) if regs else '?'} regs, {local.group(1) if local else '?'} B local (spills)"


def record_launches() -> list:
    """Runs every wrapper at real shapes with CPU tensors; returns the launches it would make."""
    launches: list = []
    kernels = [(rmsnorm, "_rms_norm_kernel"), (activation, "_silu_and_mul_kernel"),
               (rope, "_rope_and_cache_kv_kernel"), (paged_attention, "_paged_decode_kernel"),
               (paged_attention, "_paged_prefill_kernel"), (gemv, "_gemv_kernel"), (gemv, "_gemv_reduce_kernel"),
               (argmax, "_chunk_argmax_kernel"), (argmax, "_pick_chunk_kernel"),
               (norm_linear, "_norm_linear_kernel"), (decode_gemv, "_decode_gemv_kernel")]
    # on the GPU these launch with programmatic dependent launch (kernels/pdl.py): compile that variant
    kernels += [(module, "use_pdl") for module in (rmsnorm, paged_attention, argmax, norm_linear, decode_gemv)]
    originals = [(module, name, getattr(module, name)) for module, name in kernels]
    for module, name, fn in originals:
        setattr(module, name, (lambda device, rows=1: PDL_MODE) if name == "use_pdl" else Recorder(fn, launches))
    try:
        hidden, hq, hkv, d, ffn = 2048, 32, 8, 64, 8192
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            e = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt)  # noqa: E731
            w = e(hidden)
            rmsnorm.rms_norm(e(16, hidden), w, 1e-5)
            rmsnorm.fused_add_rms_norm(e(16, hidden), e(16, hidden), w, 1e-5)
            if dtype != torch.float32:  # fused_mlp's float32 output into the next layer's norm
                rmsnorm.fused_add_rms_norm(torch.empty(16, hidden), e(16, hidden), w, 1e-5)
            qkv = e(16, (hq + 2 * hkv) * d)
            q, k, v = (t.view(16, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
            rmsnorm.rms_norm(q, e(d), 1e-6, out=q)
            activation.silu_and_mul(e(16, 2 * ffn))
            for head_dim in (64, 128):
                q, k, v = e(16, hq, head_dim), e(16, hkv, head_dim), e(16, hkv, head_dim)
                tables, lens = torch.empty(16, 256, dtype=torch.int32), torch.empty(16, dtype=torch.int32)
                positions, slots = torch.empty(16, dtype=torch.long), torch.empty(16, dtype=torch.long)
                rotary = torch.empty(4096, head_dim // 2)
                fp8 = [torch.empty(100, 16, hkv, head_dim, dtype=torch.float8_e4m3fn)] if dtype == torch.bfloat16 else []
                for cache in [e(100, 16, hkv, head_dim)] + fp8:  # the model dtype, and kv_cache_dtype="fp8"
                    rope.rope_and_cache_kv(q, k, v, positions, rotary, rotary, cache, cache, slots)
                    rope.rope_and_cache_kv(q, k, v, positions, rotary, rotary, cache, cache, slots, e(head_dim),
                                           e(head_dim), 1e-6)  # Qwen3's q/k-norm
                    for hint in (200, 4096):  # one partition (direct) and split-K + merge
                        qk_norm = paged_attention.NewTokens(k, v, positions, rotary, rotary, slots, e(head_dim),
                                                            e(head_dim), 1e-6)  # Qwen3
                        for new in (None, paged_attention.NewTokens(k, v, positions, rotary, rotary, slots), qk_norm):
                            paged_attention.paged_decode_attention(q, cache, cache, tables, lens, 0.125,
                                                                   e(16, hq, head_dim), hint, new_tokens=new)
                    if cache.dtype == torch.float8_e4m3fn:  # a batch that fills the GPU: its own tiles
                        full = 128
                        paged_attention.paged_decode_attention(
                            e(full, hq, head_dim), cache, cache, torch.empty(full, 256, dtype=torch.int32),
                            torch.empty(full, dtype=torch.int32), 0.125, e(full, hq, head_dim), 4096,
                            new_tokens=paged_attention.NewTokens(e(full, hkv, head_dim), e(full, hkv, head_dim),
                                                                 torch.empty(full, dtype=torch.long), rotary, rotary,
                                                                 torch.empty(full, dtype=torch.long)))
                    qsl = torch.empty(17, dtype=torch.int32)
                    for max_query_len in (100, 512):  # the short-prefill tiles (where they apply), and the default
                        paged_attention.paged_prefill_attention(q, cache, cache, tables, qsl, lens, 0.125,
                                                                e(16, hq, head_dim), max_query_len)
        for dtype in (torch.bfloat16, torch.float32):
            argmax.argmax_rows(torch.empty(16, 128256, dtype=dtype))
        for m in (1, 16):
            x, weight = torch.empty(m, hidden, dtype=torch.bfloat16), torch.empty(3072, hidden, dtype=torch.bfloat16)
            for cfg in (gemv.GemvConfig(split_k=1), gemv.default_config(3072, hidden),
                        gemv.GemvConfig(block_n=128, block_k=256, split_k=4, num_stages=3)):
                gemv.small_m_linear(x, weight, config=cfg)
            for dtype in (torch.bfloat16, torch.float16):  # decode-sized norm + linear: q/k/v, gate/up, LM head
                e = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt)  # noqa: E731
                x = e(m, hidden)
                norm_linear.fused_norm_linear(x, e(hidden), 1e-5, e(3072, hidden), residual=e(m, hidden))
                norm_linear.fused_norm_linear(x, e(hidden), 1e-5, e(2 * ffn, hidden), residual=e(m, hidden), gated=True)
                norm_linear.fused_norm_linear(x, e(hidden), 1e-5, e(128256, hidden))
                norm_linear.decode_linear(x, e(hidden, hidden))  # o
                norm_linear.decode_linear(x, e(hidden, hidden), config=norm_linear.NormLinearConfig(x_ahead=False))
                norm_linear.decode_linear(e(m, ffn), e(hidden, ffn))  # down
                tiles = norm_linear.NormLinearConfig
                # o after attention with its weights loaded ahead of the PDL wait (SmolLM2: all of a 576 row)
                norm_linear.decode_linear(e(m, 576), e(576, 576), weights_ahead=True)
                norm_linear.decode_linear(x, e(hidden, hidden), config=tiles(32, 512, 4, 4, False, w_ahead=512))
                if m <= norm_linear.FUSED_MLP_MAX_M:  # o clearing the accumulator, then the MLP in one kernel
                    acc = torch.empty(m, hidden, dtype=torch.float32)
                    norm_linear.decode_linear(x, e(hidden, hidden), weights_ahead=True, zero=acc)
                    norm_linear.fused_mlp(x, e(hidden), 1e-5, e(2 * ffn, hidden), e(hidden, ffn), acc, e(m, hidden))
                    # its float32 output into the next q/k/v or the LM head with the norm inside
                    norm_linear.fused_norm_linear(acc, e(hidden), 1e-5, e(128256, hidden), residual=e(m, hidden))
                    norm_linear.fused_mlp(e(m, 576), e(576), 1e-5, e(3072, 576), e(576, 1536),
                                          torch.empty(m, 576), e(m, 576))  # SmolLM2's narrow tiles
                if m == 1:  # one row: q/k/v with the norm inside (the first layer's, a later one's), and o
                    decode_gemv.decode_gemv(x, e(3072, hidden), norm_weight=e(hidden), eps=1e-5)
                    decode_gemv.decode_gemv(torch.empty(1, hidden), e(3072, hidden), norm_weight=e(hidden), eps=1e-5,
                                            residual=x)
                    decode_gemv.decode_gemv(x, e(hidden, hidden), zero=torch.empty(1, hidden))
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)
    return launches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90 = H100)")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    seen, failures = set(), 0
    for fn, _grid, call_args, kwargs in record_launches():
        signature, constexprs, attrs, options = signature_of(fn, call_args, kwargs)
        key = (fn.__name__, tuple(sorted(signature.items())), tuple(sorted(map(str, constexprs.items()))),
               str(sorted(attrs.items())), tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        described = ", ".join(f"{k}={v}" for k, v in constexprs.items() if k != "UPCAST" and k in kwargs)
        dtypes = sorted({t for t in signature.values() if t.startswith("*")})
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
            usage = resource_usage(compiled.asm["cubin"])
            pipelined = compiled.asm["ttgir"].count("async_copy_global_to_local")
            prefetches = compiled.asm["ptx"].count("cp.async.bulk.prefetch.L2")
            print(f"ok   {fn.__name__:<28} {','.join(dtypes):<18} {described} {options} | {usage}, "
                  f"{compiled.metadata.shared} B shared, {pipelined} async copies, {prefetches} L2 prefetches",
                  flush=True)
        except Exception as exc:  # report every failure, then fail
            failures += 1
            print(f"FAIL {fn.__name__:<28} {','.join(dtypes):<18} {described} {options}\n     {exc}", flush=True)
    print(f"{len(seen) - failures} of {len(seen)} kernel variants compiled for sm_{args.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
