"""One step's inputs in the flat variable-length layout, built on the host and sent in one copy.

All tokens of a step form one [T] row set: sequence i owns rows query_start_loc[i]:query_start_loc[i+1].
Tensors (on the runner's device):
  input_ids [T] int64, positions [T] int64, slot_mapping [T] int64 (-1: padding, write nothing),
  query_start_loc [S+1] int32, seq_lens [S] int32 (context after this step), block_tables [S, B] int32,
  logits_indices [N] int64 (rows whose logits are computed, e.g. each sampling sequence's last row).
Every index is written into one pinned host buffer and copied to the device with a single non-blocking
copy. Block tables are kept per sequence on the host in a persistent table (one row per running sequence)
that only receives a sequence's newly allocated blocks, so nothing is rebuilt from Python lists per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from photoninfer.engine.scheduler import SchedulerOutput
from photoninfer.engine.sequence import SequenceStatus


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    logits_indices: torch.Tensor
    # host-side facts, known without a device sync
    num_tokens: int
    num_seqs: int
    max_query_len: int
    max_seq_len: int
    query_start_host: np.ndarray  # [S+1]
    seq_lens_host: np.ndarray  # [S]

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class BlockTableRows:
    """Host copy of each running sequence's block table, one row per sequence, appended to incrementally."""

    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int):
        self.table = np.zeros((max_num_seqs, max_blocks_per_seq), dtype=np.int32)
        self.num_written = np.zeros(max_num_seqs, dtype=np.int64)
        self.row_of: dict[int, int] = {}  # seq_id -> row
        self.owner: dict[int, object] = {}  # row -> Sequence
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))

    def release_finished(self, preempted) -> None:
        """Free the rows of sequences that finished, and of those preempted (their blocks are gone)."""
        for seq in preempted:
            self._release(seq.seq_id)
        for row, seq in list(self.owner.items()):
            if seq.status is SequenceStatus.FINISHED:
                self._release(seq.seq_id)

    def _release(self, seq_id: int) -> None:
        row = self.row_of.pop(seq_id, None)
        if row is not None:
            del self.owner[row]
            self.num_written[row] = 0
            self.free_rows.append(row)

    def row_for(self, seq) -> int:
        """The sequence's row, with any blocks allocated since the last step appended."""
        row = self.row_of.get(seq.seq_id)
        if row is None:
            row = self.free_rows.pop()
            self.row_of[seq.seq_id] = row
            self.owner[row] = seq
        written, blocks = self.num_written[row], seq.block_table
        if written < len(blocks):
            if len(blocks) > self.table.shape[1]:
                raise ValueError(f"sequence needs {len(blocks)} blocks, the table holds {self.table.shape[1]}")
            self.table[row, written:len(blocks)] = blocks[written:]
            self.num_written[row] = len(blocks)
        return row


class BatchBuilder:
    """SchedulerOutput -> ForwardBatch, through one pinned staging buffer."""

    def __init__(self, max_num_tokens: int, max_num_seqs: int, max_blocks_per_seq: int, block_size: int,
                 device: torch.device):
        self.block_size = block_size
        self.device = device
        self.rows = BlockTableRows(max_num_seqs, max_blocks_per_seq)
        # int64 region: ids, positions, slots (each max T), logits indices (max T)
        self.max_tokens, self.max_seqs, self.max_blocks = max_num_tokens, max_num_seqs, max_blocks_per_seq
        pin = device.type == "cuda"
        self.staging64 = torch.empty(4 * max_num_tokens, dtype=torch.int64, pin_memory=pin)
        self.staging32 = torch.empty(2 * max_num_seqs + 1 + max_num_seqs * max_blocks_per_seq, dtype=torch.int32,
                                     pin_memory=pin)
        self.host64, self.host32 = self.staging64.numpy(), self.staging32.numpy()
        on_host = device.type == "cpu"  # the staging buffers are the batch itself: no copy
        self.device64 = self.staging64 if on_host else torch.empty_like(self.staging64, device=device)
        self.device32 = self.staging32 if on_host else torch.empty_like(self.staging32, device=device)

    def build(self, sched: SchedulerOutput, extra_logits_rows=None) -> tuple[ForwardBatch, list]:
        """Returns the batch and the sequences that sample this step, in logits-row order.

        `extra_logits_rows(item, row_start)` may return more rows whose logits are wanted (prompt logprobs)."""
        self.rows.release_finished(sched.preempted)
        items = sched.scheduled
        num_seqs = len(items)
        num_tokens = sum(item.end - item.start for item in items)
        if num_tokens > self.max_tokens or num_seqs > self.max_seqs:
            raise ValueError(f"step of {num_tokens} tokens / {num_seqs} sequences exceeds the runner's buffers")
        T, bs = self.max_tokens, self.block_size
        ids, pos, slots, logit_rows = (self.host64[i * T:(i + 1) * T] for i in range(4))
        query_start = np.empty(num_seqs + 1, dtype=np.int64)
        seq_lens = np.empty(num_seqs, dtype=np.int64)
        rows = np.empty(num_seqs, dtype=np.int64)
        sampling_seqs, num_logits, t = [], 0, 0
        query_start[0] = 0
        for i, item in enumerate(items):
            seq, start, end = item.seq, item.start, item.end
            row = self.rows.row_for(seq)
            rows[i] = row
            n = end - start
            if n == 1:  # decode: scalar work only
                ids[t] = seq.token_ids[start]
                pos[t] = start
                slots[t] = self.rows.table[row, start // bs] * bs + start % bs
            else:
                ids[t:t + n] = seq.token_ids[start:end]
                p = np.arange(start, end)
                pos[t:t + n] = p
                slots[t:t + n] = self.rows.table[row, p // bs].astype(np.int64) * bs + p % bs
            if extra_logits_rows is not None:
                for r in extra_logits_rows(item, t):
                    logit_rows[num_logits] = r
                    num_logits += 1
            t += n
            query_start[i + 1] = t
            seq_lens[i] = end
            if item.samples:
                logit_rows[num_logits] = t - 1
                num_logits += 1
                sampling_seqs.append(seq)
        max_seq_len = int(seq_lens.max()) if num_seqs else 0
        width = max(1, -(-max_seq_len // bs))
        S = self.max_seqs
        qsl = self.host32[:S + 1]
        qsl[:num_seqs + 1] = query_start
        lens = self.host32[S + 1:2 * S + 1]
        lens[:num_seqs] = seq_lens
        tables = self.host32[2 * S + 1:2 * S + 1 + num_seqs * width].reshape(num_seqs, width)
        tables[:] = self.rows.table[rows, :width]
        n32 = 2 * S + 1 + num_seqs * width
        if self.device64 is not self.staging64:
            self.device64.copy_(self.staging64, non_blocking=True)
            self.device32[:n32].copy_(self.staging32[:n32], non_blocking=True)
        d64, d32 = self.device64, self.device32
        batch = ForwardBatch(
            input_ids=d64[:num_tokens], positions=d64[T:T + num_tokens], slot_mapping=d64[2 * T:2 * T + num_tokens],
            logits_indices=d64[3 * T:3 * T + num_logits],
            query_start_loc=d32[:num_seqs + 1], seq_lens=d32[S + 1:S + 1 + num_seqs],
            block_tables=d32[2 * S + 1:n32].view(num_seqs, width),
            num_tokens=num_tokens, num_seqs=num_seqs,
            max_query_len=int(np.diff(query_start).max()) if num_seqs else 0, max_seq_len=max_seq_len,
            query_start_host=query_start, seq_lens_host=seq_lens,
        )
        return batch, sampling_seqs
