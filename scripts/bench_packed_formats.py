"""Our native packed kernels in every format against dense float32 F.linear, torch's int4 kernel (bf16
activations) and the dense bf16 oneDNN matmul, on SmolLM2-135M's matrix shapes. Random weights; per call,
best of --repeat.

    python scripts/bench_packed_formats.py [--rows 1,16] [--threads 1] [--cpu-time] [--json out.json]

(--cpu-time: process CPU time instead of wall time, steadier with 1 thread on a shared machine.)

Formats (native.FORMATS) and the GGUF types that use them: q4_f16 (Q4_0, Q4_1), q4_f32 (Q4_K), q5_f16 (Q5_0,
Q5_1), q5_f32 (Q5_K), i8_g32 (Q8_0), i8_g16 (Q6_K), i8_g16_bias (fused layers mixing Q6_K with 4/5-bit types);
i8_g32_bias has no GGUF type of its own (a fused Q8_0 + Q5_1 layer). "layer set": the
sum over the four shapes x 30 layers, each shape's weights hot in the cache; "model pass": one pass over 30
distinct copies of the layer set, read from memory as a real decode token does (the figure that counts).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from photoninfer.bench.environment import cpu_model  # noqa: E402
from photoninfer.quant import native  # noqa: E402
from timing import best_ms  # noqa: E402

SHAPES = {"o 576x576": (576, 576), "qkv 960x576": (576, 960), "gate_up 3072x576": (576, 3072),
          "down 576x1536": (1536, 576)}  # name: (in, out)
LAYERS = 30
FORMATS = {"q4_f16": native.Q4_F16, "q4_f32": native.Q4_F32, "q5_f16": native.Q5_F16, "q5_f32": native.Q5_F32,
           "i8_g32": native.int8_format(32, False), "i8_g32_bias": native.int8_format(32, True),
           "i8_g16": native.int8_format(16, False), "i8_g16_bias": native.int8_format(16, True)}


def packed(fmt: native.Format, k: int, n: int, seed: int):
    """Random weights in `fmt` -> (panels, the same weight dense float32 [n, k])."""
    rng = np.random.default_rng(seed)
    groups = k // fmt.group
    scales = (rng.random((n, groups)) * 0.01 + 0.001).astype(np.float32)
    biases = (-8 * scales + rng.normal(0, 1e-3, scales.shape)).astype(np.float32)
    if fmt in (native.Q4_F16, native.Q4_F32, native.Q5_F16, native.Q5_F32):
        bits = 5 if fmt in (native.Q5_F16, native.Q5_F32) else 4
        codes = rng.integers(0, 1 << bits, (n, k))
        if fmt in (native.Q4_F16, native.Q5_F16):
            scales, biases = scales.astype(np.float16), biases.astype(np.float16)
        panels = native.pack_panels(codes, scales, biases, bits)
    else:
        codes = rng.integers(-32, 32, (n, k)).astype(np.int8)
        biased = fmt.record > 16 * fmt.group + 64
        panels, got = native.pack_int8_panels(codes, scales, biases if biased else None)
        assert got == fmt
        biases = biases if biased else np.zeros_like(biases)
    per_input = [torch.from_numpy(a.astype(np.float32)).repeat_interleave(fmt.group, 1) for a in (scales, biases)]
    dense = torch.from_numpy(codes.astype(np.float32)) * per_input[0] + per_input[1]
    return panels, dense


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cpu-time", action="store_true", help="time with the process's CPU time")
    ap.add_argument("--json")
    args = ap.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter
    time_ms = functools.partial(best_ms, repeat=args.repeat, inner=10, clock=clock)
    kernel = native.kernel()
    if kernel is None:
        sys.exit("the native kernel is unavailable here (see the warning above)")
    results = []
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for rows in map(int, args.rows.split(",")):
            xs = {k: torch.randn(rows, k) for k, _ in SHAPES.values()}
            total = {}
            for name, (k, n) in SHAPES.items():
                x, xb = xs[k], xs[k].bfloat16()
                _, dense = packed(native.Q4_F16, k, n, 0)
                codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
                int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
                sz = torch.rand(k // 32, n, 2).bfloat16()
                onednn = torch.ops.mkldnn._reorder_linear_weight(dense.bfloat16(), 16)
                row = {"shape": name, "rows": rows, "threads": threads,
                       "dense_f32_ms": time_ms(lambda: F.linear(x, dense)),
                       "torch_int4_bf16_ms": time_ms(
                           lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, int4, 32, sz)),
                       "dense_bf16_onednn_ms": time_ms(lambda: torch.ops.mkldnn._linear_pointwise(
                           xb, onednn, None, "none", [], ""))}
                for fname, fmt in FORMATS.items():
                    panels, weight = packed(fmt, k, n, 1)
                    err = ((kernel.matmul(x, panels, fmt) - F.linear(x, weight)).abs().max()
                           / F.linear(x.abs(), weight.abs()).max()).item()
                    row[f"{fname}_ms"] = time_ms(lambda: kernel.matmul(x, panels, fmt))
                    row[f"{fname}_rel_err"] = err
                for key, value in row.items():
                    if key.endswith("_ms"):
                        total[key] = total.get(key, 0.0) + value * LAYERS
                results.append(row)
                print(f"t{threads} rows {rows:2d} {name:17s} " + "  ".join(
                    f"{key[:-3]} {value * 1000:7.1f}us" for key, value in row.items() if key.endswith("_ms")))
            results.append({"shape": "layer set x 30 (hot)", "rows": rows, "threads": threads, **total})
            print(f"t{threads} rows {rows:2d} layer set x 30 (hot): " + "  ".join(
                f"{key[:-3]} {value:.2f}ms" for key, value in total.items()))
            results.append(model_pass(kernel, rows, threads, args.repeat, clock))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "torch": torch.__version__, "results": results}, f, indent=1)


def model_pass(kernel, rows: int, threads: int, repeat: int, clock) -> dict:
    """The 120 matmuls of a decode token over 30 distinct copies of the weights (not in the cache), per format."""
    row = {"shape": "model pass (30 distinct layer sets)", "rows": rows, "threads": threads}
    xs = {k: torch.randn(rows, k) for k, _ in SHAPES.values()}
    dense = [(xs[k], torch.randn(n, k)) for _ in range(LAYERS) for k, n in SHAPES.values()]
    row["dense_f32_ms"] = best_ms(lambda: [F.linear(x, w) for x, w in dense], repeat, clock=clock)
    row["dense_f32_mb"] = sum(w.numel() * 4 for _, w in dense) / 1e6
    del dense
    for fname, fmt in FORMATS.items():
        copies = [(xs[k], packed(fmt, k, n, seed=i)[0]) for i in range(LAYERS) for k, n in SHAPES.values()]
        row[f"{fname}_ms"] = best_ms(lambda: [kernel.matmul(x, p, fmt) for x, p in copies], repeat, clock=clock)
        row[f"{fname}_mb"] = sum(p.numel() for _, p in copies) / 1e6
        del copies
    print(f"t{threads} rows {rows:2d} model pass: " + "  ".join(
        f"{key[:-3]} {row[key]:.2f}ms ({row[key[:-3] + '_mb']:.0f} MB)" for key in row if key.endswith("_ms")))
    return row


if __name__ == "__main__":
    main()
