"""The model's own CPU time per step, without the engine: decode steps at a few batch sizes and one prefill,
on the bundled SmolLM2 GGUF (or --model), then optionally the top torch ops of a decode step.

    python scripts/cpu_decode_profile.py [--dtype auto] [--batch 1,16] [--context 128] [--profile 1]
                                         [--threads 1 --cpu-time]

Each figure is the best of --repeat runs (the machine may be shared). The forward, the LM head on the last
row of each sequence and an arg-max are timed, as the engine runs them; scheduling and sampling are not.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from photoninfer.config import packs_weights, resolve_dtype, set_cpu_threads  # noqa: E402
from photoninfer.model.loader import build_model, default_model_path, load_checkpoint  # noqa: E402
from photoninfer.runner.attention import make_attention_backend  # noqa: E402
from timing import best_ms  # noqa: E402
from photoninfer.runner.batch import ForwardBatch  # noqa: E402

BLOCK = 16


class Harness:
    """A model with a private paged KV cache; sequence i owns a contiguous run of blocks."""

    def __init__(self, model, dtype, max_seqs: int, max_len: int):
        cfg = model.config
        self.model, self.blocks_per_seq = model, -(-max_len // BLOCK)
        num_blocks = max_seqs * self.blocks_per_seq
        self.caches = [torch.zeros(2, num_blocks, BLOCK, cfg.num_key_value_heads, cfg.head_dim, dtype=dtype)
                       for _ in range(cfg.num_hidden_layers)]
        model.attention = make_attention_backend(torch.device("cpu"), cfg.head_dim**-0.5, BLOCK)

    def step(self, starts: list[int], q_lens: list[int]) -> torch.Tensor:
        """Sequences 0..S-1 compute q_lens[i] tokens at positions starts[i]...; returns the arg-max per sequence."""
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, q_lens)])
        seq_of = torch.cat([torch.full((n,), i) for i, n in enumerate(q_lens)])
        slots = seq_of * self.blocks_per_seq * BLOCK + positions
        query_start = [0]
        for n in q_lens:
            query_start.append(query_start[-1] + n)
        tables = [list(range(i * self.blocks_per_seq, (i + 1) * self.blocks_per_seq)) for i in range(len(q_lens))]
        batch = ForwardBatch.for_attention(slots, query_start, [s + n for s, n in zip(starts, q_lens)], tables)
        ids = (positions * 7 + seq_of * 13) % 1000 + 100
        hidden = self.model(ids, positions, self.caches, self.model.attention.prepare(batch))
        last = torch.tensor(query_start[1:]) - 1
        return self.model.compute_logits(hidden[last]).argmax(-1)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--context", type=int, default=128, help="tokens already in each sequence's cache")
    parser.add_argument("--prefill", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profile", default="", help="batch sizes to profile with torch.profiler")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the process's CPU time (with --threads 1: robust on a shared machine)")
    args = parser.parse_args()
    threads = set_cpu_threads(args.threads)
    device = torch.device("cpu")
    dtype = resolve_dtype(args.dtype, device)
    model = build_model(load_checkpoint(args.model or default_model_path()), device, dtype,
                        pack=packs_weights(args.dtype, device))
    batches = [int(b) for b in args.batch.split(",")]
    h = Harness(model, dtype, max(batches + [1]), args.context + args.prefill + args.steps * args.repeat + 8)
    clock = time.process_time if args.cpu_time else time.perf_counter
    print(f"dtype {args.dtype} ({dtype}), {threads} threads, context {args.context}, "
          f"{'CPU' if args.cpu_time else 'wall'} time")
    for b in batches:
        h.step([0] * b, [args.context] * b)  # fill the caches
        ms = best_ms(lambda: h.step([args.context] * b, [1] * b), args.repeat, args.steps, clock, warm_up=False)
        print(f"decode batch {b:3d}: {ms:7.2f} ms/step  {b * 1000 / ms:7.1f} tok/s")
    ms = best_ms(lambda: h.step([0], [args.prefill]), args.repeat, 1, clock, warm_up=False)
    print(f"prefill {args.prefill} tokens: {ms:7.2f} ms")
    for b in [int(b) for b in args.profile.split(",") if b]:
        from torch.profiler import ProfilerActivity, profile

        h.step([0] * b, [args.context] * b)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                h.step([args.context] * b, [1] * b)
        print(f"\n=== batch {b}: {args.steps} decode steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
