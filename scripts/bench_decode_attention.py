"""The paged decode attention kernel as a decode step runs it at small batches: tiles and partition sizes.

    python scripts/bench_decode_attention.py [--shapes llama-3.2-1b,smollm2-135m,qwen3-0.6b] [--m 1,16] [--out a.json]

At one or a few sequences the kernel reads little (Llama-3.2-1B, 228 tokens of context: 0.5 MB a layer) and
its time is a chain of dependent loads: the step's rope and K/V write, the block table, then the tiles. More,
shorter partitions put more programs on the chain's length; they cost a merge. Each candidate runs as a CUDA
graph over one cache per layer (contexts uniform in 100..356, as in the standard bench's decode), with the
step's unrotated q/k/v (the kernel rotates them and writes K/V), the backend's partition cap, and the grid a
graph replays (hint = max_model_len): scripts/bench_gemv.py's timing, so PDL overlaps neighbours on Hopper.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gemv import close_to, sweep, sweep_arguments  # noqa: E402

from photoninfer.kernels.paged_attention import (DEFAULT_PARTITION, DecodeWorkspace, NewTokens,  # noqa: E402
                                                 decode_tiles, paged_decode_attention)
from photoninfer.model.layers import RotaryEmbedding  # noqa: E402

SHAPES = {  # name -> (q heads, kv heads, head dim, layers, q/k-norm)
    "llama-3.2-1b": (32, 8, 64, 16, False),
    "smollm2-135m": (9, 3, 64, 30, False),
    "qwen3-0.6b": (16, 8, 128, 28, True),
}
BLOCK_SIZE = 16
MAX_MODEL_LEN = 4096


def configs() -> list[SimpleNamespace]:
    swept = [SimpleNamespace(partition_size=p, block_n=n, num_warps=w, num_stages=s)
             for p, n, w, s in itertools.product((32, 64, 128, 256), (16, 32, 64), (2, 4), (2, 3)) if n <= p]
    return swept


def layer_inputs(m: int, hq: int, hkv: int, d: int, qk_norm: bool, rope: RotaryEmbedding, seed: int) -> dict:
    """One layer's cache (blocks in random order) holding contexts of 100..356 tokens, and the step's tokens."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = torch.randint(100, 357, (m,), generator=gen)
    blocks = (seq_lens + BLOCK_SIZE - 1) // BLOCK_SIZE
    order = torch.randperm(int(blocks.sum()) + 1, generator=gen) + 0
    tables = torch.zeros(m, MAX_MODEL_LEN // BLOCK_SIZE, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks.tolist()):
        tables[i, :n] = order[used:used + n]
        used += n
    last = seq_lens - 1
    slots = tables[torch.arange(m), last // BLOCK_SIZE].long() * BLOCK_SIZE + last % BLOCK_SIZE
    num_blocks = used + 1

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16).cuda()

    norms = (randn(d), randn(d), 1e-6) if qk_norm else ()
    return dict(q=randn(m, hq, d), k_cache=randn(num_blocks, BLOCK_SIZE, hkv, d),
                v_cache=randn(num_blocks, BLOCK_SIZE, hkv, d), block_tables=tables.cuda(),
                seq_lens=seq_lens.to(torch.int32).cuda(), out=torch.empty(m, hq, d, dtype=torch.bfloat16).cuda(),
                new=NewTokens(randn(m, hkv, d), randn(m, hkv, d), last.cuda(), rope.cos, rope.sin, slots.cuda(),
                              *norms))


def main() -> int:
    args = sweep_arguments("decode_attention.json")
    sms = torch.cuda.get_device_properties().multi_processor_count
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for shape in args.shapes.split(","):
        hq, hkv, d, layers, qk_norm = SHAPES[shape]
        rope = RotaryEmbedding(d, MAX_MODEL_LEN, 500000.0, None).cuda()
        for m in (int(v) for v in args.m.split(",")):
            inputs = [layer_inputs(m, hq, hkv, d, qk_norm, rope, seed) for seed in range(layers)]
            cap = max(1, -(-2 * sms // (m * hkv)))  # TritonPagedAttention.decode_partitions

            workspaces = {}  # per partition size, allocated at the (untimed) first call, outside the graph

            def run(layer, config):
                p = config.partition_size
                if p not in workspaces:
                    workspaces[p] = DecodeWorkspace.allocate(m, hq, d, MAX_MODEL_LEN, "cuda", p, cap)
                return paged_decode_attention(
                    layer["q"], layer["k_cache"], layer["v_cache"], layer["block_tables"], layer["seq_lens"],
                    d ** -0.5, layer["out"], MAX_MODEL_LEN, partition_size=p, max_num_partitions=cap,
                    workspace=workspaces[p], block_n=config.block_n, num_warps=config.num_warps,
                    num_stages=config.num_stages, new_tokens=layer["new"])

            block_n, warps, stages = decode_tiles(m, hkv)
            default = SimpleNamespace(partition_size=DEFAULT_PARTITION, block_n=block_n, num_warps=warps,
                                      num_stages=stages)
            expected = run(inputs[0], default).clone()
            row = {"shape": shape, "m": m, "partition_cap": cap,
                   **sweep([default] + configs(), lambda layer, c: run(layer, c), inputs, close_to(expected))}
            row["default"] = row["timings"][0]
            results["rows"].append(row)
            best = row["best"]
            print(f"{shape:<13} M={m:<3} default {row['default'].get('us', float('nan')):6.2f} us | best "
                  f"{best['us']:6.2f} us {best['config']}", flush=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
