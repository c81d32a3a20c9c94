"""Sampler: logits of the sequences that sample this step -> next tokens (+ logprobs).

Order per row: penalties -> (greedy: argmax) | temperature -> top-k -> top-p -> min-p -> draw.
A draw is argmax(probs / E) with E ~ Exponential(1) noise (equivalent to sampling from probs). Each
seeded request draws its noise from its own generator, so its text does not depend on what else is
in the batch; unseeded requests share the engine's generator.
Logprobs are reported from the model's raw distribution (before penalties and temperature).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from photoninfer.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence."""

    params: SamplingParams
    token_ids: list[int]  # prompt + output so far: the sequence's own list, not a copy (no O(n) per step)
    num_prompt_tokens: int
    generator: Optional[torch.Generator]  # None: use the shared generator
    banned_token_ids: tuple[int, ...] = ()  # e.g. EOS while min_tokens is not reached

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


@dataclass
class SampleResult:
    token_id: int
    logprob: Optional[float] = None  # raw logprob of the chosen token, when requested
    rank: Optional[int] = None
    top_logprobs: Optional[list[tuple[int, float]]] = None  # (token id, logprob), best first


class Sampler:
    def __init__(self, seed: int, device: torch.device):
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampleResult]:
        """logits: [S, V] float32, one row per entry of `rows`."""
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(r.params.logprobs is not None for r in rows) else None
        logits = logits.clone()
        for i, row in enumerate(rows):
            apply_penalties(logits[i], row)
            if row.banned_token_ids:
                logits[i, list(row.banned_token_ids)] = -float("inf")
        token_ids = [self._choose(logits[i], row) for i, row in enumerate(rows)]
        return [self._result(tok, raw_logprobs[i] if raw_logprobs is not None else None, row.params)
                for i, (tok, row) in enumerate(zip(token_ids, rows))]

    def _choose(self, logits: torch.Tensor, row: SamplingRow) -> int:
        p = row.params
        if p.greedy:
            return int(torch.argmax(logits))
        probs = truncated_probs(logits / p.temperature, p.top_k, p.top_p, p.min_p)
        noise = torch.empty_like(probs).exponential_(generator=row.generator or self.generator)
        return int(torch.argmax(probs / noise))

    @staticmethod
    def _result(token_id: int, raw: Optional[torch.Tensor], params: SamplingParams) -> SampleResult:
        if raw is None or params.logprobs is None:
            return SampleResult(token_id)
        chosen = raw[token_id]
        rank = int((raw > chosen).sum()) + 1
        top = []
        if params.logprobs > 0:
            values, ids = torch.topk(raw, params.logprobs)
            top = list(zip(ids.tolist(), values.tolist()))
        return SampleResult(token_id, float(chosen), rank, top)


def apply_penalties(logits: torch.Tensor, row: SamplingRow) -> None:
    """In place on one row. Repetition penalty (CTRL/HF style) looks at prompt and output tokens;
    presence/frequency penalties (OpenAI style) at generated tokens only."""
    p = row.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.token_ids)), dtype=torch.long, device=logits.device)
        if seen.numel():
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and len(row.token_ids) > row.num_prompt_tokens:
        out = torch.tensor(row.output_token_ids, dtype=torch.long, device=logits.device)
        counts = torch.zeros_like(logits).index_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def truncated_probs(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Softmax of one row restricted to the top-k / nucleus top-p / min-p set (renormalized)."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep a token if the mass of strictly more likely tokens is still below top_p
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
    return probs / probs.sum()
