"""Random-weight checkpoints of real model shapes, for benchmarks when no real checkpoint is at hand.

The directory holds config.json, model.safetensors and a synthetic word-level tokenizer covering the whole
vocabulary (token i is the word "<i>"), so both PhotonInfer and HF transformers load it unchanged.
"""

from __future__ import annotations

import json
import os

import torch

from photoninfer.errors import ConfigError

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# shape name -> (transformers family, config settings)
SHAPES = {
    # Llama-3.2-1B: hidden 2048, 16 layers, 32 heads, 8 KV heads, ffn 8192, vocab 128256, tied embeddings
    "llama-3.2-1b": ("llama", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
        max_position_embeddings=131072, rope_scaling=_LLAMA3_ROPE)),
    # Qwen3-0.6B: hidden 1024, 28 layers, 16 heads of 128 (wider than hidden/heads), 8 KV heads, ffn 3072,
    # vocab 151936, tied, per-head q/k RMSNorm
    "qwen3-0.6b": ("qwen3", dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
        rms_norm_eps=1e-6, max_position_embeddings=40960)),
    # SmolLM2-135M: hidden 576, 30 layers, 9 heads, 3 KV heads, ffn 1536, vocab 49152, tied
    "smollm2-135m": ("llama", dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
        max_position_embeddings=8192)),
    # a few-MB model for smoke tests of the benchmark itself
    "tiny": ("llama", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, max_position_embeddings=2048)),
}


def shape_config(shape: str):
    """The transformers config of a named shape (BOS 0, EOS 1: the word tokenizer's ids)."""
    from transformers import LlamaConfig, Qwen3Config

    if shape not in SHAPES:
        raise ConfigError(f"unknown random shape {shape!r}; known: {', '.join(SHAPES)}")
    family, settings = SHAPES[shape]
    config_cls = LlamaConfig if family == "llama" else Qwen3Config
    return config_cls(bos_token_id=0, eos_token_id=1, initializer_range=0.02, **settings)


def build_random_model(shape: str, out_dir: str, seed: int = 0) -> str:
    """Write a random checkpoint of a named shape into out_dir (reused if already there)."""
    from transformers import AutoModelForCausalLM

    config = shape_config(shape)
    if os.path.isfile(os.path.join(out_dir, "model.safetensors")):
        return out_dir
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    _write_word_tokenizer(config.vocab_size, out_dir)
    return out_dir


def _write_word_tokenizer(vocab_size: int, out_dir: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<0>", eos_token="<1>", unk_token="<0>")
    hf.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 1}, f)
