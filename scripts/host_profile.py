"""Where the host's time goes per engine step: cProfile over LLM.generate at a few concurrencies.

    python scripts/host_profile.py --shape llama-3.2-1b --concurrency 1,256 [--device cuda]

Prints, per concurrency, the wall time per step and the top functions by own time. Runs wherever the
engine runs; on a GPU with async scheduling, device time hides behind these numbers.
The engine's own host time on a CPU (async scheduling as on a GPU, the model replaced by a table lookup):

    python scripts/host_profile.py --shape tiny --device cpu --dtype float32 --threads 1 --async --stub-model \
        --concurrency 1,16,64,256 [--time 5]
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
    parser.add_argument("--async", dest="async_scheduling", action="store_true",
                        help="async scheduling on any device (as on CUDA, where it is the default)")
    parser.add_argument("--threads", type=int, default=None, help="CPU: intra-op threads")
    parser.add_argument("--stub-model", action="store_true",
                        help="replace the model by a table lookup (next token a fixed function of the last one): "
                             "what is left is the engine's own host time")
    parser.add_argument("--time", type=int, default=0, metavar="N",
                        help="no profile: time N unprofiled runs per concurrency and print the best ms per step")
    args = parser.parse_args()
    path = build_random_model(args.shape, os.path.join(tempfile.gettempdir(), f"photoninfer-{args.shape}"))
    llm = LLM(path, device=args.device, dtype=args.dtype, threads=args.threads,
              async_scheduling=True if args.async_scheduling else None)
    if args.stub_model:
        stub_model(llm.engine.runner)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        vocab = min(1000, llm.engine.model_config.vocab_size - 2)
        prompts = [[(7 * i + j) % vocab + 2 for j in range(100)] for i in range(concurrency)]
        llm.generate(prompts, params)  # warm-up
        if args.time:
            time_steps(llm, prompts, params, concurrency, args.time)
            continue
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
        model_ms = 1000 * model_time(stats) / steps
        print(f"  host (all but the model) {1000 * elapsed / steps - model_ms:8.3f} ms/step")
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


def stub_model(runner, width: int = 64) -> None:
    """The model becomes a lookup in a fixed random [vocab, width] logits table, indexed by each row's input
    token (so the next token is one of the first `width` ids: a CPU argmax over the whole vocabulary would
    outweigh the host work measured here, while a GPU only queues it); attention metadata is not built. The
    engine around it runs unchanged."""
    import torch

    vocab = runner.model_config.vocab_size
    table = torch.randn(vocab, min(width, vocab), generator=torch.Generator().manual_seed(0)).to(runner.device)
    runner.model.forward = lambda input_ids, positions, kv_caches, meta: input_ids
    runner.model.raw_logits = lambda hidden: table[hidden]
    runner.model.all_logits = lambda input_ids, positions, kv_caches, meta: table[input_ids]  # decode steps
    runner.model.attention.prepare = lambda batch: None
    runner.graphs = None


def time_steps(llm, prompts, params, concurrency: int, repeat: int) -> None:
    """Best of `repeat` unprofiled runs: wall and CPU (this process's) ms per engine step. On a shared machine the
    CPU time is the steadier figure."""
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        steps_before = llm.engine.stats().steps_total
        wall, cpu = time.perf_counter(), time.process_time()
        llm.generate(prompts, params)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        steps = llm.engine.stats().steps_total - steps_before
        best_wall, best_cpu = min(best_wall, wall / steps), min(best_cpu, cpu / steps)
    print(f"concurrency {concurrency:4d}: {1000 * best_wall:.3f} ms per step, {1000 * best_cpu:.3f} ms CPU "
          f"(unprofiled, best of {repeat})")


def model_time(stats: pstats.Stats) -> float:
    """Seconds spent in the model's forward and LM head (device work on a GPU; on the CPU, the compute) and in the
    CPU attention backend's metadata (a GPU step replays a graph instead)."""
    from photoninfer.model.llama import CausalLM

    from photoninfer.runner.attention import TorchPagedAttention

    functions = (CausalLM.forward, CausalLM.raw_logits, TorchPagedAttention.prepare)  # prepare: CPU backend only
    wanted = {(f.__code__.co_filename, f.__code__.co_firstlineno) for f in functions}
    return sum(entry[3] for (path, line, _), entry in stats.stats.items() if (path, line) in wanted)


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
