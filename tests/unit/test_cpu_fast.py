"""The CPU fast path's forward (model/cpu_fast.py) against the reference forward of llama.py, on the same
weights: tiny random Llama (GQA, llama3 rope scaling) and Qwen3 (q/k-norm) models, in a prefill and then
batched decode steps over a paged cache."""

from __future__ import annotations

import pytest
import torch

from photoninfer.config import ModelConfig
from photoninfer.model.llama import CausalLM
from photoninfer.runner.attention import TorchPagedAttention
from photoninfer.runner.batch import ForwardBatch

BLOCK = 4
CONFIGS = {
    "llama": dict(architecture="llama", num_attention_heads=6, num_key_value_heads=2,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64}),
    "qwen3": dict(architecture="qwen3", num_attention_heads=4, num_key_value_heads=4, qk_norm=True),
}


def random_model(kind: str) -> CausalLM:
    cfg = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2, head_dim=8,
                      max_position_embeddings=256, **CONFIGS[kind])
    torch.manual_seed(0)
    model = CausalLM(cfg)
    for name, param in model.named_parameters():
        param.data = torch.randn_like(param) * (0.3 if "proj" in name else 1.0)
        if "norm" in name:
            param.data = 1 + 0.1 * param.data
    model.attention = TorchPagedAttention(cfg.head_dim**-0.5, BLOCK)
    return model.eval()


def run_steps(model: CausalLM, prompt_lens: list[int], decode_steps: int) -> list[torch.Tensor]:
    """Prefill each prompt (one step, several sequences), then decode steps of all of them at once;
    returns the hidden states of every step. Sequence i owns blocks i*16.. (a paged cache)."""
    cfg = model.config
    caches = [torch.zeros(2, 16 * len(prompt_lens), BLOCK, cfg.num_key_value_heads, cfg.head_dim)
              for _ in range(cfg.num_hidden_layers)]
    tables = [list(range(16 * i, 16 * (i + 1)))[::-1] for i in range(len(prompt_lens))]  # not in order
    g = torch.Generator().manual_seed(1)
    outputs, starts, q_lens = [], [0] * len(prompt_lens), list(prompt_lens)
    for _ in range(decode_steps + 1):
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, q_lens)])
        seq_of = torch.cat([torch.full((n,), i) for i, n in enumerate(q_lens)])
        slots = torch.tensor([tables[i][p // BLOCK] * BLOCK + p % BLOCK for i, p in zip(seq_of.tolist(), positions.tolist())])
        query_start = [0]
        for n in q_lens:
            query_start.append(query_start[-1] + n)
        batch = ForwardBatch.for_attention(slots, query_start, [s + n for s, n in zip(starts, q_lens)], tables)
        ids = torch.randint(0, cfg.vocab_size, (len(positions),), generator=g)
        with torch.inference_mode():
            outputs.append(model(ids, positions, caches, model.attention.prepare(batch)))
        starts, q_lens = [s + n for s, n in zip(starts, q_lens)], [1] * len(q_lens)
    return outputs


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("prompt_lens", [[7], [5, 13, 1]])
def test_fast_forward_matches_the_reference_forward(kind, prompt_lens):
    model = random_model(kind)
    expected = run_steps(model, prompt_lens, decode_steps=3)
    model.use_cpu_fast_path()
    got = run_steps(model, prompt_lens, decode_steps=3)
    for e, g in zip(expected, got):
        assert g.dtype == e.dtype == torch.float32 and g.shape == e.shape
        # the matmuls' inputs are rounded to bf16 (3 significant digits) in the fast path
        assert (g - e).abs().max() <= 3e-2 * e.abs().max()
    # and not trivially: another step's states are far off
    assert (got[-1] - expected[-2]).abs().max() > 0.3 * expected[-1].abs().max()


def test_packed_layers_multiply_by_their_reordered_dense_copy_unless_few_rows_decode():
    import gguf
    import numpy as np
    import torch.nn.functional as F

    from photoninfer.model import cpu_fast
    from photoninfer.quant.gguf_blocks import GGUFBlocks
    from photoninfer.quant.int4 import DENSE_MIN_ROWS, Int4Linear

    weight = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    raw = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q4_1)
    layer = Int4Linear(256, 64)
    layer.weight.weight_loader(layer.weight, GGUFBlocks("Q4_1", (64, 256), torch.from_numpy(raw)), None)
    layer.process_weights_after_loading()
    model = torch.nn.ModuleDict({"proj": layer})
    cpu_fast._reorder_dense_weights(model)
    assert model.onednn_ready
    x = torch.randn(DENSE_MIN_ROWS + 4, 256, generator=torch.Generator().manual_seed(0)).bfloat16()
    if torch.backends.mkldnn.is_available():
        assert layer.onednn_weight is not None
    expected = F.linear(x, layer.dense)
    assert torch.equal(cpu_fast._matmul(layer, x, dense=True), expected)  # the same product, another layout
    assert torch.equal(cpu_fast._matmul(layer, x[:3], dense=True), expected[:3])  # a short prompt: dense too
    few = cpu_fast._matmul(layer, x[:3], dense=False)  # a decode step of 3 rows: the 4-bit kernel
    assert torch.equal(few, layer(x[:3])) and not torch.equal(few, expected[:3])
