"""Decode steps of the CPU fast path as one native call per decoder layer (quant/cpu_layer.c).

A small model's decode step on the CPU is mostly the dispatch of ~20 torch ops a layer; where every linear
layer runs one of our native packed kernels (model.runs_native; formats may differ from layer to layer), the
layer's norms, RoPE, K/V write, attention over the paged cache, SiLU·mul and residual adds run inside the same
C call, in float32, as cpu_fast.py's torch forward does them (the tests compare the two). Llama-shaped models
only (no q/k norm, no biases, a float32 KV cache); `supported` says whether a model qualifies, else cpu_fast's
torch forward runs.
"""

from __future__ import annotations

from typing import Optional

import torch

from photoninfer.quant import native
from photoninfer.quant.packed import PackedLinear

MAX_ROWS = 64  # decode steps of up to this many sequences run natively


def supported(model) -> bool:
    """Whether `model`'s decode steps can run natively (checked once; the answer is kept on the model)."""
    ok = getattr(model, "_native_decode_ok", None)
    if ok is None:
        ok = model._native_decode_ok = native.kernel() is not None and getattr(model, "runs_native", False) and all(
            _layer_fits(layer) for layer in model.layers)
    return ok


def _layer_fits(layer) -> bool:
    attn, mlp = layer.self_attn, layer.mlp
    linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
    return (attn.q_norm is None and attn.head_dim % 16 == 0 and mlp.intermediate_size % 16 == 0
            and all(isinstance(m, PackedLinear) and m.runs_native and m.bias is None for m in linears)
            and all(w.dtype == torch.float32 and w.is_contiguous() for w in norms))


def forward(model, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor], meta) -> Optional[torch.Tensor]:
    """A decode step (meta.decode_only) -> hidden states [T, hidden], or None where the cache does not fit
    (not float32, not contiguous, blocks not a power of two): then the torch forward runs."""
    block_size = kv_caches[0].shape[2]
    if block_size & (block_size - 1) or any(c.dtype != torch.float32 or not c.is_contiguous() for c in kv_caches):
        return None
    cfg, attn = model.config, model.layers[0].self_attn
    rows = len(input_ids)
    blocks = meta.decode_blocks.view(rows, -1)
    cos, sin = model.rope.cos[positions].contiguous(), model.rope.sin[positions].contiguous()  # [T, D / 2]
    slots, lens = meta.slot_mapping.long().contiguous(), (positions + 1).long()
    step = native.Step(rows=rows, hidden=cfg.hidden_size, heads=attn.num_heads, kv_heads=attn.num_kv_heads,
                       head_dim=attn.head_dim, inter=model.layers[0].mlp.intermediate_size, block_size=block_size,
                       block_shift=block_size.bit_length() - 1, max_blocks=blocks.shape[1], eps=model.layers[0].input_layernorm.eps, scale=model.attention.scale,
                       cos=cos.data_ptr(), sin=sin.data_ptr(), slots=slots.data_ptr(), lens=lens.data_ptr(),
                       blocks=blocks.data_ptr(), nthreads=torch.get_num_threads())
    lib = native.kernel().lib
    work = torch.empty(lib.native_decode_work_floats(step), dtype=torch.float32)
    step.work = work.data_ptr()
    residual = model.embed_tokens(input_ids).float().contiguous()
    x = torch.zeros_like(residual)
    for layer in _layer_structs(model, kv_caches):
        rc = lib.native_decode_layer(step, layer, residual.data_ptr(), x.data_ptr())
        if rc:
            raise MemoryError("native decode layer: out of memory") if rc == -1 else RuntimeError(
                f"native decode layer failed ({rc}: a weight format it does not know)")
    return model.norm.normalize(residual + x)


def _layer_structs(model, kv_caches: list[torch.Tensor]) -> list:
    """The layers' weight and cache pointers, built once per set of KV caches."""
    key = tuple(c.data_ptr() for c in kv_caches)
    if getattr(model, "_native_layers_key", None) != key:
        model._native_layers = [_layer_struct(layer, cache) for layer, cache in zip(model.layers, kv_caches)]
        model._native_layers_key = key
    return model._native_layers


def _layer_struct(layer, kv_cache: torch.Tensor):
    attn, mlp = layer.self_attn, layer.mlp
    return native.Layer(in_norm=layer.input_layernorm.weight.data_ptr(),
                        post_norm=layer.post_attention_layernorm.weight.data_ptr(),
                        qkv=_linear(attn.qkv_proj), o=_linear(attn.o_proj), gate_up=_linear(mlp.gate_up_proj),
                        down=_linear(mlp.down_proj),
                        k_cache=kv_cache[0].data_ptr(), v_cache=kv_cache[1].data_ptr())


def _linear(module: PackedLinear):
    return native.Linear(panels=module.panels.data_ptr(), format=module.native_format.code)
