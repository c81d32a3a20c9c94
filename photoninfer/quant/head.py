"""The LM head of the CPU fast path: bf16 logits, with the largest ones recomputed exactly in float32.

The head is the largest matmul of a small model (SmolLM2: 49152 x 576), so reading it in bf16 halves a
third of the bytes of a decode step. But bf16 rounds the logits themselves to 8 significant bits (~0.06 at a
logit of 10), which flips the arg-max at ~2% of positions. Recomputing the `refine` largest logits in float32
makes the arg-max and the top logprobs those of the float32 reference; the tail keeps bf16's ~3 digits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RefinedBf16Head(nn.Module):
    def __init__(self, weight: torch.Tensor, refine: int = 64):
        super().__init__()
        self.refine = min(refine, weight.shape[0])
        self.register_buffer("weight", weight)  # float32 [vocab, hidden], shared with the embedding if tied
        self.register_buffer("weight_bf16", weight.to(torch.bfloat16))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: float32 [T, hidden] -> float32 logits [T, vocab]."""
        logits = F.linear(hidden.to(torch.bfloat16), self.weight_bf16).float()
        top = logits.topk(self.refine, dim=-1).indices  # [T, refine]
        exact = torch.einsum("th,tkh->tk", hidden.float(), self.weight[top])
        return logits.scatter_(1, top, exact)
