"""Where one request's time to first token goes, on a CUDA GPU: host work before the graph launch, the launch, the
rest (the prefill graph, the copy back, postprocessing), and the prefill graph alone replayed back to back.

    python scripts/ttft_probe.py [--shape llama-3.2-1b] [--prompt-len 100] [--runs 40]

Starts the engine on random weights of `--shape` (bench's random_model), warms up, then times `LLM.generate` of
single prompts with max_tokens=1 (as `photoninfer bench` times TTFT), stamping the host clock around the graph
runner's call. Medians and minima in ms.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from photoninfer import LLM, SamplingParams  # noqa: E402
from photoninfer.bench.random_model import build_random_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--prompt-len", type=int, default=100)
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    path = build_random_model(args.shape, os.path.join(tempfile.gettempdir(), f"photoninfer-{args.shape}"))
    llm = LLM(path, dtype="bfloat16")
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    prompts = [[random.Random(i).randrange(2, 1000) for _ in range(args.prompt_len)] for i in range(args.runs + 5)]
    for prompt in prompts[:5]:
        llm.generate([prompt], params)
    graphs = llm.engine.runner.graphs
    if graphs is None:
        raise SystemExit("the engine captured no CUDA graphs")
    stamps = {}
    run = graphs.run

    def stamped(batch):
        stamps["launch"] = time.perf_counter()
        out = run(batch)
        stamps["launched"] = time.perf_counter()
        return out

    graphs.run = stamped
    rows = []
    for prompt in prompts[5:]:
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate([prompt], params)
        end = time.perf_counter()
        rows.append((end - start, stamps["launch"] - start, stamps["launched"] - stamps["launch"],
                     end - stamps["launched"]))
    for i, name in enumerate(("TTFT", "host before the graph", "graph launch call", "the rest")):
        values = [row[i] * 1e3 for row in rows]
        print(f"{name:24s} median {statistics.median(values):7.3f} ms  min {min(values):7.3f}")
    prefills = [key for key in graphs.graphs if key[0] == "prefill" and key[1] >= args.prompt_len]
    if prefills:
        graph = graphs.graphs[min(prefills)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(50):
            graph.replay()
        torch.cuda.synchronize()
        print(f"{'prefill graph ' + str(min(prefills)[1]):24s} {1e3 * (time.perf_counter() - start) / 50:7.3f} ms")


if __name__ == "__main__":
    main()
