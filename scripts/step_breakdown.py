"""Where a workload's wall time goes, by kind of engine step (decode graph, lone-prefill graph, eager).

    python scripts/step_breakdown.py --shape qwen3-0.6b [--max-num-batched-tokens 8192] [--kv-cache-dtype fp8]

Runs the workload through LLMEngine.step() (each repeat with prompts of its own, so that none prefills from the
prefix cache) and times each step (with async scheduling a step's wall time is the slower of the host and the
device). Prints, per kind and per size bucket, steps, total seconds and ms per step.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from photoninfer import SamplingParams  # noqa: E402
from photoninfer.bench.random_model import build_random_model  # noqa: E402
from photoninfer.bench.workloads import nano_vllm_batch  # noqa: E402
from photoninfer.config import EngineConfig  # noqa: E402
from photoninfer.engine.llm_engine import LLMEngine  # noqa: E402


def bucket(n: int) -> str:
    edges = (1, 16, 64, 128, 256, 512, 2048, 8192)
    upper = next((e for e in edges if n <= e), edges[-1])
    return f"<={upper}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-0.6b")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2, help="runs of the workload (the first warms up)")
    parser.add_argument("--slowest", type=int, default=0, help="also list each run's slowest steps")
    parser.add_argument("--profile-mixed", type=int, default=0, help="torch.profiler over this many eager mixed "
                        "steps of the last run")
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--kv-cache-dtype", default="auto")
    args = parser.parse_args()
    path = build_random_model(args.shape, os.path.join(tempfile.gettempdir(), f"photoninfer-{args.shape}"))
    engine = LLMEngine(EngineConfig(model=path, dtype="bfloat16", max_num_seqs=args.max_num_seqs,
                                    max_num_batched_tokens=args.max_num_batched_tokens,
                                    kv_cache_dtype=args.kv_cache_dtype))
    batch = nano_vllm_batch(args.requests, args.min_len, args.max_len, engine.model_config.vocab_size)
    kinds = []
    build = engine.runner.batch_builder.build

    def recording_build(*a, **k):
        result = build(*a, **k)
        fb = result[0]
        kind = "decode-graph" if fb.graph_size else "prefill-graph" if fb.graph_tokens else (
            "eager-decode" if fb.num_tokens == fb.num_seqs else "eager-mixed")
        kinds.append((kind, fb.num_seqs, fb.num_tokens))
        return result
    engine.runner.batch_builder.build = recording_build
    vocab = engine.model_config.vocab_size
    for run in range(args.repeat):
        profile = args.profile_mixed if run == args.repeat - 1 else 0
        # each run's prompts start with a token of their own: a repeat would otherwise prefill from the prefix cache
        prompts = [[(prompt[0] + run) % vocab] + prompt[1:] for prompt in batch.prompts]
        total, times = run_workload(engine, dataclasses.replace(batch, prompts=prompts), kinds, f"run{run}-", profile)
        report(args, batch, total, times)


def run_workload(engine, batch, kinds, prefix: str, profile_mixed: int):
    for i, (prompt, out_len) in enumerate(zip(batch.prompts, batch.output_lens)):
        engine.add_request(f"{prefix}{i}", prompt, SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True))
    times = []
    profiler = None
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        n = len(kinds)
        if profile_mixed and profiler is None and times and times[-1][0][0] == "eager-mixed":
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                          torch.profiler.ProfilerActivity.CUDA])
            profiler.__enter__()
        engine.step(final_only=True)
        if len(kinds) > n:
            times.append((kinds[-1], time.perf_counter() - t))
        if profiler is not None and profile_mixed and sum(k[0] == "eager-mixed" for k, _ in times) > profile_mixed:
            torch.cuda.synchronize()
            profiler.__exit__(None, None, None)
            print(profiler.key_averages().table(sort_by="self_cuda_time_total", row_limit=20))
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
            profile_mixed = 0
    return time.perf_counter() - start, times


def report(args, batch, total, times) -> None:
    if args.slowest:
        ranked = sorted(enumerate(times), key=lambda it: -it[1][1])[:args.slowest]
        print("slowest steps: " + ", ".join(f"#{i} {kind} {seqs}seq/{tokens}tok {1000 * t:.1f} ms"
                                            for i, ((kind, seqs, tokens), t) in ranked))
    output_tokens = sum(batch.output_lens)
    print(f"{args.shape} nano-vllm x{args.requests}, budget {args.max_num_batched_tokens}: {total:.2f} s, "
          f"{output_tokens / total:.0f} output tok/s, {len(times)} steps")
    table = collections.defaultdict(lambda: [0, 0.0, 0])
    for (kind, seqs, tokens), seconds in times:
        key = (kind, bucket(seqs if kind.endswith("decode") or kind == "decode-graph" else tokens))
        table[key][0] += 1
        table[key][1] += seconds
        table[key][2] += tokens
    print(f"{'kind':<14} {'size':<7} {'steps':>6} {'seconds':>8} {'ms/step':>8} {'tokens':>8}")
    for (kind, size), (steps, seconds, tokens) in sorted(table.items(), key=lambda kv: -kv[1][1]):
        print(f"{kind:<14} {size:<7} {steps:>6} {seconds:>8.2f} {1000 * seconds / steps:>8.2f} {tokens:>8}")


if __name__ == "__main__":
    main()
