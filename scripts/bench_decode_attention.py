"""The paged decode attention kernel as a decode step runs it: tiles and partition sizes, or the split cap.

    python scripts/bench_decode_attention.py [--shapes llama-3.2-1b,smollm2-135m,qwen3-0.6b] [--m 1,16]
        [--contexts 100,356] [--kv-dtype bf16|fp8] [--sweep tiles|caps] [--out a.json]

At one or a few sequences the kernel reads little (Llama-3.2-1B, 228 tokens of context: 0.5 MB a layer) and
its time is a chain of dependent loads: the step's rope and K/V write, the block table, then the tiles. More,
shorter partitions put more programs on the chain's length; they cost a merge (`--sweep tiles`). At full
batches with uneven contexts (the nano-vllm workload: 100..2048 tokens) one program per (sequence, kv head)
leaves the longest contexts running alone at the end; `--sweep caps` splits them over up to `cap` programs.
Each candidate runs as a CUDA graph over one cache per layer (up to 4 GB of them), with the step's unrotated
q/k/v (the kernel rotates them and writes K/V) and the grid a graph replays (hint = --max-model-len):
scripts/bench_gemv.py's timing, so PDL overlaps neighbours on Hopper.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gemv import close_to, sweep  # noqa: E402

from photoninfer.kernels.paged_attention import (DecodeWorkspace, NewTokens, decode_tiles,  # noqa: E402
                                                 default_partition, paged_decode_attention)
from photoninfer.model.layers import RotaryEmbedding  # noqa: E402
from photoninfer.runner.attention import TritonPagedAttention  # noqa: E402

SHAPES = {  # name -> (q heads, kv heads, head dim, layers, q/k-norm)
    "llama-3.2-1b": (32, 8, 64, 16, False),
    "smollm2-135m": (9, 3, 64, 30, False),
    "qwen3-0.6b": (16, 8, 128, 28, True),
}
BLOCK_SIZE = 16
CACHE_BYTES = 4 << 30  # the layers' caches together, at most


def tile_configs(cap: int, args) -> list[SimpleNamespace]:
    lists = [[int(v) for v in values.split(",")]
             for values in (args.partitions, args.block_n, args.warps, args.stages, args.maxnreg)]
    return [SimpleNamespace(partition_size=p, block_n=n, num_warps=w, num_stages=s, cap=cap, max_registers=r or None)
            for p, n, w, s, r in itertools.product(*lists) if n <= p]


def cap_configs(tiles) -> list[SimpleNamespace]:
    block_n, warps, stages, cap_registers = tiles
    return [SimpleNamespace(partition_size=p, block_n=block_n, num_warps=warps, num_stages=stages, cap=c,
                            max_registers=cap_registers)
            for p, c in itertools.product((64, 256, 512), (1, 2, 4, 8)) if p >= block_n]


def layer_inputs(m: int, shape: tuple, contexts: tuple[int, int], max_model_len: int, kv_dtype: torch.dtype,
                 rope: RotaryEmbedding, seed: int) -> dict:
    """One layer's cache (blocks in random order) holding contexts uniform in `contexts`, and the step's tokens."""
    hq, hkv, d, _, qk_norm = shape
    gen = torch.Generator().manual_seed(seed)
    seq_lens = torch.randint(contexts[0], contexts[1] + 1, (m,), generator=gen)
    blocks = (seq_lens + BLOCK_SIZE - 1) // BLOCK_SIZE
    order = torch.randperm(int(blocks.sum()) + 1, generator=gen)
    tables = torch.zeros(m, max_model_len // BLOCK_SIZE, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks.tolist()):
        tables[i, :n] = order[used:used + n]
        used += n
    last = seq_lens - 1
    slots = tables[torch.arange(m), last // BLOCK_SIZE].long() * BLOCK_SIZE + last % BLOCK_SIZE
    num_blocks = used + 1

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda").to(dtype)

    norms = (randn(d), randn(d), 1e-6) if qk_norm else ()
    return dict(q=randn(m, hq, d), k_cache=randn(num_blocks, BLOCK_SIZE, hkv, d, dtype=kv_dtype),
                v_cache=randn(num_blocks, BLOCK_SIZE, hkv, d, dtype=kv_dtype), block_tables=tables.cuda(),
                seq_lens=seq_lens.to(torch.int32).cuda(), out=torch.empty(m, hq, d, dtype=torch.bfloat16).cuda(),
                new=NewTokens(randn(m, hkv, d), randn(m, hkv, d), last.cuda(), rope.cos, rope.sin, slots.cuda(),
                              *norms))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--m", default="1,16")
    parser.add_argument("--contexts", default="100,356", help="context lengths, uniform in LO,HI")
    parser.add_argument("--max-model-len", type=int, default=4096, help="the hint a CUDA graph's grid is sized by")
    parser.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16")
    parser.add_argument("--sweep", choices=("tiles", "caps"), default="tiles")
    parser.add_argument("--partitions", default="32,64,128,256", help="partition sizes the tile sweep tries")
    parser.add_argument("--block-n", default="16,32,64", help="key tiles the tile sweep tries")
    parser.add_argument("--warps", default="2,4")
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--maxnreg", default="0", help="register caps a thread to try (0: the compiler's choice)")
    parser.add_argument("--out", default="decode_attention.json")
    args = parser.parse_args()
    contexts = tuple(int(v) for v in args.contexts.split(","))
    kv_dtype = torch.float8_e4m3fn if args.kv_dtype == "fp8" else torch.bfloat16
    backend = TritonPagedAttention(1.0, BLOCK_SIZE)  # its split cap (decode_partitions), as in a decode step
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args), "rows": []}
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        hq, hkv, d, layers, _ = shape
        rope = RotaryEmbedding(d, args.max_model_len, 500000.0, None).cuda()
        for m in (int(v) for v in args.m.split(",")):
            layer_bytes = m * sum(contexts) / 2 * hkv * d * 2 * torch.finfo(kv_dtype).bits / 8
            copies = int(max(2, min(layers, CACHE_BYTES // layer_bytes)))
            inputs = [layer_inputs(m, shape, contexts, args.max_model_len, kv_dtype, rope, seed)
                      for seed in range(copies)]
            cap = backend.decode_partitions(m, hkv)
            workspaces = {}  # per (partition, cap), allocated at the (untimed) first call, outside the graph

            def run(layer, config):
                key = (config.partition_size, config.cap)
                if key not in workspaces:
                    workspaces[key] = DecodeWorkspace.allocate(m, hq, d, args.max_model_len, "cuda", *key)
                return paged_decode_attention(
                    layer["q"], layer["k_cache"], layer["v_cache"], layer["block_tables"], layer["seq_lens"],
                    d ** -0.5, layer["out"], args.max_model_len, partition_size=config.partition_size,
                    max_num_partitions=config.cap, workspace=workspaces[key], block_n=config.block_n,
                    num_warps=config.num_warps, num_stages=config.num_stages, new_tokens=layer["new"],
                    max_registers=config.max_registers)

            tiles = decode_tiles(m, hkv, kv_dtype == torch.float8_e4m3fn)
            default = SimpleNamespace(partition_size=default_partition(tiles[0]), block_n=tiles[0],
                                      num_warps=tiles[1], num_stages=tiles[2], cap=cap,
                                      max_registers=tiles.max_registers)
            expected = run(inputs[0], default).clone()
            candidates = tile_configs(cap, args) if args.sweep == "tiles" else cap_configs(tiles)
            row = {"shape": name, "m": m, "partition_cap": cap, "copies": copies,
                   **sweep([default] + candidates, lambda layer, c: run(layer, c), inputs, close_to(expected))}
            row["default"] = row["timings"][0]
            results["rows"].append(row)
            best = row["best"]
            print(f"{name:<13} M={m:<3} default {row['default'].get('us', float('nan')):7.2f} us | best "
                  f"{best['us']:7.2f} us {best['config']}", flush=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
            del inputs
    return 0


if __name__ == "__main__":
    sys.exit(main())
