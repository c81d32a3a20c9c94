"""How close a fast dtype/format stays to the float32 reference on a real model (default: the bundled SmolLM2).

Two measures, both against dtype="float32" in the same process:
  * greedy agreement: for each chat prompt, the fraction of the generated tokens before the first token
    that differs from the reference's (1.0 = identical); reported as the mean over prompts;
  * top-1 agreement: over a long English text, teacher-forced, the fraction of positions where the arg-max
    of the logits is the same token.

Run: python -m photoninfer.quant.accuracy [--model PATH] [--dtype auto] [--max-tokens 128] [--text FILE]
"""

from __future__ import annotations

import argparse
import json
from typing import Optional

import torch

from photoninfer.config import packs_weights, resolve_dtype
from photoninfer.model.loader import build_model, default_model_path, load_checkpoint
from photoninfer.runner.attention import make_attention_backend
from photoninfer.runner.batch import ForwardBatch

PROMPTS = (
    "What is the capital of France? Explain in detail.",
    "Write a short poem about the sea.",
    "Explain how a rainbow forms.",
    "Give me three tips for learning a new language.",
    "What is the difference between a list and a tuple in Python?",
    "Describe the water cycle for a ten-year-old.",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "Summarize the plot of Romeo and Juliet.",
    "How do vaccines work?",
)
DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"


def greedy_agreement(model: str, dtype: str, max_tokens: int, prompts=PROMPTS, threads: Optional[int] = None) -> dict:
    from photoninfer import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    runs = {}
    for name in ("float32", dtype):
        llm = LLM(model, dtype=name, device="cpu", threads=threads)
        runs[name] = [o.outputs[0].token_ids for o in llm.chat(conversations, params)]
        del llm
    fractions = [_prefix_fraction(ref, got) for ref, got in zip(runs["float32"], runs[dtype])]
    return {"prompts": len(prompts), "max_tokens": max_tokens, "mean_prefix_fraction": sum(fractions) / len(fractions),
            "identical": sum(f == 1.0 for f in fractions), "per_prompt": fractions}


def _prefix_fraction(reference: list[int], candidate: list[int]) -> float:
    same = 0
    for a, b in zip(reference, candidate):
        if a != b:
            break
        same += 1
    return same / max(len(reference), 1)


@torch.inference_mode()
def top1_agreement(model: str, dtype: str, text_path: str, max_positions: int = 2048, window: int = 512) -> dict:
    """Teacher-forced arg-max agreement over the first `max_positions` tokens of a text, in windows."""
    from photoninfer.model.tokenizer import load_tokenizer

    with open(text_path, encoding="utf-8") as f:
        ids = load_tokenizer(model).encode(f.read())[:max_positions]
    checkpoint = load_checkpoint(model)
    device = torch.device("cpu")
    ref_model = build_model(checkpoint, device, torch.float32)
    fast_dtype = resolve_dtype(dtype, device)
    fast_model = build_model(checkpoint, device, fast_dtype, pack=packs_weights(dtype, device))
    agree = total = 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor(ids[start:start + window])
        ref = _argmax_per_position(ref_model, chunk, torch.float32)
        fast = _argmax_per_position(fast_model, chunk, fast_dtype)
        agree += int((ref == fast).sum())
        total += len(chunk)
    return {"text": text_path, "positions": total, "top1_agreement": agree / total}


def _argmax_per_position(model, tokens: torch.Tensor, dtype: torch.dtype, block_size: int = 16) -> torch.Tensor:
    """One prefill of `tokens` through a private paged KV cache -> arg-max token at every position."""
    cfg = model.config
    num_blocks = -(-len(tokens) // block_size)
    caches = [torch.zeros(2, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim, dtype=dtype)
              for _ in range(cfg.num_hidden_layers)]
    positions = torch.arange(len(tokens))
    if model.attention is None:
        model.attention = make_attention_backend(tokens.device, cfg.head_dim**-0.5, block_size)
    batch = ForwardBatch.for_attention(positions.clone(), [0, len(tokens)], [len(tokens)], [list(range(num_blocks))])
    meta = model.attention.prepare(batch)
    hidden = model(tokens, positions, caches, meta)
    return model.compute_logits(hidden).argmax(-1)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path (default: the bundled SmolLM2 GGUF)")
    parser.add_argument("--dtype", default="auto", help="the mode judged against float32")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--positions", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    model = args.model or default_model_path()
    report = {"model": model, "dtype": args.dtype,
              "greedy": greedy_agreement(model, args.dtype, args.max_tokens, threads=args.threads),
              "top1": top1_agreement(model, args.dtype, args.text, args.positions)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
