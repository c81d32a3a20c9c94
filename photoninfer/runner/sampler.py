"""Sampler: logits of the sequences that sample this step -> next tokens (+ logprobs).

Order per row: penalties -> (greedy: argmax) | temperature -> top-k -> top-p -> min-p -> draw.
A draw inverts the cumulative distribution at one uniform number per row. Each seeded request draws
that number from its own host RNG, so its text does not depend on what else is in the batch (nor on the
device); unseeded requests share the engine's RNG.
Logprobs are reported from the model's raw distribution (before penalties and temperature).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import torch

from photoninfer.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence."""

    params: SamplingParams
    token_ids: list[int]  # prompt + output so far: the sequence's own list, not a copy (no O(n) per step)
    num_prompt_tokens: int
    generator: Optional[random.Random]  # the request's own RNG (seeded requests); None: the shared one
    banned_token_ids: tuple[int, ...] = ()  # e.g. EOS while min_tokens is not reached
    # greedy, no penalties, bans or logprobs: an argmax is all it needs (set from the fields above)
    plain: bool = field(init=False)

    def __post_init__(self):
        p = self.params
        self.plain = p.greedy and p.logprobs is None and not has_penalties(p) and not self.banned_token_ids


@dataclass
class SampleResult:
    token_id: int
    logprob: Optional[float] = None  # raw logprob of the chosen token, when requested
    rank: Optional[int] = None
    top_logprobs: Optional[list[tuple[int, float]]] = None  # (token id, logprob), best first


class Sampler:
    """All rows in one batched pass on the logits' device; the only host round-trip is the chosen ids
    (plus the logprobs of rows that asked for them). Uniform numbers for the draws are made on the host
    (one per row) and travel with the other per-row parameters in a single copy."""

    def __init__(self, seed: int, argmax: Callable[[torch.Tensor], torch.Tensor] = partial(torch.argmax, dim=-1)):
        """argmax: the row-wise arg-max of greedy batches (the Triton kernel on CUDA)."""
        self.rng = random.Random(seed)
        self.argmax = argmax

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampleResult]:
        """logits: [S, V], one row per entry of `rows`."""
        return self.sample(logits, rows).results()

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow],
               greedy_ids: Optional[torch.Tensor] = None) -> "SampledTokens":
        """Queue the sampling work on the logits' device; nothing waits for it. logits: [S, V] in the LM
        head's dtype (widened to float32 here when a row needs more than an arg-max); greedy_ids: their
        arg-max if already computed (a CUDA graph computes it with the logits)."""
        if all([r.plain for r in rows]):  # the common greedy batch: what the general path below reduces to
            return SampledTokens(greedy_ids if greedy_ids is not None else self.argmax(logits))
        logits = logits.float()
        want_logprobs = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        raw = torch.log_softmax(logits[want_logprobs], dim=-1) if want_logprobs else None
        penalized = [i for i, r in enumerate(rows) if has_penalties(r.params)]
        banned = [(i, t) for i, r in enumerate(rows) for t in r.banned_token_ids]
        if penalized or banned:
            logits = logits.clone()
            if penalized:
                logits[penalized] = apply_penalties_batched(logits[penalized], [rows[i] for i in penalized])
            if banned:
                index = torch.tensor(banned, dtype=torch.long).to(logits.device, non_blocking=True)
                logits[index[:, 0], index[:, 1]] = -float("inf")
        token_ids = self._choose(logits, rows)
        if raw is None:
            return SampledTokens(token_ids)
        return SampledTokens(token_ids, *self._logprob_tensors(token_ids, raw, want_logprobs, rows), want_logprobs,
                             [rows[i].params.logprobs for i in want_logprobs])

    def _choose(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        chosen = torch.argmax(logits, dim=-1)
        if all(r.params.greedy for r in rows):
            return chosen
        # inverse-CDF draw: one uniform number per row, whatever the vocabulary size
        host = torch.tensor([[1.0 if r.params.greedy else 0.0, self._uniform(r)] for r in rows], dtype=torch.float32)
        per_row = host.to(logits.device, non_blocking=True)
        greedy, uniform = per_row[:, 0] > 0, per_row[:, 1]
        cdf = torch.cumsum(batched_truncated_probs(logits, rows), dim=-1)
        target = (uniform * cdf[:, -1]).unsqueeze(1)
        sampled = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1).squeeze(1)
        return torch.where(greedy, chosen, sampled)

    def _uniform(self, row: SamplingRow) -> float:
        """U[0, 1): a seeded request draws from its own RNG, so its tokens do not depend on the batch."""
        return (row.generator or self.rng).random()

    @staticmethod
    def _logprob_tensors(token_ids: torch.Tensor, raw: torch.Tensor, want: list[int], rows: list[SamplingRow]):
        """Logprob, rank and top-N of the rows that asked, gathered on the device."""
        index = torch.tensor(want, dtype=torch.long).to(raw.device, non_blocking=True)
        chosen = raw.gather(1, token_ids[index].unsqueeze(1))
        ranks = (raw > chosen).sum(dim=-1) + 1
        width = max(rows[i].params.logprobs for i in want)
        top_values, top_ids = torch.topk(raw, width, dim=-1)
        return chosen.squeeze(1), ranks, top_values, top_ids


class SampledTokens:
    """One step's sampled ids (and logprobs), still on the device until `results()` copies them back.

    `token_ids` stays on the device so that the next step can take its inputs from it without a host trip;
    `copy_to_host()` starts the only transfer the step needs (pinned, non-blocking)."""

    def __init__(self, token_ids: torch.Tensor, chosen=None, ranks=None, top_values=None, top_ids=None,
                 logprob_rows: Optional[list[int]] = None, num_logprobs: Optional[list[int]] = None):
        self.token_ids = token_ids
        self.logprobs = (chosen, ranks, top_values, top_ids)
        self.logprob_rows, self.num_logprobs = logprob_rows or [], num_logprobs or []
        self._host, self._ready = None, None

    def copy_to_host(self) -> None:
        if self.token_ids.device.type == "cuda":
            self._host = torch.empty(self.token_ids.shape, dtype=self.token_ids.dtype, pin_memory=True)
            self._host.copy_(self.token_ids, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()

    def results(self) -> list[SampleResult]:
        """One SampleResult per row (waits for the device)."""
        ids, detailed = self.host_results()
        return [detailed.get(i) or SampleResult(t) for i, t in enumerate(ids)]

    def host_results(self) -> tuple[list[int], dict[int, SampleResult]]:
        """Waits for the device. The chosen id of every row, and the full result (logprobs) of the rows that
        asked for one, by row: most rows need no result object."""
        if self._ready is not None:
            self._ready.synchronize()
        ids = (self._host if self._host is not None else self.token_ids).tolist()
        detailed = {}
        if self.logprob_rows:
            chosen, ranks, top_values, top_ids = (t.tolist() for t in self.logprobs)
            for j, (i, n) in enumerate(zip(self.logprob_rows, self.num_logprobs)):
                detailed[i] = SampleResult(ids[i], chosen[j], ranks[j], list(zip(top_ids[j][:n], top_values[j][:n])))
        return ids, detailed


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
    vocab, device = probs.shape[1], probs.device
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    wants_nucleus_beyond_k = any(k == vocab and p.top_p < 1.0 for k, p in zip(top_k, params))
    width = min(vocab, max(max(k for k in top_k if k < vocab) if any(k < vocab for k in top_k) else 1,
                           NUCLEUS_SEARCH_WIDTH if wants_nucleus_beyond_k else 1))
    best, _ = torch.topk(probs, width, dim=-1)  # [n, width], best first
    k = torch.tensor(top_k, device=device).clamp(max=width).unsqueeze(1)
    in_top_k = torch.arange(width, device=device).unsqueeze(0) < k
    kept = best * in_top_k
    # top-p applies to the top-k set renormalized; without top-k, to the whole distribution (mass 1), not
    # to the searched columns, which may hold much less than all of it.
    has_top_k = torch.tensor([kk < vocab for kk in top_k], device=device).unsqueeze(1)
    shares = torch.where(has_top_k, kept / kept.sum(dim=-1, keepdim=True), kept)
    mass_upto = torch.cumsum(shares, dim=-1)
    top_p = torch.tensor([p.top_p for p in params], dtype=probs.dtype, device=device).unsqueeze(1)
    keep = in_top_k & (mass_upto - shares < top_p)
    keep[:, 0] = True  # the best token always stays (a top_p below float32's range would drop it)
    threshold = best.gather(1, keep.sum(dim=-1, keepdim=True) - 1).squeeze(1)
    if wants_nucleus_beyond_k and width < vocab:
        # A nucleus wider than the searched columns (a flat distribution): sort those rows whole.
        # One host sync, only when a row may need it.
        short = (~has_top_k & (mass_upto[:, -1:] < top_p)).squeeze(1).nonzero().squeeze(1)
        if short.numel():
            ordered = torch.sort(probs[short], dim=-1, descending=True).values
            keep_sorted = torch.cumsum(ordered, dim=-1) - ordered < top_p[short]
            keep_sorted[:, 0] = True
            threshold[short] = ordered.gather(1, keep_sorted.sum(dim=-1, keepdim=True) - 1).squeeze(1)
    return threshold


def has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)


def apply_penalties_batched(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """`apply_penalties` for several rows at once: token counts are scattered on the device from one
    padded copy of the rows' tokens (prompt tokens and generated tokens counted apart)."""
    device, n, vocab = logits.device, len(rows), logits.shape[1]
    width = max(1, max(len(r.token_ids) for r in rows))
    tokens = torch.full((n, width), vocab, dtype=torch.long)  # `vocab` = padding, dropped below
    generated = torch.zeros((n, width), dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r.token_ids)] = torch.tensor(r.token_ids, dtype=torch.long)
        generated[i, r.num_prompt_tokens:len(r.token_ids)] = True
    params = torch.tensor([[r.params.repetition_penalty, r.params.presence_penalty, r.params.frequency_penalty]
                           for r in rows], dtype=logits.dtype)
    tokens, generated, params = (t.to(device, non_blocking=True) for t in (tokens, generated, params))
    seen = torch.zeros((n, vocab + 1), dtype=logits.dtype, device=device).scatter_(1, tokens, 1.0)[:, :vocab] > 0
    counts = torch.zeros((n, vocab + 1), dtype=logits.dtype, device=device)
    counts.scatter_add_(1, tokens, generated.to(logits.dtype))
    counts = counts[:, :vocab]
    rep, presence, frequency = params[:, 0:1], params[:, 1:2], params[:, 2:3]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


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
