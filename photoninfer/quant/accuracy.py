"""How close a fast dtype/format stays to the float32 reference on a real model (default: the bundled SmolLM2).

Two measures, both against dtype="float32" in the same process:
  * greedy agreement: for each chat prompt, the fraction of the generated tokens before the first token
    that differs from the reference's (1.0 = identical); reported as the mean over prompts. It swings widely
    with tiny changes (one near-tie flip early ends a prompt), so beside it both modes are teacher-forced on
    the reference's continuations: the fraction of positions whose arg-max flips, and the mean KL;
  * top-1 agreement: over a long English text, teacher-forced, the fraction of positions where the arg-max
    of the logits is the same token.

With --sources, a third measure splits the packed path's error into its roundings, each emulated alone in a
float32 model (teacher-forced KL divergence from float32 and top-1 agreement on the text): the 4-bit weights'
scale and zero in bf16 ("weights"), the matmul inputs in bf16 ("inputs"), the matmul outputs in bf16
("outputs", the kernel's output dtype), all three together, and the real packed path.

Run: python -m photoninfer.quant.accuracy [--model PATH] [--dtype auto] [--max-tokens 128] [--text FILE] [--sources]
"""

from __future__ import annotations

import argparse
import json
from typing import Optional

import torch

from photoninfer.config import packs_weights, resolve_dtype
from photoninfer.model.llama import CausalLM
from photoninfer.model.loader import build_model, default_model_path, load_checkpoint
from photoninfer.quant.gguf_blocks import GROUP_SIZE, INT4_TYPES, GGUFBlocks, decode_int4
from photoninfer.quant.int4 import Int4Linear, bf16_scales_and_zeros
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
    runs, prompt_ids = {}, []
    for name in ("float32", dtype):
        llm = LLM(model, dtype=name, device="cpu", threads=threads)
        outputs = llm.chat(conversations, params)
        runs[name] = [o.outputs[0].token_ids for o in outputs]
        prompt_ids = [o.prompt_token_ids for o in outputs]
        del llm
    fractions = [_prefix_fraction(ref, got) for ref, got in zip(runs["float32"], runs[dtype])]
    return {"prompts": len(prompts), "max_tokens": max_tokens, "mean_prefix_fraction": sum(fractions) / len(fractions),
            "identical": sum(f == 1.0 for f in fractions), "per_prompt": fractions,
            "teacher_forced": teacher_forced_flips(model, dtype, prompt_ids, runs["float32"])}


@torch.inference_mode()
def teacher_forced_flips(model: str, dtype: str, prompts: list[list[int]], continuations: list[list[int]]) -> dict:
    """Both modes teacher-forced on the float32 greedy continuations: the fraction of generated positions whose
    arg-max differs (a fork a greedy run would take) and the mean KL divergence. Unlike the prefix fraction,
    every position counts, so one early near-tie does not decide a whole prompt: a steadier measure."""
    checkpoint = load_checkpoint(model)
    device = torch.device("cpu")
    fast_dtype = resolve_dtype(dtype, device)
    reference_model = build_model(checkpoint, device, torch.float32)
    fast_model = build_model(checkpoint, device, fast_dtype, pack=packs_weights(dtype, device))
    flips = kl = 0.0
    total = 0
    for prompt, generated in zip(prompts, continuations):
        tokens = torch.tensor(list(prompt) + list(generated))
        rows = slice(len(prompt) - 1, len(tokens) - 1)  # the positions that predict the generated tokens
        ref = _logits(reference_model, tokens, torch.float32)[rows].log_softmax(-1)
        fast = _logits(fast_model, tokens, fast_dtype)[rows].log_softmax(-1)
        flips += int((fast.argmax(-1) != ref.argmax(-1)).sum())
        kl += float((ref.exp() * (ref - fast)).sum())
        total += len(generated)
    return {"positions": total, "flip_rate": flips / total, "mean_kl": kl / total}


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
    return _logits(model, tokens, dtype, block_size).argmax(-1)


def _logits(model, tokens: torch.Tensor, dtype: torch.dtype, block_size: int = 16) -> torch.Tensor:
    """One prefill of `tokens` through a private paged KV cache -> float32 logits at every position."""
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
    return model.compute_logits(hidden).float()


class _EmulatedRounding(torch.nn.Module):
    """A float32 Linear that applies the packed kernel's roundings named in `rounded` (a set shared by all)."""

    def __init__(self, exact: torch.Tensor, bf16_scaled: torch.Tensor, rounded: set):
        super().__init__()
        self.exact, self.bf16_scaled, self.rounded = exact, bf16_scaled, rounded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.bf16_scaled if "weights" in self.rounded else self.exact
        y = torch.nn.functional.linear(_bf16(x) if "inputs" in self.rounded else x, weight)
        return _bf16(y) if "outputs" in self.rounded else y


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def _bf16_scaled_weight(blocks):
    """A 4-bit GGUF tensor as the packed kernel sees it (bf16 scale and zero), in float32; others as stored."""
    if not isinstance(blocks, GGUFBlocks) or blocks.type_name not in INT4_TYPES:
        return blocks
    codes, scales, biases = decode_int4(blocks)
    scale, zero = (t.float().repeat_interleave(GROUP_SIZE, 1) for t in bf16_scales_and_zeros(scales, biases))
    return (codes.float() - 8) * scale + zero


@torch.inference_mode()
def rounding_sources(model: str, text_path: str, max_positions: int = 1024, window: int = 512) -> dict:
    """KL(float32 || variant) per position (mean) and top-1 agreement for each rounding of the packed path."""
    from photoninfer.model.tokenizer import load_tokenizer

    with open(text_path, encoding="utf-8") as f:
        ids = load_tokenizer(model).encode(f.read())[:max_positions]
    chunks = [torch.tensor(ids[start:start + window]) for start in range(0, len(ids), window)]
    checkpoint = load_checkpoint(model)
    device = torch.device("cpu")
    emulated = build_model(checkpoint, device, torch.float32)
    bf16_scaled = CausalLM(checkpoint.config)  # float32, loaded with the kernel's view of the 4-bit weights
    bf16_scaled.load_weights(((name, _bf16_scaled_weight(t)) for name, t in checkpoint.weights()),
                             source=checkpoint.path, total=checkpoint.num_tensors)
    packed = build_model(checkpoint, device, torch.float32, pack=True)
    rounded: set = set()
    for name, module in packed.named_modules():  # the layers the fast path packs get the emulation
        if isinstance(module, Int4Linear):
            parent, _, attr = name.rpartition(".")
            exact = emulated.get_submodule(name).weight
            setattr(emulated.get_submodule(parent), attr,
                    _EmulatedRounding(exact, bf16_scaled.get_submodule(name).weight, rounded))
    del bf16_scaled
    reference = torch.cat([_logits(emulated, c, torch.float32) for c in chunks]).log_softmax(-1)
    report = {"text": text_path, "positions": len(reference)}
    for label, sources in (("weights", {"weights"}), ("inputs", {"inputs"}), ("outputs", {"outputs"}),
                           ("all three", {"weights", "inputs", "outputs"}), ("packed", None)):
        rounded.clear()
        rounded.update(sources or ())
        model_ = packed if sources is None else emulated
        got = torch.cat([_logits(model_, c, torch.float32) for c in chunks]).log_softmax(-1)
        kl = (reference.exp() * (reference - got)).sum(-1).mean().item()
        top1 = (got.argmax(-1) == reference.argmax(-1)).float().mean().item()
        report[label] = {"kl": kl, "top1_agreement": top1}
    return report


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path (default: the bundled SmolLM2 GGUF)")
    parser.add_argument("--dtype", default="auto", help="the mode judged against float32")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--positions", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sources", action="store_true", help="also split the error into its roundings")
    args = parser.parse_args(argv)
    model = args.model or default_model_path()
    report = {"model": model, "dtype": args.dtype,
              "greedy": greedy_agreement(model, args.dtype, args.max_tokens, threads=args.threads),
              "top1": top1_agreement(model, args.dtype, args.text, args.positions)}
    if args.sources:
        report["sources"] = rounding_sources(model, args.text, min(args.positions, 1024))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
