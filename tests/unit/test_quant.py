"""Quantized Linear formats against their dequantize-then-matmul reference, K-quant GGUFs, the weight cache."""

from __future__ import annotations

import os
from typing import Optional

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from int4_layers import fused_int4_layer

from photoninfer import LLM, SamplingParams
from photoninfer.config import cpu_has_native_bf16, packs_weights
from photoninfer.errors import ModelLoadError
from photoninfer.model import weight_cache
from photoninfer.model.layers import Linear
from photoninfer.model.loader import build_model, load_checkpoint
from photoninfer.quant import linear_class, native
from photoninfer.quant.gguf_blocks import GGUFBlocks, decode_int4
from photoninfer.quant.int4 import Int4Linear

CPU = torch.device("cpu")

# Byte offsets of the float16 super-block scales (d, dmin) inside one block of each K-quant.
_F16_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
               Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,)}


def random_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random GGML blocks of `qtype` with small, finite float16 scales: uint8 [rows, bytes per row].
    (The gguf package quantizes only the simple types, so K-quant test data is written as raw blocks.)"""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block_values, block_bytes), dtype=np.uint8)
    for offset in _F16_FIELDS[qtype]:
        scale = rng.uniform(0.002, 0.02, raw.shape[:2]).astype(np.float16)
        raw[..., offset:offset + 2] = scale.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


def blocks_of(qtype: Q, rows: int, cols: int, seed: int = 0) -> GGUFBlocks:
    return GGUFBlocks(qtype.name, (rows, cols), torch.from_numpy(random_blocks(qtype, rows, cols, seed)))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_int4_decode_is_exactly_the_gguf_dequantization(qtype):
    blocks = blocks_of(qtype, 32, 512)
    codes, scales, biases = decode_int4(blocks)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    decoded = codes.float() * scales.repeat_interleave(32, 1) + biases.repeat_interleave(32, 1)
    assert torch.equal(decoded, blocks.dequantize())


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_int4_linear_matches_its_dequantized_reference(qtype, torch_int4_kernel):
    """torch's kernel, fused like q/k/v: three parts loaded into row slices, then packed; compared with float32
    F.linear. (The native kernel: tests/unit/test_native_q4.py.)"""
    parts = [blocks_of(qtype, rows, 256, seed) for seed, rows in enumerate((64, 32, 32))]
    layer = fused_int4_layer(parts, 256)
    reference_weight = torch.cat([p.dequantize() for p in parts])
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0))
    expected = F.linear(x, reference_weight)
    got = layer(x.bfloat16()).float()
    # bf16 activations, scales and output: ~3 significant digits
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()
    # and not trivially: a different weight is far off
    assert (F.linear(x, reference_weight.roll(1, 0)) - expected).abs().max() > 0.2 * expected.abs().max()


def test_int4_linear_dense_copy_computes_what_the_kernel_computes(torch_int4_kernel):
    """From DENSE_MIN_ROWS rows on, the layer multiplies by its dense bf16 copy; row by row it runs the kernel."""
    from photoninfer.quant.int4 import DENSE_MIN_ROWS

    layer = Int4Linear(256, 64)
    layer.weight.weight_loader(layer.weight, blocks_of(Q.Q4_1, 64, 256), None)
    layer.process_weights_after_loading()
    x = torch.randn(DENSE_MIN_ROWS + 3, 256, generator=torch.Generator().manual_seed(2)).bfloat16()
    batched = layer(x).float()
    row_by_row = torch.cat([layer(x[i:i + 1]) for i in range(len(x))]).float()
    # the same weights; only the bf16 rounding of the output and the summation order differ
    torch.testing.assert_close(batched, row_by_row, rtol=1e-2, atol=1e-2 * row_by_row.abs().max().item())
    assert not torch.allclose(batched, row_by_row.roll(1, 0), rtol=1e-2, atol=1e-2 * row_by_row.abs().max().item())


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_the_accuracy_tools_emulation_reproduces_the_packed_kernel(qtype, torch_int4_kernel):
    """quant.accuracy splits the packed path's error into bf16 scale/zero, inputs and outputs, emulated in
    float32: with all three the emulation must give the kernel's outputs, far closer than the exact weights do."""
    from photoninfer.quant.accuracy import _bf16_scaled_weight, _EmulatedRounding

    blocks = blocks_of(qtype, 64, 512, seed=5)
    layer = Int4Linear(512, 64)
    layer.weight.weight_loader(layer.weight, blocks, None)
    layer.process_weights_after_loading()
    exact = blocks.dequantize()
    rounded = {"weights", "inputs", "outputs"}
    emulated = _EmulatedRounding(exact, _bf16_scaled_weight(blocks), rounded)
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(1))
    kernel = layer(x)
    emulation_error = (emulated(x) - kernel).abs().max()
    rounded.clear()  # no rounding: the float32 reference
    assert torch.equal(emulated(x), F.linear(x, exact))
    assert emulation_error <= 0.1 * (F.linear(x, exact) - kernel).abs().max()


def test_int4_linear_refuses_other_types_and_wrong_shapes():
    layer = Int4Linear(256, 32)
    with pytest.raises(ModelLoadError, match="Q6_K"):
        layer.weight.weight_loader(layer.weight, blocks_of(Q.Q6_K, 32, 256), None)
    with pytest.raises(ModelLoadError, match=r"\(16, 256\).*\(32, 256\)"):
        layer.weight.weight_loader(layer.weight, blocks_of(Q.Q4_1, 16, 256), None)


def test_linear_class_per_layer():
    from photoninfer.quant import native
    from photoninfer.quant.int8 import Int8Linear

    assert linear_class(["Q4_1"] * 3, 256, 128, pack=True) is Int4Linear
    assert linear_class(["Q4_K"] * 3, 256, 128, pack=True) is Int4Linear
    int8 = Int8Linear if native.kernel() is not None else Linear  # (only on the native kernel)
    assert linear_class(["Q4_K", "Q4_K", "Q6_K"], 256, 128, pack=True) is int8  # Q4_K_M's mixed q/k/v
    assert linear_class(["Q8_0"], 256, 128, pack=True) is linear_class(["Q5_K", "Q6_K"], 256, 128, pack=True) is int8
    assert linear_class(["Q6_K", "Q3_K"], 256, 128, pack=True) is Linear  # Q3_K has no packed form
    assert linear_class(["Q2_K"], 256, 128, pack=True) is linear_class(["F16"], 256, 128, pack=True) is Linear
    assert linear_class(["Q4_1"], 256, 128, pack=False) is Linear  # dtype float32: the exact reference path
    assert linear_class(["Q4_1"], 256, 40, pack=True) is Linear  # the kernel packs rows in 16s
    assert linear_class([None], 256, 128, pack=True) is Linear  # safetensors


def test_packing_follows_the_dtype_name():
    if cpu_has_native_bf16():
        assert packs_weights("auto", CPU) and packs_weights("bfloat16", CPU)
    else:  # auto packs where our native kernel runs (AVX2), bfloat16 never
        assert packs_weights("auto", CPU) == (native.kernel() is not None) and not packs_weights("bfloat16", CPU)
    assert not packs_weights("float32", CPU) and not packs_weights("auto", torch.device("cuda"))


# ----------------------------------------------------------------------------------------------------------
# whole GGUF files: K-quants load and generate; the bundled Q4_1 model packed; the weight cache
# ----------------------------------------------------------------------------------------------------------

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 256, 256, 4, 2, 49152


def write_quantized_gguf(path, weight_type: Q, layers: int = 2, part_types: Optional[dict[str, Q]] = None) -> str:
    """A tiny llama GGUF whose projection weights are random blocks of `weight_type`, or of
    part_types[part] for the parts it names (e.g. {"attn_v": Q.Q6_K}, as Q4_K_M files mix them)."""
    rng = np.random.default_rng(1)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_eos_token_id(2)
    writer.add_tensor("token_embd.weight", (rng.standard_normal((VOCAB, HIDDEN)) * 0.5).astype(np.float16))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    head_dim = HIDDEN // HEADS
    shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * head_dim, HIDDEN), "attn_v": (KV_HEADS * head_dim, HIDDEN),
              "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        for j, (part, (rows, cols)) in enumerate(shapes.items()):
            qtype = (part_types or {}).get(part, weight_type)
            writer.add_tensor(f"blk.{i}.{part}.weight", random_blocks(qtype, rows, cols, seed=10 * i + j),
                              raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PHOTONINFER_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quant_gguf_loads_and_generates(qtype, tmp_path, smol_tokenizer_dir):
    path = write_quantized_gguf(tmp_path / f"{qtype.name}.gguf", qtype)
    ckpt = load_checkpoint(path)
    assert ckpt.tensor_types["model.layers.1.mlp.down_proj.weight"] == qtype.name
    # float32: the dequantized weights exactly
    model = build_model(ckpt, CPU, torch.float32)
    blocks = dict(ckpt.weights())["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(model.layers[1].mlp.down_proj.weight, blocks.dequantize())
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for dtype in ("float32", "auto", "bfloat16"):
        out = LLM(path, tokenizer=smol_tokenizer_dir, device="cpu", dtype=dtype).generate([[5, 6, 7, 8]], params)
        assert len(out[0].outputs[0].token_ids) == 6


def test_q4_k_runs_packed_and_agrees_with_float32(tmp_path):
    ckpt = load_checkpoint(write_quantized_gguf(tmp_path / "q4k.gguf", Q.Q4_K))
    packed, reference = build_model(ckpt, CPU, torch.float32, pack=True), build_model(ckpt, CPU, torch.float32)
    assert all(isinstance(packed.layers[0].mlp.get_submodule(n), Int4Linear) for n in ("gate_up_proj", "down_proj"))
    assert isinstance(reference.layers[0].mlp.down_proj, Linear)
    x = torch.randn(3, FFN)
    expected = reference.layers[0].mlp.down_proj(x)
    got = packed.layers[0].mlp.down_proj(x)
    assert got.dtype == torch.float32 and (got - expected).abs().max() <= 2e-2 * expected.abs().max()


def test_q4_k_without_native_bf16_runs_every_step_native(tmp_path, monkeypatch):
    """A CPU without native bf16 (packed where the native kernel builds): Q4_K layers run it for every step,
    a prompt too (no dense copies), so the fast path agrees with float32 up to the order of float32 sums."""
    from test_cpu_fast import BLOCK, run_steps

    from photoninfer import config
    from photoninfer.model import cpu_fast
    from photoninfer.runner.attention import TorchPagedAttention

    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: False)
    if native.kernel() is None:
        pytest.skip("the native kernel is not available here")
    ckpt = load_checkpoint(write_quantized_gguf(tmp_path / "q4k.gguf", Q.Q4_K))
    packed, reference = build_model(ckpt, CPU, torch.float32, pack=True), build_model(ckpt, CPU, torch.float32)
    layer = packed.layers[0].mlp.down_proj
    assert isinstance(layer, Int4Linear) and layer.runs_native and not layer.dense.numel()
    for model in (packed, reference):
        model.attention = TorchPagedAttention(model.config.head_dim**-0.5, BLOCK)
    monkeypatch.setattr(cpu_fast, "EXACT_MAX_ROWS", 0)  # (with native bf16: the prompts through dense copies)
    expected, got = run_steps(reference, [5, 13], decode_steps=2), run_steps(packed, [5, 13], decode_steps=2)
    assert packed.dense_dtype == torch.float32 and packed.runs_native
    for e, g in zip(expected, got):
        assert g.dtype == torch.float32 and (g - e).abs().max() <= 1e-4 * e.abs().max()


def test_weight_cache_is_used_on_a_second_load_and_invalidated_when_the_file_changes(tmp_path, monkeypatch):
    path = write_quantized_gguf(tmp_path / "model.gguf", Q.Q4_1, layers=1)
    first = build_model(load_checkpoint(path), CPU, torch.float32, pack=True)
    assert os.path.isfile(weight_cache.weights_file(path, torch.float32, CPU, pack=True))

    def no_parsing(*args, **kwargs):
        raise AssertionError("the GGUF was parsed although the cache holds it")

    monkeypatch.setattr(gguf, "GGUFReader", no_parsing)
    second = build_model(load_checkpoint(path), CPU, torch.float32, pack=True)
    assert isinstance(second.layers[0].mlp.down_proj, Int4Linear)
    x = torch.randn(2, HIDDEN)
    assert torch.equal(second.layers[0].self_attn.qkv_proj(x), first.layers[0].self_attn.qkv_proj(x))
    monkeypatch.undo()
    unpacked = build_model(load_checkpoint(path), CPU, torch.float32)  # its own entry, not the packed one
    assert isinstance(unpacked.layers[0].mlp.down_proj, Linear)

    # Rewrite the file with other weights: the old entry must not be used.
    stale = weight_cache.entry_dir(path)
    os.remove(path)
    write_quantized_gguf(path, Q.Q4_0, layers=1)
    assert weight_cache.entry_dir(path) != stale
    third = build_model(load_checkpoint(path), CPU, torch.float32, pack=True)
    reference = build_model(load_checkpoint(path), CPU, torch.float32)  # the new file's weights
    x = torch.randn(2, FFN)
    expected = reference.layers[0].mlp.down_proj(x)
    got = third.layers[0].mlp.down_proj(x)
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()


def test_damaged_cache_entry_is_rebuilt(tmp_path):
    path = write_quantized_gguf(tmp_path / "model.gguf", Q.Q4_1, layers=1)
    build_model(load_checkpoint(path), CPU, torch.float32, pack=True)
    with open(weight_cache.weights_file(path, torch.float32, CPU, pack=True), "wb") as f:
        f.write(b"not a torch file")
    model = build_model(load_checkpoint(path), CPU, torch.float32, pack=True)
    assert isinstance(model.layers[0].mlp.down_proj, Int4Linear)
    assert weight_cache.load_weights(path, torch.float32, CPU, pack=True) is not None  # rewritten


@pytest.mark.parametrize("rows", [3, 12])  # the packed 4-bit head below 8 rows, the bf16 one from 8 on
@pytest.mark.parametrize("kernel", ["native", "torch"])  # the native 4-bit kernel where it runs, else torch's
def test_refined_head_has_the_float32_argmax_and_top_logits(rows, kernel, request):
    from photoninfer.quant.head import RefinedHead

    if kernel == "torch":
        request.getfixturevalue("torch_int4_kernel")

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4096, 64, generator=gen)
    hidden = torch.randn(rows, 64, generator=gen) * 3
    expected = F.linear(hidden, weight)
    got = RefinedHead(weight, refine=32)(hidden)
    top = expected.topk(8, dim=-1).indices  # well inside the 32 refined (the 32nd may swap with the 33rd)
    torch.testing.assert_close(got.gather(1, top), expected.gather(1, top), rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert (got - expected).abs().max() <= 0.1 * expected.abs().max()  # the tail: 4-bit / bf16 precision
    plain_bf16 = F.linear(hidden.bfloat16(), weight.bfloat16()).float()
    assert not torch.allclose(plain_bf16.gather(1, top), expected.gather(1, top), rtol=1e-5, atol=1e-5)


def test_int4_head_packing_is_close_to_its_weight():
    from photoninfer.quant.head import pack_int4

    weight = torch.randn(256, 128, generator=torch.Generator().manual_seed(1))
    packed, scales_and_zeros = pack_int4(weight)
    identity = torch.eye(128, dtype=torch.bfloat16)
    dequantized = torch.ops.aten._weight_int4pack_mm_for_cpu(identity, packed, 32, scales_and_zeros).float().t()
    step = (weight.view(256, 4, 32).amax(-1) - weight.view(256, 4, 32).amin(-1)) / 15  # one code's width
    error = (dequantized - weight).abs().view(256, 4, 32).amax(-1)
    assert (error <= 0.5 * step + 0.02).all()  # half a step, plus bf16 rounding of scale and zero
    assert error.mean() > 0.05 * step.mean()  # it is quantized


def test_native_head_packing_is_close_to_its_weight():
    from photoninfer.quant import native
    from photoninfer.quant.head import pack_native

    if native.kernel() is None:
        pytest.skip("the native kernel is not available here")
    weight = torch.randn(256, 128, generator=torch.Generator().manual_seed(1))
    dequantized = native.kernel().matmul(torch.eye(128), pack_native(weight)).t()
    step = (weight.view(256, 4, 32).amax(-1) - weight.view(256, 4, 32).amin(-1)) / 15
    error = (dequantized - weight).abs().view(256, 4, 32).amax(-1)
    assert (error <= 0.5 * step + 0.005 * weight.abs().max()).all()  # half a step, plus float16 rounding of d, m
    assert error.mean() > 0.05 * step.mean()  # it is quantized


def test_packed_model_uses_the_refined_head_also_from_the_cache(tmp_path):
    from photoninfer.quant.head import RefinedHead

    path = write_quantized_gguf(tmp_path / "model.gguf", Q.Q4_1, layers=1)
    for _ in range(2):  # built, then mapped from the cache
        model = build_model(load_checkpoint(path), CPU, torch.float32, pack=True)
        assert isinstance(model.lm_head, RefinedHead)
        assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()  # tied: one copy
        for rows in (2, 9):  # the packed head and the bf16 one
            hidden = torch.randn(rows, HIDDEN)
            expected = F.linear(hidden, model.embed_tokens.weight)
            assert torch.equal(model.compute_logits(hidden).argmax(-1), expected.argmax(-1))
