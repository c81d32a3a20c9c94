"""Int8Linear: GGUF Q8_0 / Q5_K / Q6_K weights, and fused layers mixing K-quants, executed packed on the CPU.

Each of those types is int8 codes with a float32 scale (and, for Q5_K, a bias) per group of inputs (see
gguf_blocks), so one native kernel (int8_kernels.c) runs them all with the weights exactly: float32
activations and sums, equal to F.linear(x, blocks.dequantize()) up to the order of float32 sums. A layer's
group is 32 inputs where every part has groups of 32 (Q8_0, Q5_K) and 16 otherwise (Q6_K, or a q/k/v fusing
Q4_K parts with a Q6_K one, as Q4_K_M files do: 32-groups split in two), with biases where any part has them.
Bytes per weight: 1.125 (Q8_0), 1.25 (Q6_K, Q5_K), 1.5 (mixed groups of 16 with biases); a GGUF holds
1.06 / 0.82 / 0.69. Only built where the native kernel runs (quant.linear_class); else such layers are dense.
"""

from __future__ import annotations

import torch
from torch import nn

from photoninfer.errors import ModelLoadError
from photoninfer.quant import native
from photoninfer.quant.gguf_blocks import PACKED_TYPES, GGUFBlocks, decode_int8
from photoninfer.quant.packed import ACTIVATION_DTYPE, PackedLinear, packed_kernel_fits

FINE_GROUP = 16  # the loading buffers hold one scale and bias per 16 inputs (the finest group of any type)


class Int8Linear(PackedLinear):
    """Loads GGUF blocks of PACKED_TYPES (fused layers: one row range per part) and runs them as int8 codes."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        if not packed_kernel_fits(in_features, out_features):
            raise ModelLoadError(f"Int8Linear needs in_features % 32 == 0 and out_features % 16 == 0, "
                                 f"got {in_features} -> {out_features}")
        self.in_features, self.out_features = in_features, out_features
        # While loading: `weight` holds the codes, beside a scale and a bias per 16 inputs.
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.weight.weight_loader = self.load_blocks
        groups = in_features // FINE_GROUP
        self.register_buffer("_scales", torch.empty(out_features, groups, dtype=torch.float32), persistent=False)
        self.register_buffer("_biases", torch.zeros(out_features, groups, dtype=torch.float32), persistent=False)
        self._groups: set[int] = set()  # of the parts loaded
        self._biased = False
        self._register_packed(out_features, in_features, bias)

    def load_blocks(self, param: nn.Parameter, blocks, shard=None) -> None:
        """weight_loader for `weight`: decode GGUF blocks into rows `shard`."""
        rows = slice(None) if shard is None else shard
        expected = tuple(param.data[rows].shape)
        if not isinstance(blocks, GGUFBlocks) or blocks.type_name not in PACKED_TYPES:
            kind = blocks.type_name if isinstance(blocks, GGUFBlocks) else type(blocks).__name__
            raise ModelLoadError(f"Int8Linear loads GGUF {'/'.join(PACKED_TYPES)} blocks, got {kind}")
        if tuple(blocks.shape) != expected:
            raise ModelLoadError(f"tensor has shape {tuple(blocks.shape)}, expected {expected}")
        codes, scales, biases = decode_int8(blocks)
        group = self.in_features // scales.shape[1]
        param.data[rows] = codes
        self._scales[rows] = scales.repeat_interleave(group // FINE_GROUP, 1)
        if biases is not None:
            self._biases[rows] = biases.repeat_interleave(group // FINE_GROUP, 1)
            self._biased = True
        self._groups.add(group)

    def process_weights_after_loading(self) -> None:
        """Pack the codes into the native kernel's panels (groups of 32 where every part allows, else 16) and
        keep the dense bf16 copy for many rows."""
        if native.kernel() is None:
            raise ModelLoadError("Int8Linear needs PhotonInfer's native kernel, which is unavailable here")
        codes, scales, biases = self.weight.data, self._scales, self._biases
        self._scales = self._biases = None  # the loading buffers are not needed any more
        self.dense = (codes.float() * scales.repeat_interleave(FINE_GROUP, 1)
                      + biases.repeat_interleave(FINE_GROUP, 1)).to(ACTIVATION_DTYPE)
        if self._groups == {32}:  # every pair of 16-groups shares its scale and bias
            scales, biases = scales[:, ::2], biases[:, ::2]
        panels, fmt = native.pack_int8_panels(codes.numpy(), scales.contiguous().numpy(),
                                              biases.contiguous().numpy() if self._biased else None)
        self._set_panels(panels, fmt)
        self.weight = nn.Parameter(torch.empty(0, dtype=torch.int8), requires_grad=False)
