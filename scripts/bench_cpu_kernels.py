"""The CPU matmul kernels of the fast path on SmolLM2-135M's shapes: our native float32 Q4_1 kernel
(photoninfer/quant/q4_kernels.c) vs torch's `_weight_int4pack_mm_for_cpu` (bf16) vs the dense bf16 oneDNN
matmul vs a dense float32 F.linear (dtype float32: what a CPU without native bf16 runs), at a few row counts
and thread counts. Random weights; times are per call, best of --repeat.
PHOTONINFER_NATIVE=avx2 times our AVX2 path on an AVX-512 CPU; add ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 to hold torch's kernels to AVX2 as well.

    python scripts/bench_cpu_kernels.py [--rows 1,4,16] [--threads 1,2] [--json out.json]

Also prints the layer set of one decode token (30 x the four shapes) as a sum of the per-shape times (weights
hot in the cache), and, with --model-pass, one pass over 30 distinct copies of the layer set (~66 MB of 4-bit
weights, as a real decode token reads them from memory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from photoninfer.bench.environment import cpu_model  # noqa: E402
from photoninfer.quant import native  # noqa: E402
from timing import best_ms  # noqa: E402

SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576), "head": (576, 49152)}
LAYERS = 30


def random_layer(k: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, size=(n, k))
    d = (rng.random((n, k // 32)) * 0.01).astype(np.float16)
    m = (-8 * d.astype(np.float32) + rng.normal(0, 1e-3, d.shape)).astype(np.float16)
    blocks = native.pack_panels(codes, d, m)
    scales = torch.from_numpy(d.astype(np.float32)).repeat_interleave(32, 1)
    dense = torch.from_numpy(codes).float() * scales + torch.from_numpy(m.astype(np.float32)).repeat_interleave(32, 1)
    sz = torch.stack([torch.from_numpy(d.astype(np.float32)).t(), torch.from_numpy(m.astype(np.float32)).t()
                      + 8 * torch.from_numpy(d.astype(np.float32)).t()], -1).to(torch.bfloat16).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(codes).to(torch.int32), 1)
    return blocks, dense, packed, sz, bf16_linear(dense.to(torch.bfloat16))


def bf16_linear(weight: torch.Tensor):
    """x -> x @ weight^T in bf16: oneDNN's own layout (as cpu_fast.py), or plain F.linear where oneDNN has no bf16
    path (a CPU without AVX512-BF16/AVX-NE-CONVERT, or ONEDNN_MAX_CPU_ISA=AVX2)."""
    try:
        onednn = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
    except RuntimeError:
        return lambda x: F.linear(x, weight)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, onednn, None, "none", [], "")


def best_us(fn, repeat: int) -> float:
    return 1000 * best_ms(fn, repeat, inner=20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--model-pass", action="store_true", help="also time 30 distinct layer sets, cold")
    ap.add_argument("--json")
    args = ap.parse_args()
    kernel = native.kernel()
    if kernel is None:
        sys.exit("the native kernel is unavailable here (see the warning above)")
    print(f"native kernel: {kernel.simd}-bit vectors ({cpu_model()}, torch {torch.__version__})")
    layers = {name: random_layer(k, n) for name, (k, n) in SHAPES.items()}
    results = []
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for rows in map(int, args.rows.split(",")):
            total = {"native": 0.0, "int4": 0.0, "dense_bf16": 0.0, "dense_f32": 0.0}
            for name, (k, n) in SHAPES.items():
                blocks, dense, packed, sz, bf16 = layers[name]
                x = torch.randn(rows, k)
                xb = x.to(torch.bfloat16)
                err = (kernel.matmul(x, blocks) - F.linear(x, dense)).abs().max().item()
                row = {"shape": name, "k": k, "n": n, "rows": rows, "threads": threads, "max_abs_err": err,
                       "native_us": best_us(lambda: kernel.matmul(x, blocks), args.repeat),
                       "int4_us": best_us(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, 32, sz).float(),
                                          args.repeat),
                       "dense_bf16_us": best_us(lambda: bf16(xb).float(), args.repeat),
                       "dense_f32_us": best_us(lambda: F.linear(x, dense), args.repeat)}
                results.append(row)
                if name != "head":
                    for key in total:
                        total[key] += row[f"{key}_us"] * LAYERS / 1000
                print(f"threads {threads} rows {rows:2d} {name:8s} {k}->{n:5d}: native {row['native_us']:8.1f} us  "
                      f"int4 {row['int4_us']:8.1f} us  dense bf16 {row['dense_bf16_us']:8.1f} us  "
                      f"dense f32 {row['dense_f32_us']:8.1f} us  (err {err:.1e})")
            print(f"threads {threads} rows {rows:2d} 30 layers: native {total['native']:.2f} ms  int4 {total['int4']:.2f} ms"
                  f"  dense bf16 {total['dense_bf16']:.2f} ms  dense f32 {total['dense_f32']:.2f} ms")
    if args.model_pass:
        results += model_pass(kernel, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "torch": torch.__version__, "simd": kernel.simd, "results": results}, f, indent=1)


def model_pass(kernel, args) -> list[dict]:
    """Time the 120 matmuls of a decode token over 30 distinct copies of the weights (not in the cache)."""
    names = ("qkv", "o", "gate_up", "down")
    copies = [[(SHAPES[n], random_layer(*SHAPES[n], seed=i)) for n in names] for i in range(LAYERS)]
    rows = []
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for m in map(int, args.rows.split(",")):
            xs = {k: torch.randn(m, k) for k, _ in SHAPES.values()}
            xb = {k: v.to(torch.bfloat16) for k, v in xs.items()}
            paths = {
                "native": lambda: [kernel.matmul(xs[k], w[0]) for layer in copies for (k, _), w in layer],
                "int4": lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(xb[k], w[2], 32, w[3])
                                 for layer in copies for (k, _), w in layer],
                "dense_bf16": lambda: [w[4](xb[k]) for layer in copies for (k, _), w in layer],
                "dense_f32": lambda: [F.linear(xs[k], w[1]) for layer in copies for (k, _), w in layer]}
            row = {"model_pass": True, "rows": m, "threads": threads}
            for name, fn in paths.items():
                row[f"{name}_ms"] = best_ms(fn, args.repeat)
            rows.append(row)
            print(f"threads {threads} rows {m:2d} model pass (30 distinct layer sets): native {row['native_ms']:.2f} ms  "
                  f"int4 {row['int4_ms']:.2f} ms  dense bf16 {row['dense_bf16_ms']:.2f} ms  "
                  f"dense f32 {row['dense_f32_ms']:.2f} ms")
    return rows


if __name__ == "__main__":
    main()
