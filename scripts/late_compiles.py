"""Triton kernels that compile after start-up: each is a variant the start-up warm-up missed, and costs a
request its compile time (~0.1-0.5 s) on a machine whose Triton cache is empty.

    python scripts/late_compiles.py [--shape llama-3.2-1b] [--concurrency 1,16,64,256] [--nano-vllm]
        [--kv-cache-dtype fp8]

Starts the engine, then runs bench-like batches and prints every kernel specialization Triton builds (or
loads from its disk cache) while they run, with the batch that needed it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from photoninfer import LLM, SamplingParams  # noqa: E402
from photoninfer.bench.random_model import build_random_model  # noqa: E402
from photoninfer.bench.workloads import nano_vllm_batch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--concurrency", default="1,16,64,256")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--nano-vllm", action="store_true", help="then the nano-vllm workload (mixed steps)")
    parser.add_argument("--kv-cache-dtype", default="auto")
    args = parser.parse_args()
    import triton

    path = build_random_model(args.shape, os.path.join(tempfile.gettempdir(), f"photoninfer-{args.shape}"))
    llm = LLM(path, dtype="bfloat16", kv_cache_dtype=args.kv_cache_dtype)
    late = []
    current = {"batch": "start"}

    def on_compile(*, repr, **_):
        late.append((current["batch"], repr))
        print(f"late compile during {current['batch']}: {repr[:400]}", flush=True)
        return None  # go on compiling

    triton.knobs.runtime.jit_cache_hook = on_compile
    vocab = llm.engine.model_config.vocab_size
    batches = [("warm-up", 2, 16, 4), ("ttft", 1, 100, 1)]
    batches += [(f"c={c}", c, 100, args.output_len) for c in map(int, args.concurrency.split(","))]
    for name, count, prompt_len, out_len in batches:
        current["batch"] = name
        prompts = [[(31 * i + 7 * j) % (vocab - 2) + 2 for j in range(prompt_len)] for i in range(count)]
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True))
        print(f"{name}: {time.perf_counter() - start:.3f} s", flush=True)
    if args.nano_vllm:
        current["batch"] = "nano-vllm"
        batch = nano_vllm_batch(256, 100, 1024, vocab)
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in batch.output_lens]
        start = time.perf_counter()
        llm.generate(batch.prompts, params)
        print(f"nano-vllm: {time.perf_counter() - start:.3f} s", flush=True)
    print(f"{len(late)} kernel variants compiled after start-up")


if __name__ == "__main__":
    main()
