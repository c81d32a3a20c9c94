"""GGUF Q8_0 / Q5_0 / Q5_1 / Q5_K / Q6_K / Q4_K layers packed for our native kernels (quant/int8_kernels.c,
q4_kernels.c: 4- and 5-bit panels) against the float32 reference F.linear(x, blocks.dequantize()), the `gguf`
package's dequantize: the decoders exactly, the layers at odd shapes and many row counts, fused layers that
mix types, the scalar builds in every format, bad input, and tiny GGUF models whose fast path agrees with the
float32 model (hidden states and greedy tokens)."""

from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from int4_layers import load_parts
from test_native_q4 import assert_float32_close
from test_quant import blocks_of, write_quantized_gguf

from photoninfer.errors import ModelLoadError
from photoninfer.quant import linear_class, native
from photoninfer.quant.gguf_blocks import GGUFBlocks, decode_int8
from photoninfer.quant.int4 import Int4Linear
from photoninfer.quant.int8 import Int8Linear
from photoninfer.quant.packed import DENSE_MIN_ROWS, PackedLinear

ROWS = (1, 3, 16, 70)  # rows of x: one, a few, a full pass of 8 twice, and a remainder
KQUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
SIMPLE = (Q.Q8_0, Q.Q5_0, Q.Q5_1)  # blocks of 32, which the gguf package quantizes


def gguf_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> GGUFBlocks:
    """SIMPLE types quantized by the gguf package from Gaussian weights; K-quants as random bytes with finite
    float16 d and dmin (the gguf package cannot quantize them)."""
    if qtype not in SIMPLE:
        return blocks_of(qtype, rows, cols, seed)
    weight = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.05
    return GGUFBlocks(qtype.name, (rows, cols), torch.from_numpy(gguf.quants.quantize(weight, qtype)))


def packed_layer(parts: list[GGUFBlocks]) -> PackedLinear:
    """The class the loader picks for these parts, loaded into consecutive row slices (fused) and packed."""
    in_features, out_features = parts[0].shape[1], sum(p.shape[0] for p in parts)
    cls = linear_class([p.type_name for p in parts], in_features, out_features, pack=True)
    return load_parts(cls(in_features, out_features), parts)


@pytest.mark.parametrize("qtype", [*SIMPLE, *KQUANTS, Q.Q4_0, Q.Q4_1], ids=lambda t: t.name)
def test_int8_decode_is_exactly_the_gguf_dequantization(qtype):
    blocks = gguf_blocks(qtype, 32, 512, seed=1)
    codes, scales, biases = decode_int8(blocks)
    group = 512 // scales.shape[1]
    assert codes.dtype == torch.int8 and group == (16 if qtype == Q.Q6_K else 32)
    low, high = {Q.Q8_0: (-128, 127), Q.Q6_K: (-32, 31), Q.Q5_0: (0, 31), Q.Q5_1: (0, 31),
                 Q.Q5_K: (0, 31)}.get(qtype, (0, 15))
    assert low <= int(codes.min()) < int(codes.max()) <= high
    decoded = codes.float() * scales.repeat_interleave(group, 1)
    if biases is not None:
        decoded = decoded + biases.repeat_interleave(group, 1)
    assert torch.equal(decoded, blocks.dequantize())
    assert (biases is None) == (qtype in (Q.Q8_0, Q.Q6_K))


FORMATS = {Q.Q8_0: native.int8_format(32, False), Q.Q6_K: native.int8_format(16, False),
           Q.Q5_0: native.Q5_F16, Q.Q5_1: native.Q5_F16, Q.Q5_K: native.Q5_F32, Q.Q4_K: native.Q4_F32}


@pytest.mark.parametrize("qtype", [*SIMPLE, *KQUANTS], ids=lambda t: t.name)
@pytest.mark.parametrize("rows, blocks_per_row", [(16, 1), (48, 3), (208, 6)])
def test_layer_matches_the_float32_reference(kernel, qtype, rows, blocks_per_row):
    cols = blocks_per_row * (32 if qtype in SIMPLE else 256)
    blocks = gguf_blocks(qtype, rows, cols, seed=rows + cols)
    layer = packed_layer([blocks])
    assert type(layer) is (Int4Linear if qtype == Q.Q4_K else Int8Linear)
    assert layer.runs_native and layer.native_format == FORMATS[qtype]
    weight = blocks.dequantize()
    x = torch.randn(max(ROWS), cols, generator=torch.Generator().manual_seed(0))
    for m in ROWS:
        assert_float32_close(layer.exact(x[:m]), x[:m], weight)


@pytest.mark.parametrize("types, fmt", [
    ((Q.Q4_K, Q.Q4_K, Q.Q6_K), native.int8_format(16, True)),  # Q4_K_M's q/k/v: 32-groups split in two
    ((Q.Q8_0, Q.Q5_K), native.int8_format(32, True)),
    ((Q.Q6_K, Q.Q8_0), native.int8_format(16, False)),
    ((Q.Q4_1, Q.Q6_K), native.int8_format(16, True)),
    ((Q.Q5_0, Q.Q5_0, Q.Q8_0), native.int8_format(32, True)),  # a small model's Q4_K_M file (see below)
    ((Q.Q4_K, Q.Q5_K), native.Q5_F32),  # 4- and 5-bit codes: 5-bit panels
    ((Q.Q4_1, Q.Q5_0, Q.Q5_1), native.Q5_F16),
])
def test_fused_layer_mixing_types_runs_packed(kernel, types, fmt):
    parts = [gguf_blocks(t, rows, 512, seed) for seed, (t, rows) in enumerate(zip(types, (64, 32, 32)))]
    layer = packed_layer(parts)
    assert type(layer) is Int8Linear and layer.native_format == fmt
    weight = torch.cat([p.dequantize() for p in parts])
    x = torch.randn(max(ROWS), 512, generator=torch.Generator().manual_seed(2))
    for m in ROWS:
        assert_float32_close(layer.exact(x[:m]), x[:m], weight)
    # forward: the native kernel below DENSE_MIN_ROWS rows, the dense bf16 copy from there on
    assert_float32_close(layer(x[:DENSE_MIN_ROWS - 1]), x[:DENSE_MIN_ROWS - 1], weight)
    expected = F.linear(x, weight)
    many = layer(x)
    assert (many - expected).abs().max() <= 2e-2 * expected.abs().max()
    assert not torch.equal(many[:1], layer.exact(x[:1]))


def test_threads_give_the_same_result(kernel):
    """Panels are split between threads, sums are not: 1 and 2 threads agree bit for bit in every format."""
    layers = [packed_layer([gguf_blocks(t, 64, 512, seed=6)]) for t in (Q.Q8_0, Q.Q5_1, Q.Q5_K, Q.Q6_K)]
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(6))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [layer.exact(x) for layer in layers]
        torch.set_num_threads(2)
        assert all(torch.equal(layer.exact(x), y) for layer, y in zip(layers, one))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_other_builds_match_the_reference(isa, tmp_path, monkeypatch):
    """The paths for CPUs without AVX-512 (AVX2) and without AVX2 (scalar), built here with those turned off,
    in every format."""
    monkeypatch.setenv("PHOTONINFER_CACHE", str(tmp_path))
    try:
        path = native.build(native.FLAGS + native.ISA_FLAGS[isa])
    except RuntimeError as e:
        pytest.skip(f"no C compiler here: {e}")
    lib = native.Q4Kernel(ctypes.CDLL(path))
    assert lib.simd == {"scalar": 0, "avx2": 256}[isa]
    x = torch.randn(9, 512, generator=torch.Generator().manual_seed(5))
    cases = [[gguf_blocks(t, 32, 512, seed=3)] for t in (*SIMPLE, *KQUANTS, Q.Q4_1)]
    cases.append([gguf_blocks(Q.Q4_K, 32, 512, seed=4), gguf_blocks(Q.Q6_K, 16, 512, seed=5)])  # groups of 16, biases
    cases.append([gguf_blocks(Q.Q8_0, 32, 512, seed=4), gguf_blocks(Q.Q5_1, 16, 512, seed=5)])  # groups of 32, biases
    formats = set()
    for parts in cases:
        layer = packed_layer(parts)
        formats.add(layer.native_format)
        assert_float32_close(lib.matmul(x, layer.panels, layer.native_format), x,
                             torch.cat([p.dequantize() for p in parts]))
    assert formats == set(native.FORMATS.values())


def test_bad_input_gives_clear_errors(kernel):
    with pytest.raises(ModelLoadError, match="out_features % 16"):
        Int8Linear(256, 40)
    layer = Int8Linear(256, 32)
    with pytest.raises(ModelLoadError, match="Q2_K"):
        layer.weight.weight_loader(layer.weight, blocks_of(Q.Q2_K, 32, 256), None)
    with pytest.raises(ModelLoadError, match=r"\(16, 256\).*\(32, 256\)"):
        layer.weight.weight_loader(layer.weight, blocks_of(Q.Q6_K, 16, 256), None)
    with pytest.raises(ModelLoadError, match="got Tensor"):
        layer.weight.weight_loader(layer.weight, torch.zeros(32, 256), None)
    layer = packed_layer([gguf_blocks(Q.Q6_K, 32, 256)])
    with pytest.raises(ValueError, match="K % 16"):
        kernel.matmul(torch.randn(2, 40), layer.panels, layer.native_format)
    with pytest.raises(ValueError, match="panels must be"):
        kernel.matmul(torch.randn(2, 256), layer.panels, native.int8_format(32, False))  # another format's width
    with pytest.raises(ValueError, match="float32"):
        kernel.matmul(torch.randn(2, 256).bfloat16(), layer.panels, layer.native_format)
    codes = np.zeros((16, 64), np.int8)
    with pytest.raises(ValueError, match="rows % 16"):
        native.pack_int8_panels(codes[:8], np.ones((8, 2), np.float32), None)
    with pytest.raises(ValueError, match="scales"):
        native.pack_int8_panels(codes, np.ones((16, 3), np.float32), None)
    with pytest.raises(ValueError, match="groups of 16 or 32"):
        native.pack_int8_panels(codes, np.ones((16, 1), np.float32), None)  # one group of 64
    with pytest.raises(ValueError, match="4 or 5 bits"):
        native.pack_panels(np.zeros((16, 32), np.uint8), np.ones((16, 1), np.float16), np.ones((16, 1), np.float16), 6)
    with pytest.raises(ValueError, match="both float16 or both float32"):
        native.pack_panels(np.zeros((16, 32), np.uint8), np.ones((16, 1), np.float16), np.ones((16, 1), np.float32))


# llama.cpp writes K-quant types only for inputs that are a multiple of 256; others fall back (Q4_K -> Q5_0,
# Q5_K -> Q5_1, Q6_K -> Q8_0): SmolLM2's (hidden 576) Q4_K_M file is mostly Q5_0, with ffn_down in Q4_K/Q6_K.
# name: (type of the projections, types of some parts, the classes they load into)
MODELS = {"Q8_0": (Q.Q8_0, None, {Int8Linear}), "Q6_K": (Q.Q6_K, None, {Int8Linear}),
          "Q5_K": (Q.Q5_K, None, {Int8Linear}), "Q5_1": (Q.Q5_1, None, {Int8Linear}),
          "Q4_K": (Q.Q4_K, None, {Int4Linear}),
          "Q4_K_M-like": (Q.Q4_K, {"attn_v": Q.Q6_K, "ffn_down": Q.Q6_K}, {Int4Linear, Int8Linear}),
          "small-model Q4_K_M": (Q.Q5_0, {"attn_v": Q.Q8_0, "ffn_down": Q.Q6_K}, {Int8Linear})}


@pytest.mark.parametrize("name", list(MODELS))
def test_gguf_model_runs_packed_and_agrees_with_float32(kernel, name, tmp_path, monkeypatch, smol_tokenizer_dir):
    """A tiny GGUF of these types: every projection packed for the native kernel, each decode step one native
    call per layer; hidden states within float32 summation error of the float32 model's at every step (and the
    same from the weight cache), and the same greedy tokens through the engine."""
    from test_cpu_fast import BLOCK, run_steps

    from photoninfer import LLM, SamplingParams
    from photoninfer.config import packs_weights
    from photoninfer.model import native_decode
    from photoninfer.model.llama import CausalLM
    from photoninfer.model.loader import build_model, load_checkpoint
    from photoninfer.runner.attention import TorchPagedAttention

    monkeypatch.setenv("PHOTONINFER_CACHE", str(tmp_path / "cache"))
    qtype, part_types, classes = MODELS[name]
    path = write_quantized_gguf(tmp_path / "model.gguf", qtype, part_types=part_types)
    checkpoint = load_checkpoint(path)
    cpu = torch.device("cpu")
    reference, packed = (build_model(checkpoint, cpu, torch.float32, pack=pack) for pack in (False, True))
    linears = [m for layer in packed.layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                      layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    assert all(isinstance(m, PackedLinear) and m.runs_native for m in linears)
    assert {type(m) for m in linears} == classes
    for model in (reference, packed):
        model.attention = TorchPagedAttention(model.config.head_dim**-0.5, BLOCK)
    calls = []
    native_forward = native_decode.forward
    monkeypatch.setattr(native_decode, "forward", lambda *a: calls.append(1) or native_forward(*a))
    expected, got = (run_steps(model, [5, 13, 1], decode_steps=3) for model in (reference, packed))
    assert len(calls) == 3  # the decode steps
    for e, g in zip(expected, got):
        assert (g - e).abs().max() <= 1e-4 * e.abs().max()
    assert (got[-1] - expected[-2]).abs().max() > 0.1 * expected[-1].abs().max()
    with monkeypatch.context() as patch:  # the finished weights mapped from the weight cache, formats and all
        patch.setattr(CausalLM, "load_weights", lambda *args, **kwargs: pytest.fail("not from the weight cache"))
        cached = build_model(load_checkpoint(path), cpu, torch.float32, pack=True)
    cached.attention = packed.attention
    assert [m.native_format for m in linears] == [m.native_format for layer in cached.layers for m in (
        layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    assert all(torch.equal(g, c) for g, c in zip(got, run_steps(cached, [5, 13, 1], decode_steps=3)))
    if not packs_weights("auto", cpu):
        return
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [100, 200], [42] * 9]
    tokens = {}
    for dtype in ("float32", "auto"):
        outputs = LLM(path, tokenizer=smol_tokenizer_dir, device="cpu", dtype=dtype).generate(prompts, params)
        tokens[dtype] = [o.outputs[0].token_ids for o in outputs]
    assert tokens["auto"] == tokens["float32"] and all(len(t) == 8 for t in tokens["auto"])
