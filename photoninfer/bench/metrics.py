"""How far two engines' greedy outputs agree."""

from __future__ import annotations

import statistics


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> float:
    """Mean over requests of the fraction of the reference output matched before the first differing token.

    A request whose output equals the reference counts 1.0; one that differs at its first token counts 0.0;
    an output shorter than the reference counts only the tokens it has.
    """
    if len(outputs) != len(reference):
        raise ValueError(f"{len(outputs)} outputs but {len(reference)} reference outputs")
    fractions = []
    for ours, theirs in zip(outputs, reference):
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        fractions.append(same / len(theirs) if theirs else float(not ours))
    return statistics.fmean(fractions)
