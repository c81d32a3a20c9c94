"""Sampler: logits of the sequences that sample this step -> next tokens (+ logprobs).

Order per row: penalties -> (greedy: argmax) | temperature -> top-k -> top-p -> min-p -> draw.
A draw inverts the cumulative distribution at one uniform number per row. Each seeded request draws
that number from its own generator, so its text does not depend on what else is in the batch;
unseeded requests share the engine's generator.
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
        """logits: [S, V] float32, one row per entry of `rows`. One batched pass; loops only over rows
        that need something of their own (penalties, banned tokens, a private seed)."""
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(r.params.logprobs is not None for r in rows) else None
        logits = logits.clone()
        for i, row in enumerate(rows):
            apply_penalties(logits[i], row)
            if row.banned_token_ids:
                logits[i, list(row.banned_token_ids)] = -float("inf")
        token_ids = self._choose(logits, rows).tolist()
        return [self._result(tok, raw_logprobs[i] if raw_logprobs is not None else None, row.params)
                for i, (tok, row) in enumerate(zip(token_ids, rows))]

    def _choose(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        greedy = torch.tensor([r.params.greedy for r in rows], device=logits.device)
        chosen = torch.argmax(logits, dim=-1)
        if bool(greedy.all()):
            return chosen
        # inverse-CDF draw: one uniform number per row, whatever the vocabulary size
        cdf = torch.cumsum(batched_truncated_probs(logits, rows), dim=-1)
        target = (self._uniform(rows, logits.device) * cdf[:, -1]).unsqueeze(1)
        sampled = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1).squeeze(1)
        return torch.where(greedy, chosen, sampled)

    def _uniform(self, rows: list[SamplingRow], device: torch.device) -> torch.Tensor:
        """U[0, 1) per row: seeded rows draw from their own generator (so their tokens do not depend on
        the batch), the others from the shared one."""
        u = torch.rand(len(rows), generator=self.generator, device=device)
        for i, row in enumerate(rows):
            if row.generator is not None:
                u[i] = torch.rand(1, generator=row.generator, device=device)[0]
        return u

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


NUCLEUS_SEARCH_WIDTH = 1024  # top-p looks among this many best tokens first; a full sort only if they fall short


def batched_truncated_probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The batched form of `truncated_probs`: per row, temperature then top-k, top-p and min-p.

    Returns unnormalized probabilities over the vocabulary, zero outside each row's kept set. Rather than
    sorting whole rows, each row keeps the tokens at least as likely as its last kept one, found among
    its best few tokens. Greedy rows get temperature 1 (their result is not used).
    """
    device, vocab = logits.device, logits.shape[1]
    column = lambda values: torch.tensor(values, dtype=logits.dtype, device=device).unsqueeze(1)  # noqa: E731
    probs = torch.softmax(logits / column([1.0 if r.params.greedy else r.params.temperature for r in rows]), dim=-1)
    ranked = [i for i, r in enumerate(rows) if 0 < r.params.top_k < vocab or r.params.top_p < 1.0]
    if ranked:
        threshold = torch.zeros(len(rows), dtype=probs.dtype, device=device)
        threshold[ranked] = _rank_thresholds(probs[ranked], [rows[i].params for i in ranked])
        probs = probs.masked_fill(probs < threshold.unsqueeze(1), 0.0)
    min_p = column([r.params.min_p for r in rows])
    return probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)


def _rank_thresholds(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Probability of the last token each row keeps under its top-k, then top-p (on the top-k set)."""
    vocab = probs.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    wants_nucleus_beyond_k = any(k == vocab and p.top_p < 1.0 for k, p in zip(top_k, params))
    width = min(vocab, max(max(k for k in top_k if k < vocab) if any(k < vocab for k in top_k) else 1,
                           NUCLEUS_SEARCH_WIDTH if wants_nucleus_beyond_k else 1))
    best, _ = torch.topk(probs, width, dim=-1)  # [n, width], best first
    k = torch.tensor(top_k, device=probs.device).clamp(max=width).unsqueeze(1)
    in_top_k = torch.arange(width, device=probs.device).unsqueeze(0) < k
    kept = best * in_top_k
    renormalized = kept / kept.sum(dim=-1, keepdim=True)  # top-p applies to the top-k set, renormalized
    top_p = torch.tensor([p.top_p for p in params], dtype=probs.dtype, device=probs.device).unsqueeze(1)
    keep = in_top_k & (torch.cumsum(renormalized, dim=-1) - renormalized < top_p)
    keep[:, 0] = True  # the best token always stays (a top_p below float32's range would drop it)
    threshold = best.gather(1, keep.sum(dim=-1, keepdim=True) - 1).squeeze(1)
    # A nucleus wider than the searched columns (a very flat distribution): sort those rows whole.
    short = [i for i, (kk, p) in enumerate(zip(top_k, params))
             if kk == vocab and p.top_p < 1.0 and width < vocab and float(best[i].sum()) < p.top_p]
    if short:
        ordered = torch.sort(probs[short], dim=-1, descending=True).values
        keep_sorted = torch.cumsum(ordered, dim=-1) - ordered < top_p[short]
        keep_sorted[:, 0] = True
        threshold[short] = ordered.gather(1, keep_sorted.sum(dim=-1, keepdim=True) - 1).squeeze(1)
    return threshold


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
        out = torch.tensor(row.token_ids[row.num_prompt_tokens :], dtype=torch.long, device=logits.device)
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
