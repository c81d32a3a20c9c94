"""Decode-size linear layers as a decode step runs them: cuBLAS (F.linear) against the Triton small-M kernels.

    python scripts/bench_gemv.py [--shapes llama-3.2-1b,smollm2-135m,qwen3-0.6b] [--out gemv.json]

A decode step streams every layer's weights once, and no layer's weights are in L2 when its turn comes. So each
candidate runs inside one CUDA graph as `copies` calls over distinct weight copies (together larger than L2),
and the time per call is the graph's time divided by the calls: launch gaps as in a captured step, cold weights.
Prints, per (shape, M), cuBLAS and the best Triton config with their TB/s, and writes all timings as JSON.
One layer repeated back to back is not a decode step's mix of kernels: in the sixth session the sweeps' best
tiles for Llama's o and down made whole steps 11% slower (docs/benchmarks.md). Treat a sweep's ranking as a
list of candidates and decide with `photoninfer bench`, A/B in one device call.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from photoninfer.kernels.gemv import FMA_MAX_M, GemvConfig, small_m_linear  # noqa: E402

SHAPES = {  # name -> {layer: (N, K)}
    "llama-3.2-1b": {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
                     "lm_head": (128256, 2048)},
    "smollm2-135m": {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536),
                     "lm_head": (49152, 576)},
    "qwen3-0.6b": {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072),
                   "lm_head": (151936, 1024)},
}
COLD_BYTES = 256 * 2**20  # the copies of one weight together: several times the 50 MiB L2


def fma_configs(n: int, k: int) -> list[GemvConfig]:
    configs = []
    for block_n, block_k, warps, stages, split in itertools.product((8, 16, 32), (256, 512), (4, 8), (2, 4),
                                                                     (1, 2, 4, 8)):
        if k % split == 0 and k // split >= block_k // 2 and block_n * block_k <= 16384:
            configs.append(GemvConfig(block_n, block_k, split, warps, stages, fma=True))
    return configs


def dot_configs(n: int, k: int) -> list[GemvConfig]:
    configs = []
    for block_n, block_k, split, stages in itertools.product((32, 64), (128, 256), (1, 2, 4, 8), (3, 4)):
        if k % (block_k * split) == 0:
            configs.append(GemvConfig(block_n, block_k, split, 4, stages))
    return configs


def graph_time_us(calls) -> float:
    """Mean time of one call when all `calls` run back to back in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # compile and warm up outside the capture
            call()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return sorted(times)[len(times) // 2]


def bench_one(n: int, k: int, m: int, weights: list, out: torch.Tensor) -> dict:
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    expected = F.linear(x.float(), weights[0].float())
    tolerance = 2e-2 * float(expected.abs().max()) + 1e-2
    result = {"n": n, "k": k, "m": m, "mbytes": n * k * 2 / 1e6,
              "cublas_us": graph_time_us([lambda w=w: torch.mm(x, w.t(), out=out) for w in weights])}
    configs = fma_configs(n, k) if m <= FMA_MAX_M else dot_configs(n, k)
    workspace = torch.empty(8 * m * n, dtype=torch.float32, device="cuda")
    result.update(sweep(configs, lambda w, c: small_m_linear(x, w, config=c, out=out, workspace=workspace),
                        weights, lambda y: (y.float() - expected).abs().max() <= tolerance))
    return result


def sweep_arguments(default_out: str, default_m: str = "1,16") -> argparse.Namespace:
    """--shapes (comma-separated SHAPES names), --m (row counts) and --out (JSON path)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--m", default=default_m)
    parser.add_argument("--out", default=default_out)
    return parser.parse_args()


def bench_shapes(shapes: list[str], layers: list[str], ms: list[int], bench, describe, out: str,
                 extra: dict | None = None) -> dict:
    """Runs `bench(n, k, m, layer, weights)` -> row for each shape, layer and row count M over weight copies
    larger than L2, prints `describe(row)` and rewrites `out` (JSON) after every row, so that a run cut
    short keeps what it measured."""
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, **(extra or {}), "rows": []}
    for shape in shapes:
        for layer in layers:
            n, k = SHAPES[shape][layer]
            copies = max(2, min(32, COLD_BYTES // (n * k * 2)))
            weights = [(torch.randn(n, k, device="cuda") * k ** -0.5).to(torch.bfloat16) for _ in range(copies)]
            for m in ms:
                row = bench(n, k, m, layer, weights)
                row.update(shape=shape, layer=layer)
                results["rows"].append(row)
                print(f"{shape:<13} {layer:<8} M={m:<3} {describe(row)}", flush=True)
                with open(out, "w") as f:
                    json.dump(results, f, indent=1)
            del weights
    return results


def default_line(row: dict, peer: str) -> str:
    """`describe` for sweeps with a default config: the peer's time, the best and the default config's."""
    best, default = row["best"], row["default"]
    return (f"{peer} {row[peer + '_us']:7.2f} us | best {best['us'] if best else float('nan'):7.2f} us "
            f"{best and best['config']} | default {default.get('us', float('nan')):7.2f} us")


def close_to(expected: torch.Tensor):
    """A result check for `sweep`: within 2% of `expected` (relative to its largest entry)."""
    def is_right(y: torch.Tensor) -> bool:
        return torch.allclose(y.float(), expected.float(), rtol=2e-2, atol=2e-2 * float(expected.abs().max()))
    return is_right


def sweep(configs, run, weights: list, is_right) -> dict:
    """For each config: `run(weights[0], config)` checked with `is_right(output)`, then timed over all the
    weight copies in one CUDA graph. {"best": the fastest timing (None if none ran), "timings": one per
    config, with "us" or, for a config the compiler rejects or that computes wrongly, "error"}."""
    timings = []
    for config in configs:
        try:
            if not is_right(run(weights[0], config)):
                timings.append({"config": vars(config), "error": "wrong result"})
                continue
            us = graph_time_us([lambda w=w, c=config: run(w, c) for w in weights])
            timings.append({"config": vars(config), "us": us})
        except Exception as exc:  # a config the compiler rejects (e.g. out of registers)
            timings.append({"config": vars(config), "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
    ok = [t for t in timings if "us" in t]
    return {"best": min(ok, key=lambda t: t["us"]) if ok else None, "timings": timings}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--m", default="1,2,4,8,16")
    parser.add_argument("--layers", default=None, help="comma-separated subset of qkv,o,gate_up,down,lm_head")
    parser.add_argument("--out", default="gemv.json")
    args = parser.parse_args()
    layers = args.layers.split(",") if args.layers else list(SHAPES["llama-3.2-1b"])

    def bench(n, k, m, layer, weights):
        return bench_one(n, k, m, weights, torch.empty(m, n, dtype=torch.bfloat16, device="cuda"))

    def describe(row):
        best, gb = row["best"], row["mbytes"] / 1e3
        line = f"cuBLAS {row['cublas_us']:7.2f} us {gb / row['cublas_us'] * 1e3:5.2f} TB/s"
        if best:
            line += (f" | triton {best['us']:7.2f} us {gb / best['us'] * 1e3:5.2f} TB/s "
                     f"x{row['cublas_us'] / best['us']:.2f} {best['config']}")
        return line

    bench_shapes(args.shapes.split(","), layers, [int(v) for v in args.m.split(",")], bench, describe, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
