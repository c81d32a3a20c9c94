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
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
