"""Shared, session-scoped fixtures: the bundled SmolLM2 GGUF, its tokenizer, and tiny random HF models.

Everything is built locally (no hub access): tiny models come from transformers configs with fixed seeds and
use the SmolLM2 tokenizer extracted from the GGUF, so prompts tokenize like the real default model.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

TINY_VOCAB = 49152  # the SmolLM2 tokenizer's size, so tiny models accept its token ids

# Settings shared by every tiny model. A large initializer_range spreads the logits so greedy decoding
# is not decided by near-ties that float rounding could flip between implementations.
_TINY_BASE = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
)

# kind -> (transformers family, settings on top of _TINY_BASE)
TINY_KINDS = {
    # Llama-3.x: GQA 4/2, llama3 rope scaling with a small original context so scaling matters, untied.
    "llama3": ("llama", dict(
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        tie_word_embeddings=False,
    )),
    # Qwen3: per-head q/k RMSNorm, head_dim 32 != hidden/heads (16), untied, no bos.
    "qwen3": ("qwen3", dict(head_dim=32, rope_theta=1000000.0, tie_word_embeddings=False, bos_token_id=None)),
    # SmolLM2 in miniature: Llama with tied embeddings, 3 heads over 1 kv head (SmolLM2 has 9/3).
    "smollm2": ("llama", dict(
        hidden_size=96, num_attention_heads=3, num_key_value_heads=1, rope_theta=100000.0,
        tie_word_embeddings=True,
    )),
}


@pytest.fixture(scope="session")
def default_gguf_path() -> str:
    """Path of the bundled SmolLM2-135M-Instruct Q4_1 GGUF. Missing it is a failure: setup installs it."""
    from photoninfer.errors import ModelLoadError
    from photoninfer.model.loader import default_model_path

    try:
        return default_model_path()
    except ModelLoadError as e:
        pytest.fail(f"{e} (scripts/setup.sh installs it)")


@pytest.fixture(scope="session")
def smol_gguf_tokenizer(default_gguf_path):
    """photoninfer Tokenizer loaded from the GGUF (slow to build: ~10 s, so shared by the session)."""
    from photoninfer.model.tokenizer import load_tokenizer

    return load_tokenizer(default_gguf_path)


@pytest.fixture(scope="session")
def smol_tokenizer_dir(request, tmp_path_factory) -> str:
    """The SmolLM2 tokenizer (with its chat template) saved as an HF tokenizer directory.

    PHOTONINFER_TEST_TOKENIZER_DIR points at such a directory on machines that lack the 98 MB GGUF
    (the GPU machine, whose uploads are size-limited).
    """
    override = os.environ.get("PHOTONINFER_TEST_TOKENIZER_DIR")
    if override:
        return override
    out = tmp_path_factory.mktemp("smol_tokenizer")
    request.getfixturevalue("smol_gguf_tokenizer").hf.save_pretrained(str(out))
    return str(out)


def _randomize_norms(model: torch.nn.Module) -> None:
    """RMSNorm weights start at 1.0; perturb them so a swapped or missing norm weight changes the output."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))


def build_tiny_model(kind: str, out_dir: str, tokenizer_dir: str, max_shard_size=None, **overrides) -> str:
    """Build a tiny random-weight HF model of `kind` and save it (safetensors + tokenizer) into out_dir."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose from {sorted(TINY_KINDS)}")
    family, settings = TINY_KINDS[kind]
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen3Config, Qwen3ForCausalLM)
    config = config_cls(**{**_TINY_BASE, **settings, **overrides})
    torch.manual_seed(0)
    model = model_cls(config).to(torch.float32).eval()
    _randomize_norms(model)
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **save_kwargs)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), out_dir)
    return out_dir


@pytest.fixture(scope="session")
def make_tiny_model(smol_tokenizer_dir, tmp_path_factory):
    """Factory: make_tiny_model(kind, max_shard_size=None, **config_overrides) -> model directory path.

    kind is "llama3", "qwen3" or "smollm2" (see TINY_KINDS). Same arguments -> same cached directory,
    and the weights depend only on kind and overrides (fixed seeds), so a sharded copy equals the plain one.
    Treat the returned directory as read-only; copy it before editing files.
    """
    cache: dict[str, str] = {}

    def make(kind: str, max_shard_size=None, **overrides) -> str:
        key = json.dumps([kind, max_shard_size, overrides], sort_keys=True, default=str)
        if key not in cache:
            out = str(tmp_path_factory.mktemp(f"tiny_{kind}"))
            cache[key] = build_tiny_model(kind, out, smol_tokenizer_dir, max_shard_size, **overrides)
        return cache[key]

    return make


@pytest.fixture
def torch_int4_kernel(monkeypatch):
    """Packed layers built in the test run torch's bf16 int4 kernel, as where the native kernel is unavailable."""
    from photoninfer.quant import native

    monkeypatch.setattr(native, "_kernel", None)
    monkeypatch.setattr(native, "_tried", True)
