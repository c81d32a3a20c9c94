"""Building blocks of the decoder: Linear (the seam quantized formats replace), RMSNorm, rotary embedding.

Every op here is plain torch and is the numerical reference the GPU kernels are tested against.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from photoninfer.errors import ModelLoadError


def default_weight_loader(param: nn.Parameter, tensor, shard: Optional[slice] = None) -> None:
    """Copy a checkpoint tensor into `param` (rows `shard` of it for fused layers), casting to its dtype.

    Every parameter is filled through `param.weight_loader(param, tensor, shard)`, this function unless the
    module that owns the parameter set its own (quantized formats keep their blocks packed). `tensor` is a
    torch.Tensor or a quantized tensor with `.shape` and `.dequantize()` (GGUF blocks).
    """
    dest = param.data if shard is None else param.data[shard]
    if tuple(dest.shape) != tuple(tensor.shape):
        raise ModelLoadError(f"tensor has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
    if not isinstance(tensor, torch.Tensor):
        tensor = tensor.dequantize()
    dest.copy_(tensor)


class Linear(nn.Module):
    """y = x @ W^T (+ b), dense in the model's dtype: the reference every quantized Linear is compared with.

    The seam quantized formats plug into (photoninfer/quant): a Linear class is built with
    (in_features, out_features, bias); its parameters carry a `weight_loader`; once every checkpoint tensor
    is loaded, `process_weights_after_loading()` turns them into the form `forward` runs on.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def process_weights_after_loading(self) -> None:
        """Dense weights run as loaded."""


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as HF does), optionally fused with the residual add that precedes it.

    `use_kernel()` switches to the Triton kernels (CUDA); this torch code is their reference."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.kernels = None

    def use_kernel(self) -> None:
        from photoninfer.kernels import rmsnorm

        self.kernels = rmsnorm

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """Without `residual`: returns norm(x). With it: returns (norm(x + residual), x + residual)."""
        if self.kernels is not None:
            if residual is None:
                return self.kernels.rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
            return self.kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self.normalize(x)
        x = x + residual
        return self.normalize(x), x


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: normalized in float32, rounded to x's dtype, then scaled by the weight."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> silu(gate) * up; the reference of kernels.activation.silu_and_mul."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def llama3_scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama-3.1 "llama3" rope scaling: long wavelengths are divided by `factor`, short ones kept,
    and the band in between interpolated smoothly."""
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the HF "rotate half" layout, with a precomputed cos/sin table."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: Optional[dict]):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type == "llama3":
            inv_freq = llama3_scaled_inv_freq(inv_freq, scaling)
        elif rope_type == "freq_factors":  # GGUF's rope_freqs tensor: the same scaling, precomputed
            inv_freq = inv_freq / torch.tensor(scaling["freq_factors"], dtype=torch.float32)
        elif rope_type not in ("default", None):
            from photoninfer.errors import ConfigError

            raise ConfigError(f"unsupported rope_scaling type {rope_type!r}; supported: default, llama3, freq_factors")
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)  # [max_position, head_dim/2]
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, Hq, D], k: [T, Hk, D], positions: [T] -> rotated (q, k) in q's dtype."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
