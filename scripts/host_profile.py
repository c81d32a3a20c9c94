"""Where the host's time goes per engine step: cProfile over LLM.generate at a few concurrencies.

    python scripts/host_profile.py --shape llama-3.2-1b --concurrency 1,256 [--device cuda]

Prints, per concurrency, the wall time per step and the top functions by own time. Runs wherever the
engine runs; on a GPU with async scheduling, device time hides behind these numbers.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from photoninfer import LLM, SamplingParams  # noqa: E402
from photoninfer.bench.random_model import build_random_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--concurrency", default="1,256")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--top", type=int, default=22)
    parser.add_argument("--ttft", action="store_true", help="also profile single 100-token prefills (TTFT)")
    args = parser.parse_args()
    path = build_random_model(args.shape, os.path.join(tempfile.gettempdir(), f"photoninfer-{args.shape}"))
    llm = LLM(path, device=args.device, dtype=args.dtype)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        prompts = [[(7 * i + j) % 1000 + 2 for j in range(100)] for i in range(concurrency)]
        llm.generate(prompts, params)  # warm-up
        profiler = cProfile.Profile()
        start = time.perf_counter()
        steps_before = llm.engine.stats().steps_total
        profiler.enable()
        llm.generate(prompts, params)
        profiler.disable()
        elapsed = time.perf_counter() - start
        steps = llm.engine.stats().steps_total - steps_before
        print(f"\n=== concurrency {concurrency}: {steps} steps, {1000 * elapsed / steps:.3f} ms per step "
              f"(profiled), {concurrency * args.output_len / elapsed:.0f} tok/s")
        stats = pstats.Stats(profiler)
        print_components(stats, steps)
        stats.sort_stats("tottime").print_stats(args.top)
    if args.ttft:
        profile_ttft(llm, args.top)


COMPONENTS = ("schedule", "_launch", "launch", "build", "sample", "collect", "_finish_step", "_process_token",
              "_output", "add_token", "cache_computed_blocks", "advance", "replay", "forward")


def print_components(stats: pstats.Stats, steps: int) -> None:
    """Cumulative ms per step of the engine's main parts (a function's time includes what it calls)."""
    rows = []
    for (path, line, name), (_, calls, _, cumulative, _) in stats.stats.items():
        if name in COMPONENTS and "photoninfer" in path:
            rows.append((cumulative, f"{os.path.basename(path)}:{name}", calls))
    for cumulative, where, calls in sorted(rows, reverse=True):
        print(f"  {where:<42} {1000 * cumulative / steps:8.3f} ms/step  ({calls} calls)")


def profile_ttft(llm, top: int) -> None:
    """Median TTFT of single 100-token prompts, then where one of them spends host and device time."""
    import torch

    params = SamplingParams(temperature=0.0, max_tokens=1)
    prompts = [[(13 * i + j) % 1000 + 2 for j in range(100)] for i in range(12)]
    times = []
    for prompt in prompts[:10]:
        start = time.perf_counter()
        llm.generate([prompt], params)
        times.append(time.perf_counter() - start)
    print(f"\n=== TTFT of a 100-token prompt: median {1000 * sorted(times)[5]:.2f} ms, min {1000 * min(times):.2f} ms")
    profiler = cProfile.Profile()
    profiler.enable()
    llm.generate([prompts[10]], params)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)
    if torch.cuda.is_available():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            llm.generate([prompts[11]], params)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
