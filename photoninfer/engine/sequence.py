"""Sequence: one stream of tokens being generated, and the state the scheduler tracks for it."""

from __future__ import annotations

import enum
import itertools
from typing import Optional

from photoninfer.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, never scheduled
    RUNNING = "running"  # holds KV blocks, scheduled every step
    PREEMPTED = "preempted"  # lost its KV blocks; waits to be recomputed from scratch
    FINISHED = "finished"


_seq_ids = itertools.count()

PLACEHOLDER = -1  # a token sampled on the device whose id the host has not read back yet (overlapped steps)


class Sequence:
    """Prompt + generated tokens. `num_computed_tokens` tokens already have their K/V in the paged cache.

    Prefill, chunked prefill, decode and recompute after preemption are all the same thing:
    the scheduler gives the sequence some of its `num_tokens - num_computed_tokens` uncomputed tokens.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float,
                 max_tokens: Optional[int] = None):
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens if max_tokens is not None else params.max_tokens  # resolved by the engine
        self.arrival_time = arrival_time
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.num_pending = 0  # trailing PLACEHOLDER tokens: sampled, not yet known on the host
        self.finish_reason: Optional[str] = None
        self.stop_reason: Optional[object] = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        """Generated tokens known on the host (pending placeholders left out)."""
        return self.token_ids[self.num_prompt_tokens : len(self.token_ids) - self.num_pending]

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens, including those still pending on the device."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def append_placeholder(self) -> None:
        """A token was sampled on the device: its slot exists (the next step computes it), its id comes later."""
        self.token_ids.append(PLACEHOLDER)
        self.num_pending += 1

    def resolve_placeholder(self, token_id: int) -> None:
        """The oldest pending token's id arrived from the device."""
        self.token_ids[len(self.token_ids) - self.num_pending] = token_id
        self.num_pending -= 1

    def add_sampled(self, token_id: int) -> None:
        """A sampled token's id arrived: it fills the oldest placeholder, or (none pending) is appended."""
        if self.num_pending:
            self.token_ids[len(self.token_ids) - self.num_pending] = token_id
            self.num_pending -= 1
        else:
            self.token_ids.append(token_id)

    def drop_placeholders(self) -> None:
        """The sequence ended: tokens still pending were computed past its end and are discarded."""
        if self.num_pending:
            del self.token_ids[-self.num_pending:]
            self.num_pending = 0

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
