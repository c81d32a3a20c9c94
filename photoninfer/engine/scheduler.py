"""Scheduler: decides, each step, which sequences run and how many of their tokens are computed.

One mechanism covers prefill, chunked prefill, decode and recompute: every sequence has
`num_tokens - num_computed_tokens` tokens whose K/V are not yet in the cache, and each step hands
out at most `max_num_batched_tokens` of them.
  phase 1: every RUNNING sequence continues (oldest first). When blocks run out, the newest running
           sequence is preempted (blocks freed, progress reset, put back at the head of the queue).
  phase 2: WAITING/PREEMPTED sequences are admitted while the token budget, `max_num_seqs` and the
           free blocks allow. A prompt larger than the remaining budget is admitted in chunks.
A sequence is sampled only in the step whose chunk reaches its last token (never with max_tokens 0).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from photoninfer.engine.block_manager import BlockManager
from photoninfer.engine.sequence import Sequence, SequenceStatus


class ScheduledSequence:
    """Tokens [start, end) of `seq` are computed this step (a snapshot taken when scheduling). A plain class
    with slots: one is made per running sequence per step, and a frozen dataclass costs several times more."""

    __slots__ = ("seq", "start", "end", "samples")

    def __init__(self, seq: Sequence, start: int, end: int, samples: bool):
        self.seq = seq
        self.start = start
        self.end = end
        self.samples = samples  # the chunk reaches the sequence's last token, so its logits give the next token

    @classmethod
    def of(cls, seq: Sequence, num_new_tokens: int) -> "ScheduledSequence":
        start = seq.num_computed_tokens
        end = start + num_new_tokens
        # max_tokens 0: the prompt is only prefilled (for its prompt logprobs), nothing is sampled
        return cls(seq, start, end, end == len(seq.token_ids) and seq.max_tokens != 0)

    @property
    def num_new_tokens(self) -> int:
        return self.end - self.start

    def __repr__(self) -> str:
        return f"ScheduledSequence({self.seq.request_id!r}, {self.start}:{self.end}, samples={self.samples})"


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is preempted first
        self.num_preemptions = 0

    # ---- queue management -------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str, stop_reason: object = None) -> None:
        """End `seq` now (stop condition or abort) and free its blocks at once."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    # ---- one step ---------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:  # admitting new work right after preempting would only thrash
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        # The hot loop of every step: attributes are read directly rather than through properties.
        block_size = self.block_manager.block_size
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            start, num_tokens = seq.num_computed_tokens, len(seq.token_ids)
            num_new = num_tokens - start
            if num_new == 0:  # its last token is being sampled; it ends when that result is read
                continue
            if num_new > budget:
                num_new = budget
            end = start + num_new
            if len(seq.block_table) * block_size < end:  # most decode steps fit the last block: no bookkeeping
                if not self._make_room(seq, end, out):
                    continue
                self.block_manager.allocate(seq, end)
            out.scheduled.append(ScheduledSequence(seq, start, end, end == num_tokens and seq.max_tokens != 0))
            budget -= num_new
        return budget

    def _make_room(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Preempt the newest running sequences until `seq` fits. False if `seq` itself was preempted."""
        while not self.block_manager.can_allocate(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Preemption by recompute: drop the KV cache; the sequence is prefilled again later."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        self.waiting.appendleft(seq)
        out.scheduled = [s for s in out.scheduled if s.seq is not seq]
        out.preempted.append(seq)
        self.num_preemptions += 1

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            prefix = self.block_manager.cached_prefix(seq)  # K/V already in the cache: not recomputed
            start = len(prefix) * self.block_manager.block_size
            num_new = min(seq.num_tokens - start, budget)
            if not self.block_manager.can_allocate(seq, start + num_new, prefix):
                break  # first come, first served: do not let later requests jump the queue
            self.waiting.popleft()
            self.block_manager.take_prefix(seq, prefix)
            self.block_manager.allocate(seq, seq.num_computed_tokens + num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence.of(seq, num_new))
            budget -= num_new

    def postprocess(self, out: SchedulerOutput, sampled: dict[int, int]) -> None:
        """Advance progress of every scheduled sequence and append sampled tokens (keyed by seq_id)."""
        self.advance(out)
        for item in out.scheduled:
            token = sampled.get(item.seq.seq_id)
            if token is not None:
                item.seq.append_token(token)
        self.cache_computed_blocks(out)

    def advance(self, out: SchedulerOutput) -> None:
        """The step's work is queued: its tokens count as computed from now on."""
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.end - item.start

    def cache_computed_blocks(self, out: SchedulerOutput) -> None:
        """Offer newly filled blocks to the prefix cache, once every token in them is known on the host."""
        for item in out.scheduled:
            if not item.seq.is_finished:
                self.block_manager.cache_full_blocks(item.seq)
