"""The LM head of the CPU fast path: approximate logits, with the largest ones recomputed exactly in float32.

The head is the largest matmul of a small model (SmolLM2: 49152 x 576, 113 MB in float32), and a decode
step reads all of it. Approximate logits come from a packed 4-bit copy of the head (group 32, 14 MB) for a
few rows, or from a bf16 copy for many rows (the bf16 matmul costs about the same for 1 or 16 rows, the 4-bit
kernel grows with them). Either rounds the logits (bf16: ~0.06 at a logit of 10; 4-bit: ~0.1), which would flip
the arg-max at a few % of positions. Recomputing the `refine` largest logits in float32 makes the arg-max
and the top logprobs those of the float32 reference; the tail keeps the approximation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from photoninfer.quant.gguf_blocks import GROUP_SIZE
from photoninfer.quant.int4 import DENSE_MIN_ROWS, int4_kernel_fits


class RefinedHead(nn.Module):
    def __init__(self, weight: torch.Tensor, refine: int = 64, prepare: bool = True):
        """weight: float32 [vocab, hidden], shared with the embedding if tied. `prepare=False` leaves the
        derived copies empty (the weight cache fills them)."""
        super().__init__()
        vocab, hidden = weight.shape
        self.refine = min(refine, vocab)
        self.packs = int4_kernel_fits(hidden, vocab)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_bf16", torch.empty(vocab, hidden, dtype=torch.bfloat16))
        if self.packs:
            self.register_buffer("packed", torch.empty(0, dtype=torch.uint8))
            self.register_buffer("scales_and_zeros", torch.empty(hidden // GROUP_SIZE, vocab, 2, dtype=torch.bfloat16))
        if prepare:
            self.prepare()

    def prepare(self) -> None:
        """Derive the bf16 and the packed 4-bit copies from the float32 weight."""
        self.weight_bf16 = self.weight.to(torch.bfloat16)
        if self.packs:
            self.packed, self.scales_and_zeros = pack_int4(self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [T, hidden] -> float32 logits [T, vocab]."""
        x = hidden.to(torch.bfloat16)
        if self.packs and x.shape[0] < DENSE_MIN_ROWS:
            logits = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP_SIZE, self.scales_and_zeros)
        else:
            logits = F.linear(x, self.weight_bf16)
        logits = logits.float()
        top = logits.topk(self.refine, dim=-1).indices  # [T, refine]
        exact = torch.einsum("th,tkh->tk", hidden.float(), self.weight[top])
        return logits.scatter_(1, top, exact)


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
