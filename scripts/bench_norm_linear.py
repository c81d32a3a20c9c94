"""RMSNorm + linear in one kernel (kernels/norm_linear.py) against the ops one by one, as a decode step runs them.

    python scripts/bench_norm_linear.py [--shapes llama-3.2-1b,smollm2-135m,qwen3-0.6b] [--m 1,16] [--out nl.json]

Per shape and rows M: q/k/v after the input norm (with the residual add), gate/up + SiLU·mul after the
post-attention norm, and the LM head after the final norm. "separate" is what the decoder ran before:
fused_add_rms_norm, cuBLAS (torch.mm), and silu_and_mul for gate/up. Each candidate runs inside one CUDA
graph over weight copies larger than L2 (scripts/bench_gemv.py's timing), for a sweep of tiles.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gemv import bench_shapes, close_to, default_line, graph_time_us, sweep, sweep_arguments  # noqa: E402

from photoninfer.kernels.activation import silu_and_mul  # noqa: E402
from photoninfer.kernels.norm_linear import NormLinearConfig, default_config, fused_norm_linear  # noqa: E402
from photoninfer.kernels.rmsnorm import fused_add_rms_norm  # noqa: E402

LAYERS = {"qkv": False, "gate_up": True, "lm_head": False}  # layer -> gated
EPS = 1e-5


def configs() -> list[NormLinearConfig]:
    c = NormLinearConfig
    plain = [c(bn, bk, warps, stages) for bn, bk, warps, stages in
             ((16, 256, 4, 3), (16, 256, 4, 4), (32, 256, 4, 3), (64, 256, 4, 3), (32, 128, 4, 3), (16, 256, 2, 4),
              (32, 128, 2, 3), (16, 128, 2, 4))]
    # weight columns loaded before the PDL wait: all of a SmolLM2 / Qwen3 row (576 / 1024), part of Llama's
    ahead = [c(bn, bk, warps, stages, w_ahead=w) for bn, bk, warps, stages, w in
             ((16, 256, 4, 3, 1024), (16, 256, 8, 3, 1024), (32, 256, 8, 3, 1024), (16, 128, 4, 3, 512),
              (32, 128, 4, 3, 512), (16, 256, 2, 4, 512), (32, 128, 4, 3, 256), (64, 256, 4, 3, 256))]
    return plain + ahead


def bench_layer(n: int, k: int, m: int, gated: bool, weights: list) -> dict:
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    residual = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    g = (1 + 0.1 * torch.randn(k, device="cuda")).to(torch.bfloat16)
    xs, rs = x.clone(), residual.clone()

    def separate(w):  # in place on copies, as a step runs it (values drift over replays; the time does not)
        h, _ = fused_add_rms_norm(xs, rs, g, EPS)
        y = torch.mm(h, w.t())
        if gated:
            silu_and_mul(y)

    expected, _ = fused_norm_linear(x, g, EPS, weights[0], residual=residual, gated=gated,
                                    config=NormLinearConfig(16, 64, 4, 2))
    row = {"n": n, "k": k, "m": m, "gated": gated, "mbytes": n * k * 2 / 1e6,
           "separate_us": graph_time_us([lambda w=w: separate(w) for w in weights])}
    n_out = n // 2 if gated else n

    def fused(w, config):
        return fused_norm_linear(x, g, EPS, w, residual=residual, gated=gated, config=config)[0]

    row.update(sweep(configs() + [default_config(n_out, k, gated)], fused, weights, close_to(expected)))
    row["default"] = row["timings"][-1]
    return row


def main() -> int:
    args = sweep_arguments("norm_linear.json")
    bench_shapes(args.shapes.split(","), list(LAYERS), [int(v) for v in args.m.split(",")],
                 lambda n, k, m, layer, weights: bench_layer(n, k, m, LAYERS[layer], weights),
                 lambda row: default_line(row, "separate"), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
