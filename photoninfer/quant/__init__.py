"""Quantized weight formats: one Linear class per format, chosen per layer from the checkpoint's tensor types.

Every class is built like `layers.Linear(in_features, out_features, bias)`, fills its parameters through their
`weight_loader(param, tensor, shard)` and packs them in `process_weights_after_loading()`; its reference is
the dense `layers.Linear` on the dequantized weight. Today, on the CPU fast path:
  * GGUF 4-bit (Q4_0, Q4_1, Q4_K): Int4Linear (our native float32 kernel over 4-bit panels where it builds,
    else torch's int4 kernel with bf16 matmul inputs);
  * Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, and fused layers mixing any of those eight types (Q4_K_M's q/k/v):
    Int8Linear (our native float32 kernel over 5-bit or int8 panels), where the native kernel builds;
every other layer (Q2_K, Q3_K, F16, ...; Int8Linear's types without the native kernel) is dequantized into a
dense Linear of the model dtype.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
from torch import nn

from photoninfer.model.layers import Linear
from photoninfer.quant import native
from photoninfer.quant.gguf_blocks import INT4_TYPES, PACKED_TYPES
from photoninfer.quant.int4 import Int4Linear
from photoninfer.quant.int8 import Int8Linear
from photoninfer.quant.packed import packed_kernel_fits


def linear_class(part_types: list[Optional[str]], in_features: int, out_features: int, pack: bool) -> type:
    """The Linear class for a layer whose checkpoint parts (fused q/k/v or gate/up) have these GGML types;
    `pack`: the CPU fast path is on (config.packs_weights)."""
    if not (pack and part_types and packed_kernel_fits(in_features, out_features)):
        return Linear
    if all(t in INT4_TYPES for t in part_types):
        return Int4Linear
    if all(t in PACKED_TYPES for t in part_types) and native.kernel() is not None:
        return Int8Linear
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
