"""The native 4-bit kernel (quant/q4_kernels.c via quant/native.py) against the float32 reference
F.linear(x, dequantize()): this CPU's build (AVX-512 or AVX2), the AVX2 one (PHOTONINFER_NATIVE=avx2: every test
taking `kernel` runs with both) and the scalar one, Q4_0 and Q4_1, fused layers, many row counts; and the
fallback to torch's kernel where the native one cannot be built."""

from __future__ import annotations

import ctypes
import logging
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from int4_layers import fused_int4_layer

from photoninfer.quant import native
from photoninfer.quant.gguf_blocks import GGUFBlocks, decode_int4
from photoninfer.quant.int4 import DENSE_MIN_ROWS, Int4Linear


def random_blocks(qtype: Q, rows: int, cols: int, seed: int) -> GGUFBlocks:
    """Random Q4_0 / Q4_1 blocks with realistic float16 scales (d > 0, m about -8 d)."""
    width = {Q.Q4_0: 18, Q.Q4_1: 20}[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // 32, width), dtype=np.uint8)
    d = rng.uniform(0.002, 0.03, raw.shape[:2]).astype(np.float16)
    raw[..., 0:2] = d.view(np.uint8).reshape(*raw.shape[:2], 2)
    if qtype == Q.Q4_1:
        m = (-8 * d.astype(np.float32) * rng.uniform(0.8, 1.2, d.shape)).astype(np.float16)
        raw[..., 2:4] = m.view(np.uint8).reshape(*raw.shape[:2], 2)
    return GGUFBlocks(qtype.name, (rows, cols), torch.from_numpy(raw.reshape(rows, -1)))


def panels_of(blocks: GGUFBlocks) -> torch.Tensor:
    codes, scales, biases = decode_int4(blocks)
    return native.pack_panels(codes.numpy(), scales.half().numpy(), biases.half().numpy())


def assert_float32_close(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """Within float32 summation error of the reference (relative to the sum of |products|), and not trivially."""
    expected = F.linear(x, weight)
    scale = F.linear(x.abs(), weight.abs())
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert ((got - expected).abs() <= 1e-5 * scale + 1e-30).all(), (got - expected).abs().max()
    assert ((got - F.linear(x, weight.roll(1, 0))).abs() > 1e-3 * scale).any()


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
@pytest.mark.parametrize("shape", [(16, 32), (48, 64), (960, 576), (64, 1536)])
def test_kernel_matches_the_float32_reference(kernel, qtype, shape):
    rows, cols = shape
    blocks = random_blocks(qtype, rows, cols, seed=rows + cols)
    panels, weight = panels_of(blocks), blocks.dequantize()
    gen = torch.Generator().manual_seed(0)
    for m in (1, 2, 3, 7, 8, 9, 16, 17, 70):  # each rows-per-pass case, and more than one pass
        x = torch.randn(m, cols, generator=gen)
        assert_float32_close(kernel.matmul(x, panels), x, weight)


def test_kernel_is_exact_over_a_wide_range_of_inputs(kernel):
    """Inputs from 1e-30 to 1e30 (the AVX2 path scales x by powers of two up to 2^-24) and exact zeros."""
    blocks = random_blocks(Q.Q4_0, 32, 256, seed=5)
    gen = torch.Generator().manual_seed(1)
    for m in (3, 9):
        x = torch.randn(m, 256, generator=gen) * 10.0 ** (torch.rand(m, 256, generator=gen) * 60 - 30)
        x[:, ::7] = 0.0
        assert_float32_close(kernel.matmul(x, panels_of(blocks)), x, blocks.dequantize())


def test_kernel_threads_give_the_same_result(kernel):
    blocks = random_blocks(Q.Q4_1, 256, 128, seed=3)
    panels, x = panels_of(blocks), torch.randn(5, 128)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel.matmul(x, panels)
        torch.set_num_threads(2)
        assert torch.equal(kernel.matmul(x, panels), one)  # rows are split, sums are not
    finally:
        torch.set_num_threads(threads)


def test_kernel_rejects_bad_input(kernel):
    panels = panels_of(random_blocks(Q.Q4_1, 16, 64, seed=1))
    with pytest.raises(ValueError, match="float32"):
        kernel.matmul(torch.randn(2, 64).bfloat16(), panels)
    with pytest.raises(ValueError, match="K % 32"):
        kernel.matmul(torch.randn(2, 48), panels)
    with pytest.raises(ValueError, match="panels must be"):
        kernel.matmul(torch.randn(2, 96), panels)
    with pytest.raises(ValueError, match="rows % 16"):
        native.pack_panels(np.zeros((8, 32), np.uint8), np.ones((8, 1), np.float16), np.ones((8, 1), np.float16))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_fused_layer_runs_native_below_dense_rows(kernel, qtype):
    """q/k/v fused: three parts in row slices; few rows are float32-exact, many rows use the dense bf16 copy."""
    parts = [random_blocks(qtype, rows, 256, seed) for seed, rows in enumerate((64, 32, 32))]
    layer = fused_int4_layer(parts, 256)
    assert layer.runs_native
    weight = torch.cat([p.dequantize() for p in parts])
    x = torch.randn(DENSE_MIN_ROWS + 2, 256, generator=torch.Generator().manual_seed(4))
    for m in range(1, DENSE_MIN_ROWS):
        assert_float32_close(layer(x[:m]), x[:m], weight)
    expected = F.linear(x, weight)
    many = layer(x)  # bf16 activations and weights: ~3 significant digits
    assert (many - expected).abs().max() <= 2e-2 * expected.abs().max()
    assert not torch.equal(many[:1], layer(x[:1]))


def test_q4_k_runs_native_with_float32_scales(kernel):
    """Q4_K's scales are products that float16 cannot hold: its panels keep them in float32."""
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (32, 2, 144), dtype=np.uint8)  # two 256-input super-blocks a row
    raw[..., 0:4] = rng.uniform(0.002, 0.02, (32, 2, 2)).astype(np.float16).view(np.uint8)  # d, dmin
    blocks = GGUFBlocks("Q4_K", (32, 512), torch.from_numpy(raw.reshape(32, -1)))
    layer = Int4Linear(512, 32)
    layer.weight.weight_loader(layer.weight, blocks, None)
    layer.process_weights_after_loading()
    assert layer.runs_native and layer.native_format == native.Q4_F32 and layer.weight.numel() == 0
    x = torch.randn(DENSE_MIN_ROWS - 1, 512, generator=torch.Generator().manual_seed(3))
    for m in (1, 3, DENSE_MIN_ROWS - 1):
        assert_float32_close(layer(x[:m]), x[:m], blocks.dequantize())


def test_scalar_build_matches_the_reference(tmp_path, monkeypatch):
    """The fallback for CPUs without AVX2, built here with AVX2 (and so AVX-512) turned off."""
    monkeypatch.setenv("PHOTONINFER_CACHE", str(tmp_path))
    try:
        path = native.build(native.FLAGS + native.ISA_FLAGS["scalar"])
    except RuntimeError as e:
        pytest.skip(f"no C compiler here: {e}")
    scalar = native.Q4Kernel(ctypes.CDLL(path))
    assert scalar.simd == 0
    blocks = random_blocks(Q.Q4_1, 48, 96, seed=7)
    x = torch.randn(3, 96)
    assert_float32_close(scalar.matmul(x, panels_of(blocks)), x, blocks.dequantize())


def test_build_is_cached_by_source_flags_and_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("PHOTONINFER_CACHE", str(tmp_path))
    flags = native.FLAGS + ["-mno-avx512f"]  # any valid variant; compiled once here
    try:
        first = native.build(flags)
    except RuntimeError as e:
        pytest.skip(f"no C compiler here: {e}")
    mtime = os.stat(first).st_mtime_ns
    assert native.build(flags) == first and os.stat(first).st_mtime_ns == mtime  # not rebuilt
    assert os.path.dirname(first) == os.path.join(str(tmp_path), "native")


def test_no_compiler_falls_back_to_torchs_kernel(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PHOTONINFER_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(native, "_kernel", None)
    monkeypatch.setattr(native, "_tried", False)
    with caplog.at_level(logging.WARNING, logger="photoninfer.quant.native"):
        assert native.kernel() is None and native.kernel() is None
    assert len([r for r in caplog.records if "no C compiler" in r.getMessage()]) == 1  # one warning
    blocks = random_blocks(Q.Q4_1, 32, 128, seed=2)
    layer = Int4Linear(128, 32)
    layer.weight.weight_loader(layer.weight, blocks, None)
    layer.process_weights_after_loading()
    assert not layer.runs_native
    x = torch.randn(2, 128)
    expected = F.linear(x, blocks.dequantize())
    got = layer(x)  # torch's kernel: bf16 activations and scales
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()
    assert (got - expected).abs().max() > 1e-5 * expected.abs().max()


def test_a_failed_build_falls_back_with_one_warning(tmp_path, monkeypatch, caplog):
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: internal error' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("PHOTONINFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setattr(native, "_kernel", None)
    monkeypatch.setattr(native, "_tried", False)
    with caplog.at_level(logging.WARNING, logger="photoninfer.quant.native"):
        assert native.kernel() is None
    assert [r.getMessage() for r in caplog.records if "internal error" in r.getMessage()]
    assert not os.listdir(tmp_path / "cache" / "native")  # no half-written library left behind


def test_native_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    monkeypatch.setattr(native, "_kernel", None)
    monkeypatch.setattr(native, "_tried", False)
    assert native.kernel() is None


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
@pytest.mark.parametrize("prompt_lens", [[1, 1, 1], [5, 13, 1]])
def test_fast_path_matches_the_float32_model(kernel, qtype, prompt_lens, tmp_path, monkeypatch):
    """A tiny GGUF model: the CPU fast path with packed layers (a prefill of at most EXACT_MAX_ROWS tokens and
    decode steps: every matmul runs the native kernel) against the float32 reference model, step by step over
    a paged cache. With EXACT_MAX_ROWS = 0 the prefill multiplies by the dense bf16 copies instead."""
    from photoninfer.model import cpu_fast

    from test_cpu_fast import BLOCK, run_steps
    from test_quant import write_quantized_gguf

    from photoninfer.model.loader import build_model, load_checkpoint
    from photoninfer.runner.attention import TorchPagedAttention

    monkeypatch.setenv("PHOTONINFER_CACHE", str(tmp_path / "cache"))
    checkpoint = load_checkpoint(write_quantized_gguf(tmp_path / "model.gguf", qtype))
    cpu = torch.device("cpu")
    models = [build_model(checkpoint, cpu, torch.float32, pack=pack) for pack in (False, True)]
    assert isinstance(models[1].layers[0].mlp.down_proj, Int4Linear) and models[1].layers[0].mlp.down_proj.runs_native
    for model in models:
        model.attention = TorchPagedAttention(model.config.head_dim**-0.5, BLOCK)
    expected, got = (run_steps(model, prompt_lens, decode_steps=4) for model in models)
    assert models[1].runs_native
    for e, g in zip(expected, got):
        assert (g - e).abs().max() <= 1e-4 * e.abs().max()  # float32 sums in another order
    assert (got[-1] - expected[-2]).abs().max() > 0.1 * expected[-1].abs().max()
    if max(prompt_lens) > 1:
        monkeypatch.setattr(cpu_fast, "EXACT_MAX_ROWS", 0)
        bf16_prefill = run_steps(models[1], prompt_lens, decode_steps=0)[0]
        assert (bf16_prefill - expected[0]).abs().max() > 1e-3 * expected[0].abs().max()
        assert (bf16_prefill - expected[0]).abs().max() <= 3e-2 * expected[0].abs().max()


def test_native_decode_layers_match_the_torch_fast_path(kernel, tmp_path, monkeypatch):
    """Decode steps as one native call per layer against cpu_fast's torch ops on the same packed model, after a
    prefill of prompts of different lengths (contexts of different lengths, block tables out of order)."""
    from test_cpu_fast import BLOCK, run_steps
    from test_quant import write_quantized_gguf

    from photoninfer.model import native_decode
    from photoninfer.model.loader import build_model, load_checkpoint
    from photoninfer.runner.attention import TorchPagedAttention

    monkeypatch.setenv("PHOTONINFER_CACHE", str(tmp_path / "cache"))
    model = build_model(load_checkpoint(write_quantized_gguf(tmp_path / "model.gguf", Q.Q4_1)), torch.device("cpu"),
                        torch.float32, pack=True)
    model.attention = TorchPagedAttention(model.config.head_dim**-0.5, BLOCK)
    calls = []
    native_forward = native_decode.forward
    monkeypatch.setattr(native_decode, "forward", lambda *a: calls.append(1) or native_forward(*a))
    got = run_steps(model, [5, 13, 1], decode_steps=4)
    assert len(calls) == 4  # every decode step, not the prefill
    monkeypatch.setattr(native_decode, "supported", lambda model: False)
    expected = run_steps(model, [5, 13, 1], decode_steps=4)
    assert torch.equal(got[0], expected[0])  # the prefill: the same torch ops
    for e, g in zip(expected[1:], got[1:]):
        assert (g - e).abs().max() <= 1e-4 * e.abs().max()
    assert (got[-1] - expected[-2]).abs().max() > 0.1 * expected[-1].abs().max()


def test_without_native_bf16_the_fast_path_is_float32_throughout(kernel, tmp_path, monkeypatch):
    """A CPU with AVX2 but no native bf16 (most laptops): dtype auto packs the Q4_0/Q4_1 layers for the native
    kernel, which then runs every step (no dense bf16 copies: prompts of any length are float32-exact too), and
    the LM head runs it for many rows as well (its dense copy is the float32 weight itself)."""
    from test_cpu_fast import BLOCK, run_steps
    from test_quant import write_quantized_gguf

    from photoninfer import config
    from photoninfer.model import cpu_fast
    from photoninfer.model.loader import build_model, load_checkpoint
    from photoninfer.runner.attention import TorchPagedAttention

    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setenv("PHOTONINFER_CACHE", str(tmp_path / "cache"))
    cpu = torch.device("cpu")
    assert config.packs_weights("auto", cpu) and not config.packs_weights("bfloat16", cpu)
    assert config.cpu_dense_dtype() == torch.float32
    checkpoint = load_checkpoint(write_quantized_gguf(tmp_path / "model.gguf", Q.Q4_1))
    models = [build_model(checkpoint, cpu, torch.float32, pack=pack) for pack in (False, True, True)]  # 3rd: cached
    for packed in models[1:]:
        layer = packed.layers[0].mlp.down_proj
        assert layer.runs_native and not layer.dense.numel()
        assert packed.lm_head.weight_dense.dtype == torch.float32 and packed.lm_head.panels.numel()
    for model in models:
        model.attention = TorchPagedAttention(model.config.head_dim**-0.5, BLOCK)
    monkeypatch.setattr(cpu_fast, "EXACT_MAX_ROWS", 0)  # (with native bf16: prompts through the dense copies)
    expected, got = (run_steps(model, [5, 13, 1], decode_steps=2) for model in models[:2])
    assert models[1].dense_dtype == torch.float32
    for e, g in zip(expected, got):
        assert (g - e).abs().max() <= 1e-4 * e.abs().max()
    hidden = torch.randn(DENSE_MIN_ROWS + 1, models[0].config.hidden_size, generator=torch.Generator().manual_seed(5))
    logits = F.linear(hidden, models[2].lm_head.weight)  # tied: the float32 embedding
    assert torch.equal(models[2].lm_head(hidden).argmax(-1), logits.argmax(-1))
