"""A/B of decode-step variants inside one process: the GPU time of a captured decode graph, variant by variant.

    python scripts/decode_graph_ab.py --shape llama-3.2-1b \
        --variant base --variant "no-fused-mlp:norm_linear.FUSED_MLP_MAX_M=0" [--rows 1] [--trace 14]

Why: separate bench processes of the same code differ by up to 5% on the lent H100 (docs/benchmarks.md, eighth
session), which hides most kernel changes; re-capturing the graph in one process does not. Starts the engine on
random weights of `--shape`, runs one request of 100 + 256 tokens so that the graph's static inputs hold a real
decode step (a context of ~355 tokens), then for each variant sets its module constants (`module.NAME=value`,
modules of photoninfer.kernels or photoninfer.model; several joined by ","; values are Python literals, tuples
included), captures the `--rows`-row decode graph again and times 5 x 200 back-to-back replays (the median).
Variants run in the order given and then once more in reverse, so drift shows. `--prefill N` times the
lone-prefill graph of N tokens instead (its static inputs then hold the last real prefill). `--trace N` prints, per
variant, the first N kernels of a replay (CUPTI: start and duration in us, from the step's first kernel; with PDL
a kernel starts before the one before it ends).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import random
import re
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from photoninfer import LLM, SamplingParams  # noqa: E402
from photoninfer.bench.random_model import build_random_model  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[tuple[object, str, object]]]:
    """"name:module.NAME=value,module.NAME=value" -> (name, [(module, NAME, value)])."""
    name, _, sets = text.partition(":")
    changes = []
    for item in filter(None, re.split(r",(?=[\w.]+=)", sets)):  # a value may hold commas: "(16, 512)"
        target, _, value = item.partition("=")
        module_name, _, attr = target.rpartition(".")
        for package in ("photoninfer.kernels", "photoninfer.model"):
            try:
                module = importlib.import_module(f"{package}.{module_name}")
                break
            except ModuleNotFoundError:
                continue
        else:
            raise SystemExit(f"no module {module_name!r} in photoninfer.kernels or photoninfer.model")
        if not hasattr(module, attr):
            raise SystemExit(f"{module.__name__} has no {attr}")
        changes.append((module, attr, ast.literal_eval(value)))
    return name, changes


def capture(graphs, key) -> torch.cuda.CUDAGraph:
    """The step of `key` captured again with the variant's constants (compiling what they changed first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph, _ = graphs.record(key, stream)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return graph


def replay_us(graph: torch.cuda.CUDAGraph) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    runs = []
    for _ in range(5):
        torch.cuda.synchronize()
        start.record()
        for _ in range(200):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        runs.append(start.elapsed_time(end) / 200 * 1000)
    return statistics.median(runs)


def trace(graph: torch.cuda.CUDAGraph, count: int) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    step = kernels[-(len(kernels) // 5):]  # the last replay
    t0 = step[0].time_range.start
    return [f"  {i:3d} {k.name[:40]:40s} start {k.time_range.start - t0:8.1f} dur "
            f"{k.time_range.end - k.time_range.start:6.1f}" for i, k in enumerate(step[:count])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--rows", type=int, default=1, help="decode batch size (a captured graph size)")
    parser.add_argument("--variant", action="append", default=[], help="name[:module.NAME=value,...]")
    parser.add_argument("--prefill", type=int, default=0,
                        help="time the lone-prefill graph of this many tokens instead of a decode graph")
    parser.add_argument("--trace", type=int, default=0, help="print the first N kernels of a replay per variant")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    variants = [parse_variant(v) for v in args.variant or ["base"]]
    path = build_random_model(args.shape, os.path.join(tempfile.gettempdir(), f"photoninfer-{args.shape}"))
    llm = LLM(path, dtype="bfloat16")
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 1000) for _ in range(100)] for _ in range(args.rows)]
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True))
    graphs = llm.engine.runner.graphs
    key = ("prefill", args.prefill) if args.prefill else ("decode", args.rows)
    if graphs is None or key not in graphs.graphs:
        raise SystemExit(f"no captured graph {key}")
    defaults = {(module, attr): getattr(module, attr) for _, changes in variants for module, attr, _ in changes}
    for name, changes in variants + variants[::-1]:
        for (module, attr), value in defaults.items():
            setattr(module, attr, value)
        for module, attr, value in changes:
            setattr(module, attr, value)
        graph = capture(graphs, key)
        us = replay_us(graph)
        rate = f"  {1e6 * args.rows / us:9.1f} tok/s" if key[0] == "decode" else ""
        print(f"{args.shape} {key[0]} {key[1]} {name:32s} {us:8.1f} us a step{rate}", flush=True)
        if args.trace:
            print("\n".join(trace(graph, args.trace)), flush=True)
    for (module, attr), value in defaults.items():
        setattr(module, attr, value)


if __name__ == "__main__":
    main()
