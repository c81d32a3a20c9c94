"""Int4Linear: GGUF Q4_0 / Q4_1 / Q4_K weights executed packed on the CPU.

Where our native kernel is available (quant/native.py: built with the system C compiler, AVX-512), a layer
runs it for fewer than DENSE_MIN_ROWS rows (packed.py): float32 activations, exact weights, float32 sums, so it
matches the float32 reference to ~1e-6 and is faster than torch's kernel below. Its panels hold the scales and
biases as float16 where they all are float16 values (Q4_0, Q4_1), else as float32 (Q4_K: d * sc does not fit
float16). Otherwise (no compiler, no AVX-512):

Each group of 32 inputs of an output row holds 4-bit codes q and w = scale * q + bias (see gguf_blocks).
torch's CPU kernel `_weight_int4pack_mm_for_cpu` computes with w = (q - 8) * scale + zero, so zero = bias +
8 * scale; scales and zeros are bfloat16 (the kernel's only fast dtype, with bf16 activations), which rounds
them to 8 significant bits, the only difference from the float32 dequantize-then-matmul reference
(`F.linear(x, blocks.dequantize())`, what the tests compare against).

The kernel is a matrix-vector product at heart: its time grows with the number of rows, while a bf16 matmul
(AMX/AVX-512) costs about the same for 1 or 16 rows. So each layer also keeps the weight it computes with as
a dense bf16 matrix, used from DENSE_MIN_ROWS rows on (batched decode, prefill).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from photoninfer.errors import ModelLoadError
from photoninfer.quant import native
from photoninfer.quant.gguf_blocks import GROUP_SIZE, INT4_TYPES, decode_int4
from photoninfer.quant.packed import ACTIVATION_DTYPE, DENSE_MIN_ROWS, PackedLinear, float16_exact, packed_kernel_fits


def bf16_scales_and_zeros(scales: torch.Tensor, biases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 (scale, zero) per group for the kernel's w = (q - 8) * scale + zero, from w = scale * q + bias.

    Rounding to bf16 (8 significant bits; GGUF stores float16) is the packed path's only change to the weights.
    Fitting the zero to each group's codes (least squares) cuts that weight error by 8% on SmolLM2, which
    changed neither the KL divergence from float32 nor the flip rate measurably: it is not done."""
    return scales.to(ACTIVATION_DTYPE), (biases + 8 * scales).to(ACTIVATION_DTYPE)


class Int4Linear(PackedLinear):
    """Loads GGUF 4-bit blocks (fused layers: one row range per part) and runs them packed."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        if not packed_kernel_fits(in_features, out_features):
            raise ModelLoadError(f"Int4Linear needs in_features % {GROUP_SIZE} == 0 and out_features % 16 == 0, "
                                 f"got {in_features} -> {out_features}")
        self.in_features, self.out_features = in_features, out_features
        groups = in_features // GROUP_SIZE
        # While loading: `weight` holds the 4-bit codes one per byte, beside per-group scales and biases.
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.uint8), requires_grad=False)
        self.weight.weight_loader = self.load_blocks
        self.register_buffer("_scales", torch.empty(out_features, groups, dtype=torch.float32), persistent=False)
        self.register_buffer("_biases", torch.empty(out_features, groups, dtype=torch.float32), persistent=False)
        self.register_buffer("scales_and_zeros", torch.empty(groups, out_features, 2, dtype=ACTIVATION_DTYPE))
        self._register_packed(out_features, in_features, bias)  # panels stay empty where torch's kernel runs

    def load_blocks(self, param: nn.Parameter, blocks, shard=None) -> None:
        """weight_loader for `weight`: decode GGUF 4-bit blocks into rows `shard`."""
        rows = self._rows_to_load(param, blocks, shard, INT4_TYPES)
        codes, scales, biases = decode_int4(blocks)
        param.data[rows] = codes
        self._scales[rows] = scales
        self._biases[rows] = biases

    def process_weights_after_loading(self) -> None:
        """Pack the codes for the native kernel (float16 scales and biases where they fit, else float32) or
        else for torch's kernel (scales/zeros [groups, out, 2] bf16); keep the dense copy for many rows
        (PackedLinear._set_dense; torch's kernel runs packed only on CPUs with native bf16)."""
        codes, scales, biases = self.weight.data, self._scales, self._biases
        self._scales = self._biases = None  # the loading buffers are not needed any more
        if native.kernel() is not None:
            if float16_exact(scales) and float16_exact(biases):
                self._set_panels(native.pack_panels(codes.numpy(), scales.half().numpy(), biases.half().numpy()),
                                 native.Q4_F16)
            else:
                self._set_panels(native.pack_panels(codes.numpy(), scales.numpy(), biases.numpy()), native.Q4_F32)
            self._set_dense(lambda: codes.float() * scales.repeat_interleave(GROUP_SIZE, 1)
                            + biases.repeat_interleave(GROUP_SIZE, 1))
            self.weight = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
            self.scales_and_zeros = torch.empty(0, dtype=ACTIVATION_DTYPE)
            return
        scales, zeros = bf16_scales_and_zeros(scales, biases)
        self.scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).contiguous()
        self.dense = dense_weight(codes, self.scales_and_zeros)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        self.weight = nn.Parameter(packed, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in_features] -> [T, out_features] in x's dtype: float32 through the native kernel for fewer
        than DENSE_MIN_ROWS rows where it runs (any rows without a dense copy); else torch's 4-bit kernel (bf16
        activations) for few rows and the dense copy for many."""
        if self.runs_native and (x.shape[0] < DENSE_MIN_ROWS or not self.dense.numel()):
            return self.exact(x.float()).to(x.dtype)
        if x.shape[0] >= DENSE_MIN_ROWS:
            y = F.linear(x.to(self.dense.dtype), self.dense)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(ACTIVATION_DTYPE), self.weight, GROUP_SIZE,
                                                           self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


def dense_weight(codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The weight the kernel computes with, (q - 8) * scale + zero from the bf16 scales and zeros, as a
    dense bf16 [out, in] matrix. codes: uint8 [out, in]; scales_and_zeros: [groups, out, 2]."""
    scales = scales_and_zeros[..., 0].t().float().repeat_interleave(GROUP_SIZE, dim=1)
    zeros = scales_and_zeros[..., 1].t().float().repeat_interleave(GROUP_SIZE, dim=1)
    return ((codes.float() - 8) * scales + zeros).to(ACTIVATION_DTYPE)
