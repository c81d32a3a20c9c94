"""The LM head of the CPU fast path: approximate logits, with the largest ones recomputed exactly in float32.

The head is the largest matmul of a small model (SmolLM2: 49152 x 576, 113 MB in float32), and a decode
step reads all of it. Approximate logits come from a packed 4-bit copy of the head (group 32, 14 MB) for a
few rows (our native kernel with float32 activations where it is available, else torch's), or from a bf16 copy
for many rows (the bf16 matmul costs about the same for 1 or 16 rows, the 4-bit
kernel grows with them); a CPU without native bf16 keeps the float32 weight as its dense copy and runs the
native kernel for any rows (2x faster than a float32 matmul there). Either rounds the logits (bf16: ~0.06 at a
logit of 10; 4-bit: ~0.1), which would flip the arg-max at a few % of positions. Recomputing the `refine`
largest logits in float32 makes the arg-max and the top logprobs those of the float32 reference; the tail keeps
the approximation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from photoninfer.config import cpu_dense_dtype
from photoninfer.quant import native
from photoninfer.quant.gguf_blocks import GROUP_SIZE
from photoninfer.quant.packed import DENSE_MIN_ROWS, packed_kernel_fits


class RefinedHead(nn.Module):
    def __init__(self, weight: torch.Tensor, refine: int = 64, prepare: bool = True):
        """weight: float32 [vocab, hidden], shared with the embedding if tied. `prepare=False` leaves the
        derived copies empty (the weight cache fills them)."""
        super().__init__()
        vocab, hidden = weight.shape
        self.refine = min(refine, vocab)
        self.packs = packed_kernel_fits(hidden, vocab)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_dense", torch.empty(vocab, hidden, dtype=cpu_dense_dtype()))
        if self.packs:
            self.register_buffer("packed", torch.empty(0, dtype=torch.uint8))
            self.register_buffer("scales_and_zeros", torch.empty(hidden // GROUP_SIZE, vocab, 2, dtype=torch.bfloat16))
            self.register_buffer("panels", torch.empty(0, dtype=torch.uint8))  # the native kernel's copy, if used
        if prepare:
            self.prepare()

    def prepare(self) -> None:
        """Derive the dense (bf16, or the float32 weight itself) and the packed 4-bit copies from the weight."""
        self.weight_dense = self.weight.to(cpu_dense_dtype())
        if self.packs and native.kernel() is not None:
            self.panels = pack_native(self.weight)
            self.packed, self.scales_and_zeros = torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.bfloat16)
        elif self.packs:
            self.packed, self.scales_and_zeros = pack_int4(self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [T, hidden] -> float32 logits [T, vocab]."""
        few = hidden.shape[0] < DENSE_MIN_ROWS
        if self.packs and self.panels.numel() and (few or self.weight_dense.dtype == torch.float32):
            logits = native.kernel().matmul(hidden.float(), self.panels)
        elif self.packs and few:
            logits = torch.ops.aten._weight_int4pack_mm_for_cpu(hidden.to(torch.bfloat16), self.packed, GROUP_SIZE,
                                                                self.scales_and_zeros)
        else:
            logits = self._dense(hidden.to(self.weight_dense.dtype))
        logits = logits.float()
        top = logits.topk(self.refine, dim=-1).indices  # [T, refine]
        exact = torch.einsum("th,tkh->tk", hidden.float(), self.weight[top])
        return logits.scatter_(1, top, exact)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight_dense^T; through oneDNN with the weight reordered once into its own layout (a plain
        attribute: the layout belongs to this machine), where F.linear would reorder 56 MB on every call."""
        if not torch.backends.mkldnn.is_available():
            return F.linear(x, self.weight_dense)
        onednn = self.__dict__.get("_onednn_weight")
        if onednn is None:
            onednn = self.__dict__["_onednn_weight"] = torch.ops.mkldnn._reorder_linear_weight(self.weight_dense, 16)
        return torch.ops.mkldnn._linear_pointwise(x, onednn, None, "none", [], "")


def pack_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit quantization per group of 32 inputs (w ~ q * scale + min), in the CPU kernel's form:
    its packed codes and [groups, out, 2] bf16 (scale, zero) with w = (q - 8) * scale + zero."""
    rows, cols = weight.shape
    groups = weight.float().view(rows, cols // GROUP_SIZE, GROUP_SIZE)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp_min(1e-12)
    codes = ((groups - low) / scale).round_().clamp_(0, 15).to(torch.int32).view(rows, cols)
    scale, low = scale.squeeze(-1), low.squeeze(-1)
    scales_and_zeros = torch.stack([scale.t(), (low + 8 * scale).t()], dim=-1).to(torch.bfloat16).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), scales_and_zeros


def pack_native(weight: torch.Tensor) -> torch.Tensor:
    """Asymmetric 4-bit quantization per group of 32 inputs for the native kernel: w ~ d * q + m with float16
    d (the group's range / 15) and m (its minimum), codes rounded against the float16 d and m."""
    rows, cols = weight.shape
    groups = weight.float().view(rows, cols // GROUP_SIZE, GROUP_SIZE)
    low, high = groups.amin(-1), groups.amax(-1)
    d = ((high - low) / 15).clamp_min(1e-6).half()  # (not below float16's normal range)
    m = low.half()
    codes = ((groups - m.float()[..., None]) / d.float()[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    return native.pack_panels(codes.view(rows, cols).numpy(), d.numpy(), m.numpy())
