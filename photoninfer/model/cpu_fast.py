"""The decoder forward of the CPU fast path: the model of llama.py in fewer, larger torch ops.

Used when the CPU runs packed weights (dtype auto or bfloat16, config.packs_weights; quant/packed.py); dtype float32
keeps the reference forward of llama.py, which this one is tested against. On a small model most of a decode
step is per-op overhead, so:
  * what every layer shares is computed once per step (the rotary cos/sin of the step's positions);
  * where every packed layer runs our native float32 kernel (quant/native.py; model.runs_native), a step of up
    to EXACT_MAX_ROWS tokens (any step on a CPU without native bf16: there the layers keep no dense copies)
    runs all its matmuls through it and stays float32 (exact weights), and a decode step of up to
    native_decode.MAX_ROWS sequences is one native call per layer (native_decode.py) instead of the torch ops
    below;
  * otherwise the matmuls take and give bf16 (torch's packed kernels' fast dtype; float32 on a CPU without
    native bf16, config.cpu_dense_dtype): norms hand them bf16 directly and SiLU·mul runs on their bf16 output;
    the residual stream, RoPE and attention stay in the model dtype (float32 for auto);
  * the norms are torch's fused rms_norm, and q and k rotate as one tensor (they are adjacent in qkv);
  * in those bf16 steps the packed layers run torch's 4-bit kernel only in decode steps of fewer than
    DENSE_MIN_ROWS rows; every other step (batched decode, any prompt) multiplies by their dense bf16 copies,
    in oneDNN's own blocked layout, reordered once at the first forward (~0.1 s): F.linear would reorder them on
    every call, which costs a third of a batched step over weights that no longer sit in the cache. Choosing by
    the kind of step, not only by its rows, keeps a prompt's tokens the same alone or batched with other prompts.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from photoninfer.config import cpu_dense_dtype
from photoninfer.model import native_decode
from photoninfer.quant.packed import DENSE_MIN_ROWS, PackedLinear
from photoninfer.runner.attention import write_kv

# Steps of up to this many tokens run every packed matmul through the native float32 kernel (exact weights);
# longer ones (long prompts, many prompts at once) through the dense bf16 copies (AMX: ~5x faster there).
EXACT_MAX_ROWS = int(os.environ.get("PHOTONINFER_EXACT_MAX_ROWS", 512))


class StepRope:
    """The rotary tables of one step's positions, shared by all layers: x -> x * cos + swap_halves(x) * sin,
    with sin's first half negated (the same products and sums as layers.RotaryEmbedding)."""

    def __init__(self, rope, positions: torch.Tensor):
        cos, sin = rope.cos[positions], rope.sin[positions]  # [T, D/2] float32
        self.cos = torch.cat((cos, cos), dim=-1).unsqueeze(1)  # [T, 1, D]
        self.sin = torch.cat((-sin, sin), dim=-1).unsqueeze(1)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x: float32 [T, H, D] -> rotated, float32."""
        half = x.shape[-1] // 2
        swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
        return x * self.cos + swapped * self.sin


def fast_forward(model, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 meta) -> torch.Tensor:
    """CausalLM.forward's contract: input_ids, positions [T] -> hidden states [T, hidden] (model dtype)."""
    if not getattr(model, "onednn_ready", False):
        _reorder_dense_weights(model)
    if meta.decode_only and len(input_ids) <= native_decode.MAX_ROWS and native_decode.supported(model):
        hidden = native_decode.forward(model, input_ids, positions, kv_caches, meta)
        if hidden is not None:
            return hidden
    # every matmul through the native float32 kernel (any step where the CPU lacks native bf16: no dense copies)
    exact = model.runs_native and (len(input_ids) <= EXACT_MAX_ROWS or model.dense_dtype == torch.float32)
    dense = not exact and not (meta.decode_only and len(input_ids) < DENSE_MIN_ROWS)
    rope = StepRope(model.rope, positions)
    act = torch.float32 if exact else model.dense_dtype  # the matmuls' inputs
    residual = None
    x = model.embed_tokens(input_ids)
    for layer, kv_cache in zip(model.layers, kv_caches):
        residual = x if residual is None else residual + x
        x = _attention(layer.self_attn, _norm(layer.input_layernorm, residual, act), rope, kv_cache,
                       model.attention, meta, dense)
        residual = residual + x
        x = _mlp(layer.mlp, _norm(layer.post_attention_layernorm, residual, act), dense)
    # the reference norm: the LM head's input as in float32; in the model dtype (a bf16 model's native-kernel
    # steps run float32)
    return model.norm.normalize(residual + x).to(model.norm.weight.dtype)


def _norm(norm, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # (a bf16 model's residual is float32 in steps of the native kernel: the weight follows it, as torch's
    # fused rms_norm wants one dtype)
    return F.rms_norm(x, norm.weight.shape, norm.weight.to(x.dtype), norm.eps).to(dtype)


def _reorder_dense_weights(model) -> None:
    """Give each packed layer `onednn_weight`: its dense copy in oneDNN's layout (a plain attribute, not
    saved with the weights: the layout belongs to this machine's oneDNN). Sets model.runs_native: all packed
    layers run the native kernel for few rows (float32 steps), and model.dense_dtype: the other steps' matmul
    dtype."""
    packed = [module for module in model.modules() if isinstance(module, PackedLinear)]
    if torch.backends.mkldnn.is_available():
        for module in packed:
            if module.dense.numel():
                module.onednn_weight = torch.ops.mkldnn._reorder_linear_weight(module.dense, 16)
    model.runs_native = bool(packed) and all(module.runs_native for module in packed)
    model.dense_dtype = cpu_dense_dtype()
    model.onednn_ready = True


def _matmul(linear, x: torch.Tensor, dense: bool) -> torch.Tensor:
    """x's dtype in and out (model.dense_dtype, or float32 in steps of the native kernel); `dense`: a packed
    layer multiplies by its dense copy if it has one (else it runs the native kernel). A layer that is not
    packed (e.g. a K-quant q/k/v mix) runs in its own dtype."""
    if dense and isinstance(linear, PackedLinear) and linear.dense.numel():
        onednn_weight = getattr(linear, "onednn_weight", None)
        if onednn_weight is not None:  # computes exactly F.linear(x, linear.dense, linear.bias)
            return torch.ops.mkldnn._linear_pointwise(x, onednn_weight, linear.bias, "none", [], "")
        return F.linear(x, linear.dense, linear.bias)
    if isinstance(linear, PackedLinear) and linear.runs_native and x.dtype == torch.float32:
        return linear.exact(x)  # (a step of the native kernel)
    if isinstance(linear, PackedLinear) or linear.weight.dtype == x.dtype:
        return linear(x)  # (not dense: fewer than DENSE_MIN_ROWS rows, so a packed layer runs its kernel)
    return linear(x.to(linear.weight.dtype)).to(x.dtype)


def _attention(attn, x: torch.Tensor, rope: StepRope, kv_cache: torch.Tensor, backend, meta, dense: bool):
    num_tokens, heads, kv_heads, head_dim = x.shape[0], attn.num_heads, attn.num_kv_heads, attn.head_dim
    qkv = _matmul(attn.qkv_proj, x, dense).float()
    qk = qkv[:, :attn.q_size + attn.kv_size].view(num_tokens, heads + kv_heads, head_dim)
    v = qkv[:, attn.q_size + attn.kv_size:].view(num_tokens, kv_heads, head_dim)
    if attn.q_norm is not None:  # Qwen3: each head normalized before rotating it
        qk = torch.cat((_head_norm(attn.q_norm, qk[:, :heads]), _head_norm(attn.k_norm, qk[:, heads:])), dim=1)
    qk = rope.rotate(qk)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    write_kv(k_cache, v_cache, qk[:, heads:], v, meta.slot_mapping)
    q = qk[:, :heads] if k_cache.element_size() == 1 else qk[:, :heads].to(k_cache.dtype)  # FP8 K/V: q stays float32
    out = backend.attend(q, k_cache, v_cache, meta)
    return _matmul(attn.o_proj, out.reshape(num_tokens, attn.q_size).to(x.dtype), dense)


def _head_norm(norm, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, norm.weight.shape, norm.weight.float(), norm.eps)


def _mlp(mlp, x: torch.Tensor, dense: bool) -> torch.Tensor:
    gate_up = _matmul(mlp.gate_up_proj, x, dense)
    size = mlp.intermediate_size
    return _matmul(mlp.down_proj, F.silu(gate_up[:, :size]) * gate_up[:, size:], dense)
