"""The choice between cuBLAS and the Triton small-M kernels (runner/linear_tuning.py): the rule, its disk cache,
and the model routing its linears through the chosen kernel (interpreter on the CPU)."""

import json

import pytest
import torch
import torch.nn.functional as F

from photoninfer.kernels.gemv import GemvConfig
from photoninfer.model.layers import Linear
from photoninfer.runner import linear_tuning

FAST = GemvConfig(block_n=16, block_k=64, split_k=2, fma=True)
SLOW = GemvConfig(block_n=32, block_k=64)


def test_triton_is_chosen_only_when_clearly_faster():
    assert linear_tuning.choose({None: 10.0, FAST: 9.0, SLOW: 9.5}) == FAST
    assert linear_tuning.choose({None: 10.0, FAST: 9.8}) is None  # within the margin: cuBLAS stays
    assert linear_tuning.choose({None: 10.0, SLOW: 12.0}) is None
    assert linear_tuning.choose({None: 10.0}) is None  # no candidate ran


def test_candidates_fit_the_shape():
    for config in linear_tuning.candidate_configs(576, 576, 1):
        assert config.fma and 576 % config.split_k == 0
    for config in linear_tuning.candidate_configs(2048, 8192, 16):
        assert not config.fma and 8192 % (config.block_k * config.split_k) == 0
    assert linear_tuning.candidate_configs(2048, 2048, 17) == []  # beyond the small-M kernels


def test_choices_are_cached_and_reread(tmp_path, monkeypatch):
    path = str(tmp_path / "choices.json")
    timed = []

    def fake_time_shape(n, k, m, dtype, device):
        timed.append((n, k, m))
        return {None: 10.0, FAST: 5.0} if m == 1 else {None: 10.0, SLOW: 11.0}

    monkeypatch.setattr(linear_tuning, "time_shape", fake_time_shape)
    chosen = linear_tuning.tune({(64, 128)}, [1, 2, 32], torch.bfloat16, torch.device("cpu"), cache=path)
    assert chosen == {(64, 128, 1): FAST}  # M=2 keeps cuBLAS, M=32 is never a small-M shape
    assert timed == [(64, 128, 1), (64, 128, 2)]
    timed.clear()
    again = linear_tuning.tune({(64, 128)}, [1, 2], torch.bfloat16, torch.device("cpu"), cache=path)
    assert again == chosen and timed == []  # read back, nothing timed
    linear_tuning.tune({(64, 128), (32, 64)}, [1, 2], torch.bfloat16, torch.device("cpu"), cache=path)
    assert timed == [(32, 64, 1), (32, 64, 2)]  # only the new shape is timed


def test_malformed_cache_is_measured_again(tmp_path, monkeypatch):
    path = tmp_path / "choices.json"
    path.write_text(json.dumps({"64x128x1": {"no_such_field": 3}}))
    monkeypatch.setattr(linear_tuning, "time_shape", lambda *a: {None: 10.0, FAST: 5.0})
    chosen = linear_tuning.tune({(64, 128)}, [1], torch.bfloat16, torch.device("cpu"), cache=str(path))
    assert chosen == {(64, 128, 1): FAST}
    assert json.loads(path.read_text())["64x128x1"]["block_n"] == FAST.block_n


def test_linear_runs_the_chosen_kernel_for_its_row_count(device, monkeypatch):
    torch.manual_seed(0)
    layer = Linear(128, 64).to(device=device, dtype=torch.bfloat16)
    layer.weight.data.normal_(0, 128 ** -0.5)
    model = torch.nn.Module()
    model.block = layer
    model.lm_head = layer  # untied: no head configs to give
    linear_tuning.apply(model, {(64, 128, 1): FAST, (64, 128, 4): GemvConfig(block_n=16, block_k=64, split_k=1)})
    assert set(layer.small_m_configs) == {1, 4}
    calls = []
    import photoninfer.kernels.gemv as gemv
    real = gemv.small_m_linear
    monkeypatch.setattr(gemv, "small_m_linear", lambda *a, **k: calls.append(k["config"]) or real(*a, **k))
    for rows in (1, 3, 4):
        x = torch.randn(rows, 128, device=device).to(torch.bfloat16)
        expected = F.linear(x.double().cpu(), layer.weight.double().cpu())
        torch.testing.assert_close(layer(x).double().cpu(), expected, rtol=2 ** -7, atol=1e-2)
    assert calls == [FAST, GemvConfig(block_n=16, block_k=64, split_k=1)]  # 3 rows: no config, F.linear


def test_tied_head_and_every_linear_get_their_configs(device):
    from photoninfer.config import ModelConfig
    from photoninfer.model.llama import CausalLM

    cfg = ModelConfig("llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    torch.manual_seed(1)
    model = CausalLM(cfg).to(device=device, dtype=torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    shapes = linear_tuning.linear_shapes(model)
    assert shapes == {(64 + 2 * 32, 64), (64, 64), (256, 64), (64, 128), (96, 64)}  # qkv, o, gate_up, down, head
    head = GemvConfig(block_n=16, block_k=64, split_k=1, fma=True)
    assert linear_tuning.apply(model, {(96, 64, 2): head, (64, 128, 2): SLOW}) == 3  # the head, two down_projs
    hidden = torch.randn(2, 64, device=device).to(torch.bfloat16)
    expected = F.linear(hidden.double().cpu(), model.embed_tokens.weight.double().cpu())
    torch.testing.assert_close(model.compute_logits(hidden).double().cpu(), expected, rtol=2 ** -7, atol=1e-2)
