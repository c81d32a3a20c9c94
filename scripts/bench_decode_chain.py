"""The persistent decode chain (kernels/decode_chain.py) against the kernels it replaces, per decoder layer.

    python scripts/bench_decode_chain.py [--shapes llama-3.2-1b,smollm2-135m,qwen3-0.6b] [--m 1,16] [--out c.json]

Per shape and rows M, over LAYERS layers of distinct random weights (together larger than L2, as a decode
step streams them), all in one CUDA graph, the time per layer of:
  separate   what the decoder runs without the chain: o (decode_linear), norm + gate/up + SiLU·mul
             (fused_norm_linear), down (decode_linear), the next input norm + q/k/v (fused or norm kernel +
             decode_linear, as DecoderLayer.decode_qkv picks)
  chain      DecodeChain: the four phases in one persistent kernel, grid barriers between them
  split      the same phases as four launches (PHOTONINFER_DECODE_CHAIN=split)
  phaseN      each phase alone (a launch per layer), against separate_* (the kernels it replaces)
The attention kernels that sit between layers in a real step are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gemv import graph_time_us  # noqa: E402

from photoninfer.bench.random_model import SHAPES  # noqa: E402
from photoninfer.kernels import decode_chain, norm_linear  # noqa: E402
from photoninfer.kernels.rmsnorm import fused_add_rms_norm  # noqa: E402

EPS = 1e-5
COLD_BYTES = 400 << 20  # the layers' weights together: several times the 50 MiB L2


def make_layers(cfg, count):
    h, q, i = cfg["hidden_size"], cfg["num_attention_heads"] * cfg["head_dim"], cfg["intermediate_size"]
    n_qkv = q + 2 * cfg["num_key_value_heads"] * cfg["head_dim"]

    def rand(*shape):
        return (torch.randn(*shape, device="cuda") * shape[-1] ** -0.5).to(torch.bfloat16)

    def norm():
        return (1 + 0.1 * torch.randn(h, device="cuda")).to(torch.bfloat16)

    return [dict(o_weight=rand(h, q), post_norm=norm(), post_eps=EPS, gate_up=rand(2 * i, h), down=rand(h, i),
                 next_norm=norm(), next_eps=EPS, next_qkv=rand(n_qkv, h)) for _ in range(count)]


def separate(attn, residual, layer):
    """The kernels DecoderLayer runs for the same work (decode_linears on, as on Hopper)."""
    o = norm_linear.decode_linear(attn, layer["o_weight"], weights_ahead=True)
    act, h1 = norm_linear.fused_norm_linear(o, layer["post_norm"], EPS, layer["gate_up"], residual=residual,
                                            gated=True)
    down = norm_linear.decode_linear(act, layer["down"])
    if residual.shape[1] <= norm_linear.FUSE_QKV_MAX_K:
        return norm_linear.fused_norm_linear(down, layer["next_norm"], EPS, layer["next_qkv"], residual=h1)
    normed, h2 = fused_add_rms_norm(down, h1, layer["next_norm"], EPS)
    return norm_linear.decode_linear(normed, layer["next_qkv"]), h2


def separate_qkv(x, residual, layer):
    """The next layer's input norm (with the residual add) and q/k/v, as DecoderLayer.decode_qkv runs them."""
    if residual.shape[1] <= norm_linear.FUSE_QKV_MAX_K:
        return norm_linear.fused_norm_linear(x, layer["next_norm"], EPS, layer["next_qkv"], residual=residual)
    normed, h = fused_add_rms_norm(x, residual, layer["next_norm"], EPS)
    return norm_linear.decode_linear(normed, layer["next_qkv"]), h


def bench(shape: str, m: int) -> dict:
    cfg = dict(SHAPES[shape][1])
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    h, q = cfg["hidden_size"], cfg["num_attention_heads"] * cfg["head_dim"]
    probe = make_layers(cfg, 1)[0]
    layer_bytes = sum(t.numel() * 2 for t in probe.values() if isinstance(t, torch.Tensor))
    layers = make_layers(cfg, max(2, min(16, COLD_BYTES // layer_bytes)))
    attn = torch.randn(m, q, device="cuda").to(torch.bfloat16)
    residual = torch.randn(m, h, device="cuda").to(torch.bfloat16)
    chain = decode_chain.DecodeChain(torch.device("cuda"))
    expected = decode_chain.decode_chain_reference(attn, residual, **layers[0])[1].float()
    got = chain(attn, residual, **layers[0])[1].float()
    error = float((got - expected).abs().max() / expected.abs().max())
    row = {"shape": shape, "m": m, "layers": len(layers), "layer_mbytes": layer_bytes / 1e6, "chain_error": error,
           "separate_us": graph_time_us([lambda lay=lay: separate(attn, residual, lay) for lay in layers]),
           "chain_us": graph_time_us([lambda lay=lay: chain(attn, residual, **lay) for lay in layers])}
    for phase in range(4):  # each phase alone (split tiles), launched once per layer, against the kernels it replaces
        row[f"phase{phase}_us"] = graph_time_us([lambda lay=lay: chain(attn, residual, **lay, phases=(phase, phase))
                                                 for lay in layers])
    h1 = residual.clone()
    act = torch.randn(m, layers[0]["down"].shape[1], device="cuda").to(torch.bfloat16)
    row["separate_o_us"] = graph_time_us([lambda lay=lay: norm_linear.decode_linear(attn, lay["o_weight"], weights_ahead=True)
                                          for lay in layers])
    row["separate_gate_up_us"] = graph_time_us([lambda lay=lay: norm_linear.fused_norm_linear(
        h1, lay["post_norm"], EPS, lay["gate_up"], residual=residual, gated=True) for lay in layers])
    row["separate_down_us"] = graph_time_us([lambda lay=lay: norm_linear.decode_linear(act, lay["down"]) for lay in layers])
    row["separate_qkv_us"] = graph_time_us([lambda lay=lay: separate_qkv(h1, residual, lay) for lay in layers])
    os.environ[decode_chain.MODE_ENV] = "split"
    row["split_us"] = graph_time_us([lambda lay=lay: chain(attn, residual, **lay) for lay in layers])
    os.environ[decode_chain.MODE_ENV] = "1"
    decode_chain.MIN_SPAN = 32
    row["chain-span32_us"] = graph_time_us([lambda lay=lay: chain(attn, residual, **lay) for lay in layers])
    decode_chain.MIN_SPAN = 0
    default_limit = decode_chain.PREFETCH_LIMIT
    decode_chain.PREFETCH_LIMIT = 0
    row["chain-prefetch0k_us"] = graph_time_us([lambda lay=lay: chain(attn, residual, **lay) for lay in layers])
    decode_chain.PREFETCH_LIMIT = default_limit
    row["weights_at_3tbs_us"] = layer_bytes / 3e12 * 1e6
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-3.2-1b,smollm2-135m,qwen3-0.6b")
    parser.add_argument("--m", default="1,16")
    parser.add_argument("--out", default="decode_chain.json")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    rows = []
    for shape in args.shapes.split(","):
        for m in (int(v) for v in args.m.split(",")):
            rows.append(bench(shape, m))
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
