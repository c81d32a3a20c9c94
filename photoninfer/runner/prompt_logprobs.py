"""Prompt logprobs from the prefill forward: the hidden state at prompt position p gives the distribution of
the token at p + 1, so entry p + 1 of a sequence's prompt logprobs comes from row p of the step that
computes position p. Entry 0 (the first prompt token) has nothing before it and stays None.

A chunk [start, end) of a prompt yields entries start + 1 .. end: the last of them is the first token of the
next chunk, which is already known (the whole prompt is). The prompt's last position is not used here: its
row samples the first generated token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from photoninfer.runner.sampler import SampleResult

ROWS_PER_SLICE = 256  # bounds the float32 [rows, vocab] logits held at once (256 x 128k vocab = 128 MiB)


@dataclass(frozen=True)
class PromptLogprobsWanted:
    """What the engine asks for one sequence this step."""

    num_top: int  # alternatives per token, beside the prompt token itself
    first_entry: int  # entries before this one are known already (recompute after preemption skips them)


@dataclass(frozen=True)
class PromptLogprobsChunk:
    """Entries first_entry, first_entry + 1, ... of one sequence's prompt logprobs."""

    first_entry: int
    entries: list[SampleResult]  # token_id = the prompt token, rank and logprob of it, top alternatives


def prompt_rows(start: int, end: int, num_prompt_tokens: int, first_entry: int) -> range:
    """Positions among [start, end) whose rows give a still missing prompt-logprob entry."""
    return range(max(start, first_entry - 1, 0), min(end, num_prompt_tokens - 1))


def prompt_token_logprobs(hidden: torch.Tensor, target_ids: torch.Tensor, num_top: int,
                          compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> list[SampleResult]:
    """hidden: [R, H] final hidden states of R prompt positions; target_ids: [R] the prompt token that follows
    each; compute_logits: [r, H] -> [r, V] float32. Returns per row the target's logprob (log-softmax over
    the vocabulary), its rank (1 = most likely) and the `num_top` most likely tokens with their logprobs."""
    results: list[SampleResult] = []
    for lo in range(0, hidden.shape[0], ROWS_PER_SLICE):
        logprobs = torch.log_softmax(compute_logits(hidden[lo : lo + ROWS_PER_SLICE]), dim=-1)
        targets = target_ids[lo : lo + ROWS_PER_SLICE].unsqueeze(1)
        chosen = logprobs.gather(1, targets)
        ranks = (logprobs > chosen).sum(dim=1) + 1
        if num_top > 0:
            top_values, top_ids = torch.topk(logprobs, num_top, dim=-1)
            tops = [list(zip(ids, values)) for ids, values in zip(top_ids.tolist(), top_values.tolist())]
        else:
            tops = [[] for _ in range(targets.shape[0])]
        for token_id, logprob, rank, top in zip(targets.squeeze(1).tolist(), chosen.squeeze(1).tolist(),
                                                ranks.tolist(), tops):
            results.append(SampleResult(token_id, logprob, rank, top))
    return results
