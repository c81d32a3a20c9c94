"""decode_linear (kernels/norm_linear.py without the norm) against cuBLAS for a decode step's o, down and
q/k/v projections.

    python scripts/bench_decode_linear.py [--shapes llama-3.2-1b,smollm2-135m,qwen3-0.6b] [--m 1,16] [--out dl.json]

Each candidate runs back to back over weight copies larger than L2 inside one CUDA graph
(scripts/bench_gemv.py's timing), so on Hopper the Triton kernels overlap their neighbours through
programmatic dependent launch as they do in a step, and cuBLAS does not. PHOTONINFER_PDL=0 turns that off.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gemv import COLD_BYTES, SHAPES, graph_time_us  # noqa: E402

from photoninfer.kernels.norm_linear import NormLinearConfig, decode_linear, default_config  # noqa: E402

LAYERS = ("qkv", "o", "down")


def configs() -> list[NormLinearConfig]:
    swept = [NormLinearConfig(bn, bk, 4, stages, x_ahead=ahead)
             for bn, bk, stages, ahead in itertools.product((16, 32), (256, 512), (3, 4), (True, False))]
    return swept + [NormLinearConfig(16, 256, 8, 4, x_ahead=False), NormLinearConfig(64, 128, 4, 4, x_ahead=False)]


def bench_layer(n: int, k: int, m: int, weights: list) -> dict:
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    expected = torch.mm(x, weights[0].t())
    row = {"n": n, "k": k, "m": m, "mbytes": n * k * 2 / 1e6,
           "cublas_us": graph_time_us([lambda w=w: torch.mm(x, w.t(), out=out) for w in weights])}
    timings = []
    for config in configs() + [default_config(n, k, False, m, norm=False)]:
        try:
            y = decode_linear(x, weights[0], config=config)
            if not torch.allclose(y.float(), expected.float(), rtol=2e-2, atol=2e-2 * float(expected.abs().max())):
                timings.append({"config": vars(config), "error": "wrong result"})
                continue
            us = graph_time_us([lambda w=w, c=config: decode_linear(x, w, config=c) for w in weights])
            timings.append({"config": vars(config), "us": us})
        except Exception as exc:  # a config the compiler rejects
            timings.append({"config": vars(config), "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
    ok = [t for t in timings if "us" in t]
    row.update(best=min(ok, key=lambda t: t["us"]) if ok else None, default=timings[-1], timings=timings)
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--m", default="1,16")
    parser.add_argument("--out", default="decode_linear.json")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "pdl": os.environ.get("PHOTONINFER_PDL", "1") != "0", "rows": []}
    for shape in args.shapes.split(","):
        for layer in LAYERS:
            n, k = SHAPES[shape][layer]
            copies = max(2, min(32, COLD_BYTES // (n * k * 2)))
            weights = [(torch.randn(n, k, device="cuda") * k ** -0.5).to(torch.bfloat16) for _ in range(copies)]
            for m in (int(v) for v in args.m.split(",")):
                row = bench_layer(n, k, m, weights)
                row.update(shape=shape, layer=layer)
                results["rows"].append(row)
                best, default = row["best"], row["default"]
                print(f"{shape:<13} {layer:<5} M={m:<3} cuBLAS {row['cublas_us']:7.2f} us | best "
                      f"{best['us'] if best else float('nan'):7.2f} us {best and best['config']} | default "
                      f"{default.get('us', float('nan')):7.2f} us", flush=True)
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1)
            del weights
    return 0


if __name__ == "__main__":
    sys.exit(main())
