"""decode_linear (kernels/norm_linear.py without the norm) against cuBLAS for a decode step's o, down and
q/k/v projections.

    python scripts/bench_decode_linear.py [--shapes llama-3.2-1b,smollm2-135m,qwen3-0.6b] [--m 1,16] [--out dl.json]

Each candidate runs back to back over weight copies larger than L2 inside one CUDA graph
(scripts/bench_gemv.py's timing), so on Hopper the Triton kernels overlap their neighbours through
programmatic dependent launch as they do in a step, and cuBLAS does not. PHOTONINFER_PDL=0 turns that off.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gemv import bench_shapes, close_to, default_line, graph_time_us, sweep, sweep_arguments  # noqa: E402

from photoninfer.kernels.norm_linear import NormLinearConfig, decode_linear, default_config  # noqa: E402

LAYERS = ("qkv", "o", "down")


def configs() -> list[NormLinearConfig]:
    """Tiles around the fifth session's best (32 x 512, four stages, x in the loop), and weight columns loaded
    before the PDL wait (w_ahead: here each call's wait is for the one before, the same layer streaming, so
    this shows their cost, not the gain after a latency-bound kernel that decode steps get)."""
    c = NormLinearConfig
    plain = [c(32, 512, 4, 4, x_ahead=False), c(32, 256, 4, 4, x_ahead=False), c(64, 256, 4, 4, x_ahead=False),
             c(16, 512, 4, 4, x_ahead=False), c(32, 256, 4, 3, x_ahead=False), c(16, 512, 4, 3, x_ahead=False)]
    ahead = [c(bn, bk, warps, stages, x_ahead=False, w_ahead=w) for bn, bk, warps, stages, w in
             ((32, 512, 4, 4, 512), (16, 512, 8, 3, 1024), (16, 512, 8, 3, 2048), (16, 512, 4, 4, 512))]
    return plain + ahead


def bench_layer(n: int, k: int, m: int, weights: list) -> dict:
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    expected = torch.mm(x, weights[0].t())
    row = {"n": n, "k": k, "m": m, "mbytes": n * k * 2 / 1e6,
           "cublas_us": graph_time_us([lambda w=w: torch.mm(x, w.t(), out=out) for w in weights])}
    candidates = configs() + [default_config(n, k, False, m, norm=False)]
    row.update(sweep(candidates, lambda w, c: decode_linear(x, w, config=c), weights, close_to(expected)))
    row["default"] = row["timings"][-1]
    return row


def main() -> int:
    args = sweep_arguments("decode_linear.json")
    bench_shapes(args.shapes.split(","), list(LAYERS), [int(v) for v in args.m.split(",")],
                 lambda n, k, m, layer, weights: bench_layer(n, k, m, weights),
                 lambda row: default_line(row, "cublas"), args.out,
                 extra={"pdl": os.environ.get("PHOTONINFER_PDL", "1") != "0"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
