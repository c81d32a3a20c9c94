"""Int8Linear: GGUF Q8_0 / Q5_0 / Q5_1 / Q5_K / Q6_K weights, and fused layers mixing those with 4-bit types
(Q4_K_M's q/k/v), executed packed on the CPU.

Each of those types is small integer codes with a float32 scale (and a bias) per group of inputs (see
gguf_blocks), so our native kernels run them with the weights exactly: float32 activations and sums, equal to
F.linear(x, blocks.dequantize()) up to the order of float32 sums. The layer picks the most compact layout its
codes allow:
  * 5-bit panels (q4_kernels.c with a fifth-bit plane) where every code is in 0..31 with groups of 32
    (Q5_0, Q5_1, Q5_K, and mixes with Q4_*): 0.75 byte per weight with float16 scales (Q5_0, Q5_1), 0.875
    with float32 ones (Q5_K); a GGUF holds 0.69;
  * else int8 panels (int8_kernels.c), groups of 32 where every part has them (Q8_0: 1.125 byte per weight,
    GGUF 1.06) and of 16 otherwise (Q6_K: 1.25, GGUF 0.82; a Q6_K part fused with Q4_K ones: 1.5, with
    biases).
Only built where the native kernel runs (quant.linear_class); else such layers are dequantized to dense ones.
"""

from __future__ import annotations

import torch
from torch import nn

from photoninfer.errors import ModelLoadError
from photoninfer.quant import native
from photoninfer.quant.gguf_blocks import PACKED_TYPES, decode_int8
from photoninfer.quant.packed import PackedLinear, float16_exact, packed_kernel_fits

FINE_GROUP = 16  # the loading buffers hold one scale and bias per 16 inputs (the finest group of any type)


class Int8Linear(PackedLinear):
    """Loads GGUF blocks of PACKED_TYPES (fused layers: one row range per part); runs them as 5-bit or int8 panels."""

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
        rows = self._rows_to_load(param, blocks, shard, PACKED_TYPES)
        codes, scales, biases = decode_int8(blocks)
        group = self.in_features // scales.shape[1]
        param.data[rows] = codes
        self._scales[rows] = scales.repeat_interleave(group // FINE_GROUP, 1)
        if biases is not None:
            self._biases[rows] = biases.repeat_interleave(group // FINE_GROUP, 1)
            self._biased = True
        self._groups.add(group)

    def process_weights_after_loading(self) -> None:
        """Pack the codes into 5-bit panels where they fit, else int8 panels (groups of 32 where every part
        allows, else 16); keep the dense copy for many rows (PackedLinear._set_dense)."""
        if native.kernel() is None:
            raise ModelLoadError("Int8Linear needs PhotonInfer's native kernel, which is unavailable here")
        codes, scales, biases = self.weight.data, self._scales, self._biases
        self._scales = self._biases = None  # the loading buffers are not needed any more
        self._set_dense(lambda: codes.float() * scales.repeat_interleave(FINE_GROUP, 1)
                        + biases.repeat_interleave(FINE_GROUP, 1))
        if self._groups == {32}:  # every pair of 16-groups shares its scale and bias
            scales, biases = scales[:, ::2].contiguous(), biases[:, ::2].contiguous()
        if self._groups == {32} and int(codes.min()) >= 0 and int(codes.max()) <= 31:
            if float16_exact(scales) and float16_exact(biases):
                scales, biases = scales.half(), biases.half()
            self._set_panels(native.pack_panels(codes.numpy(), scales.numpy(), biases.numpy(), bits=5),
                             native.nibble_format(scales.numpy().dtype, 5))
        else:
            self._set_panels(*native.pack_int8_panels(codes.numpy(), scales.contiguous().numpy(),
                                                      biases.contiguous().numpy() if self._biased else None))
        self.weight = nn.Parameter(torch.empty(0, dtype=torch.int8), requires_grad=False)

