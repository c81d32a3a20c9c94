"""PackedLinear: what every Linear whose weight runs packed on the CPU shares (Int4Linear, Int8Linear).

A packed layer holds
  * `panels`: its weight in one of our native kernel's layouts (uint8; empty where the kernel does not run), and
    `panel_format`, that layout's number (native.FORMATS; a buffer, so the weight cache keeps it);
  * `dense`: the same weight as a dense bf16 matrix, for steps of many rows (a bf16 matmul costs about the same
    for 1 or 16 rows, the packed kernel's time grows with them); empty on a CPU without native bf16, where the
    native kernel runs every row count (as fast as a float32 matmul from ~16 rows on; bf16 is emulated there).
`exact(x)` runs the native kernel: float32 activations, the checkpoint's weights exactly, float32 sums, so it
equals F.linear(x, blocks.dequantize()) up to the order of float32 sums. cpu_fast.py and native_decode.py use
these attributes; `forward` is the layer on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from photoninfer.config import cpu_dense_dtype
from photoninfer.errors import ModelLoadError
from photoninfer.quant import native
from photoninfer.quant.gguf_blocks import GGUFBlocks

ACTIVATION_DTYPE = torch.bfloat16  # of the dense copy's matmul
DENSE_MIN_ROWS = 8  # from here on the dense bf16 matmul is faster (measured on 2 AVX-512/AMX cores)


def packed_kernel_fits(in_features: int, out_features: int) -> bool:
    """The packed kernels want whole groups of 32 inputs and output rows in multiples of 16."""
    return in_features % 32 == 0 and out_features % 16 == 0


def float16_exact(t: torch.Tensor) -> bool:
    """Whether every value of float32 `t` is a float16 value (then panels can hold it in half the bytes)."""
    return bool(torch.equal(t.half().float(), t))


class PackedLinear(nn.Module):
    def _register_packed(self, out_features: int, in_features: int, bias: bool) -> None:
        """The buffers every packed layer has (filled by process_weights_after_loading)."""
        self.register_buffer("panels", torch.empty(0, dtype=torch.uint8))
        self.register_buffer("panel_format", torch.tensor(-1))
        self.register_buffer("dense", torch.empty(out_features, in_features, dtype=ACTIVATION_DTYPE))
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=ACTIVATION_DTYPE), requires_grad=False) if bias
                     else None)

    def _rows_to_load(self, param: nn.Parameter, blocks, shard, types: tuple[str, ...]) -> slice:
        """weight_loader's checks: GGUF blocks of one of `types`, shaped as rows `shard` of `param` (all rows
        when None). Returns those rows."""
        rows = slice(None) if shard is None else shard
        expected = tuple(param.data[rows].shape)
        if not isinstance(blocks, GGUFBlocks) or blocks.type_name not in types:
            kind = blocks.type_name if isinstance(blocks, GGUFBlocks) else type(blocks).__name__
            raise ModelLoadError(f"{type(self).__name__} loads GGUF {'/'.join(types)} blocks, got {kind}")
        if tuple(blocks.shape) != expected:
            raise ModelLoadError(f"tensor has shape {tuple(blocks.shape)}, expected {expected}")
        return rows

    def _set_panels(self, panels: torch.Tensor, fmt: native.Format) -> None:
        self.panels, self.panel_format = panels, torch.tensor(fmt.code)
        self.__dict__.pop("_native_format", None)

    def _set_dense(self, weight) -> None:
        """The dense copy of a layer that runs the native kernel: `weight()` (float32 [out, in]) in bf16 where the
        CPU has native bf16, else none (config.cpu_dense_dtype)."""
        bf16 = cpu_dense_dtype() == torch.bfloat16
        self.dense = weight().to(ACTIVATION_DTYPE) if bf16 else torch.empty(0, dtype=torch.float32)

    @property
    def runs_native(self) -> bool:
        """Whether few rows run our native float32 kernel."""
        return self.panels.numel() > 0

    @property
    def native_format(self) -> native.Format:
        fmt = self.__dict__.get("_native_format")  # read once: int() of a tensor costs a microsecond a call
        if fmt is None:
            fmt = self.__dict__["_native_format"] = native.FORMATS[int(self.panel_format)]
        return fmt

    def exact(self, x: torch.Tensor) -> torch.Tensor:
        """x float32 [T, in_features] -> float32 [T, out_features] through the native kernel, for any T
        (runs_native only): exact weights, float32 sums."""
        y = native.kernel().matmul(x, self.panels, self.native_format)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in_features] -> [T, out_features] in x's dtype: the native kernel (float32) for fewer than
        DENSE_MIN_ROWS rows (any rows without a dense copy), else the dense bf16 copy."""
        if self.runs_native and (x.shape[0] < DENSE_MIN_ROWS or not self.dense.numel()):
            return self.exact(x.float()).to(x.dtype)
        return F.linear(x.to(ACTIVATION_DTYPE), self.dense, self.bias).to(x.dtype)
