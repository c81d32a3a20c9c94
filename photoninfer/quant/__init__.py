"""Quantized weight formats: one Linear class per format, chosen per layer from the checkpoint's tensor types.

Every class is built like `layers.Linear(in_features, out_features, bias)`, fills its parameters through their
`weight_loader(param, tensor, shard)` and packs them in `process_weights_after_loading()`; its reference is
the dense `layers.Linear` on the dequantized weight. Today: GGUF 4-bit (Q4_0, Q4_1, Q4_K) runs packed on the
CPU (Int4Linear: our native float32 kernel for Q4_0/Q4_1 where it builds, else torch's with bf16 matmul inputs);
every other type is dequantized into a dense Linear of the model dtype.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
from torch import nn

from photoninfer.model.layers import Linear
from photoninfer.quant.gguf_blocks import INT4_TYPES
from photoninfer.quant.int4 import Int4Linear, int4_kernel_fits


def linear_class(part_types: list[Optional[str]], in_features: int, out_features: int, pack: bool) -> type:
    """The Linear class for a layer whose checkpoint parts (fused q/k/v or gate/up) have these GGML types;
    `pack`: the CPU fast path is on (config.packs_weights)."""
    if pack and part_types and all(t in INT4_TYPES for t in part_types) and int4_kernel_fits(in_features, out_features):
        return Int4Linear
    return Linear


def use_quantized_linears(model: nn.Module, tensor_types: dict[str, str], device: torch.device,
                          pack: bool) -> dict[str, str]:
    """Swap each dense Linear of `model` for the class its checkpoint tensors call for (before loading).
    Returns {module name: class name} of the swapped layers."""
    owner = {id(p): name for name, m in model.named_modules() if isinstance(m, Linear)
             for p in m.parameters(recurse=False)}
    parts: dict[str, list] = defaultdict(list)
    for hf_name, (param, _rows) in model._weight_targets():
        if id(param) in owner and hf_name.endswith(".weight"):
            parts[owner[id(param)]].append(tensor_types.get(hf_name))
    swapped = {}
    for name, types in parts.items():
        old = model.get_submodule(name)
        cls = linear_class(types, old.in_features, old.out_features, pack)
        if cls is not type(old):
            parent_name, _, attr = name.rpartition(".")
            with torch.device(device):
                setattr(model.get_submodule(parent_name), attr, cls(old.in_features, old.out_features, old.bias is not None))
            swapped[name] = cls.__name__
    return swapped
