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
from typing import Optional

import numpy as np
import torch

from photoninfer.engine.scheduler import SchedulerOutput
from photoninfer.engine.sequence import PLACEHOLDER, SequenceStatus


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    logits_indices: torch.Tensor
    # input rows whose token is still on the device: input_ids[dst] = previous step's sampled ids[src]
    pending_dst: Optional[torch.Tensor]
    pending_src: Optional[torch.Tensor]
    # host-side facts, known without a device sync
    num_tokens: int
    num_seqs: int
    max_query_len: int
    max_seq_len: int
    query_start_host: np.ndarray  # [S+1]
    seq_lens_host: np.ndarray  # [S]
    graph_size: Optional[int] = None  # a decode step laid out for the CUDA graph of this many rows
    graph_tokens: Optional[int] = None  # a one-sequence prefill laid out for the graph of this many tokens
    graph_mixed: Optional[tuple[int, int]] = None  # any other step laid out for the graph of (tokens, sequences)
    prefill_tiles: Optional[torch.Tensor] = None  # [N, 2] int32: the prefill attention's tile map (graph_mixed)
    # the pending rows are the first rows, each taking the previous step's sampled id of its own row (dst = src =
    # 0..n-1: a decode step of the previous step's sequences, the steady state), so one copy serves
    pending_in_order: bool = False

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @classmethod
    def for_attention(cls, slot_mapping: torch.Tensor, query_start: list[int], seq_lens: list[int],
                      block_tables: list[list[int]]) -> "ForwardBatch":
        """The attention-only part of a batch from plain lists (kernel tests and benchmarks)."""
        device = slot_mapping.device
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32, device=device)
        as_int32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
        return cls(input_ids=None, positions=None, slot_mapping=slot_mapping, logits_indices=None,
                   pending_dst=None, pending_src=None, query_start_loc=as_int32(query_start),
                   seq_lens=as_int32(seq_lens), block_tables=tables, num_tokens=query_start[-1],
                   num_seqs=len(seq_lens), max_query_len=int(np.diff(query_start).max()), max_seq_len=max(seq_lens),
                   query_start_host=np.array(query_start), seq_lens_host=np.array(seq_lens))


class BlockTableRows:
    """Host copy of each running sequence's block table, one row per sequence, appended to incrementally.

    A row is rewritten from its start when its sequence holds a new block list (a preemption freed the blocks
    and they were allocated again: the block manager then gives the sequence a new list), and the rows of
    sequences no longer running (finished, preempted) are reclaimed when no row is free."""

    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int):
        self.table = np.zeros((max_num_seqs, max_blocks_per_seq), dtype=np.int32)
        self.row_of: dict[int, int] = {}  # seq_id -> row
        self.owner: list = [None] * max_num_seqs  # row -> Sequence
        self.synced: list = [None] * max_num_seqs  # row -> the block list whose first num_written[row] are copied
        self.num_written = [0] * max_num_seqs
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))

    def rows_for(self, seqs) -> list[int]:
        """Each sequence's row, with the blocks allocated since the last step written (one loop, no call for a
        sequence whose row is current)."""
        row_of, synced, written = self.row_of, self.synced, self.num_written
        rows = []
        for seq in seqs:
            row = row_of.get(seq.seq_id)
            if row is None or synced[row] is not seq.block_table or written[row] < len(seq.block_table):
                row = self.row_for(seq)
            rows.append(row)
        return rows

    def row_for(self, seq) -> int:
        """The sequence's row, brought up to date with its block table."""
        row = self.row_of.get(seq.seq_id)
        if row is None:
            if not self.free_rows:
                self._reclaim()
            row = self.free_rows.pop()
            self.row_of[seq.seq_id] = row
            self.owner[row] = seq
        blocks = seq.block_table
        if self.synced[row] is not blocks:  # a new row, or blocks allocated afresh after a preemption
            self.synced[row], self.num_written[row] = blocks, 0
        written = self.num_written[row]
        if written < len(blocks):
            if len(blocks) > self.table.shape[1]:
                raise ValueError(f"sequence needs {len(blocks)} blocks, the table holds {self.table.shape[1]}")
            self.table[row, written:len(blocks)] = blocks[written:]
            self.num_written[row] = len(blocks)
        return row

    def _reclaim(self) -> None:
        """Free the rows of sequences that are not running (finished, or preempted and waiting)."""
        for seq_id, row in list(self.row_of.items()):
            if self.owner[row].status is not SequenceStatus.RUNNING:
                del self.row_of[seq_id]
                self.owner[row] = self.synced[row] = None
                self.free_rows.append(row)
        if not self.free_rows:
            raise RuntimeError(f"more than {len(self.owner)} running sequences hold a block-table row")


def prefill_tiles(query_start: np.ndarray, block_m: int, out: np.ndarray) -> None:
    """The prefill attention kernel's tile map (kernels/paged_attention.py, `tiles`): out [N, 2] gets (sequence,
    row block) for every block_m query rows of every sequence in order, then (-1, 0) for the rows left. A step of
    T tokens over S sequences needs at most ceil(T / block_m) + S rows."""
    counts = -(-np.diff(query_start) // block_m)
    total = int(counts.sum())
    if total > len(out):
        raise ValueError(f"{total} query tiles do not fit a tile map of {len(out)}")
    firsts = np.cumsum(counts) - counts
    out[:total, 0] = np.repeat(np.arange(len(counts)), counts)
    out[:total, 1] = np.arange(total) - np.repeat(firsts, counts)
    out[total:] = (-1, 0)


def _aligned(index: int) -> int:
    """The first int32 index at or after `index` on a 16-byte boundary."""
    return -(-index // 4) * 4


SMALL_STEP_TOKENS = 512  # at least every CUDA graph's token count (cuda_graph.PREFILL_TOKENS, decode sizes)


class BatchBuilder:
    """SchedulerOutput -> ForwardBatch, through a pinned staging buffer (two, used in turn: the host may
    build step N+1 while step N's copy is still queued)."""

    def __init__(self, max_num_tokens: int, max_num_seqs: int, max_blocks_per_seq: int, block_size: int,
                 device: torch.device):
        self.graph_sizes: list[int] = []  # set by use_graphs(): decode steps are then padded for replay
        self.graph_prefill_tokens: list[int] = []  # likewise one-sequence prefills (time to first token)
        self.graph_mixed: list[tuple[int, int]] = []  # and other steps, by (tokens, sequences), smallest first
        self.tile_rows = 16  # query rows per tile of the mixed graphs' prefill attention (use_graphs)
        self.graph_max_context = 0
        self.block_size = block_size
        self.device = device
        self.rows = BlockTableRows(max_num_seqs, max_blocks_per_seq)
        # A decode step's query starts (and logits rows), ready in both widths.
        self._arange, self._arange32 = (np.arange(max(max_num_seqs, max_num_tokens) + 1, dtype=dtype)
                                        for dtype in (np.int64, np.int32))
        self._arange.flags.writeable = False
        self.max_tokens, self.max_seqs, self.max_blocks = max_num_tokens, max_num_seqs, max_blocks_per_seq
        # Steps of at most `small` tokens (every decode and graph step) lay their six int64 arrays out `small`
        # apart, so that their copy to the device is 6 * small values, not 6 * max_tokens (393 KB at 8192).
        self.small = min(max_num_tokens, max(max_num_seqs, SMALL_STEP_TOKENS))
        # int32 region: query starts at 0, sequence lengths at `lens_at`, a mixed graph's tile map at `tiles_at`
        # (room for tiles of 16 rows, the smallest), block tables at `tables_at`, each on a 16-byte boundary:
        # Triton compiles a kernel per pointer alignment, and the start-up warm-up's own (fresh, aligned) tensors
        # must meet the same variants as real steps.
        self.lens_at = _aligned(max_num_seqs + 1)
        self.tiles_at = _aligned(self.lens_at + max_num_seqs)
        self.max_tiles = -(-max_num_tokens // 16) + max_num_seqs
        self.tables_at = _aligned(self.tiles_at + 2 * self.max_tiles)
        self.on_host = device.type == "cpu"  # the staging buffers are the batch itself: no copy
        # int64 region: ids, positions, slots, logits indices, pending dst, pending src (`stride` apart: small
        # or max_tokens); the int32 region as above
        self.staging = [self._staging_pair() for _ in range(1 if self.on_host else 2)]
        self.turn = 0
        self.host_views = [self._host_views(pair) for pair in self.staging]
        self._device_views: dict[tuple, tuple] = {}  # batch shape -> views of the device buffers (see _views)
        if self.on_host:
            self.device64, self.device32 = self.staging[0]
        else:
            self.device64 = torch.empty_like(self.staging[0][0], device=device)
            self.device32 = torch.empty_like(self.staging[0][1], device=device)

    def use_graphs(self, sizes: list[int], prefill_tokens: list[int], mixed: list[tuple[int, int]] = (),
                   tile_rows: int = 16) -> None:
        """Lay decode steps of up to sizes[-1] sequences (and one-sequence prefills of up to prefill_tokens[-1]
        tokens) within graph_max_context tokens out exactly as the captured graphs read them: padded to the
        next size, block tables `graph_width` wide. The graphs' static inputs are these very device buffers,
        so a replay needs no copy besides the staging one. `mixed`: (tokens, sequences) of the graphs for other
        steps (several prompts, prompts beside decodes), laid out in the large layout with a tile map of
        `tile_rows` query rows a tile."""
        if max(sizes + prefill_tokens, default=0) > self.small:
            raise ValueError(f"graph steps must fit the small-step layout of {self.small} tokens")
        mixed = sorted(mixed)
        if any(t > self.max_tokens or s > self.max_seqs for t, s in mixed) or tile_rows < 16:
            raise ValueError(f"mixed graphs {mixed} must fit {self.max_tokens} tokens and {self.max_seqs} sequences, "
                             f"in tiles of at least 16 rows")
        self.graph_sizes, self.graph_prefill_tokens = sizes, prefill_tokens
        self.graph_mixed, self.tile_rows = mixed, tile_rows

    @property
    def graph_width(self) -> int:
        return -(-self.graph_max_context // self.block_size)

    def clear_graph_rows(self) -> None:
        """Before capture: every row reads token 0 at position 0, writes no K/V and has an empty context."""
        G, L = self.small, self.max_tokens  # decode and lone-prefill graphs: small steps; mixed graphs: large
        self.device64.zero_()
        self.device32.zero_()
        self.device64[2 * G:3 * G].fill_(-1)
        self.device64[2 * L:3 * L].fill_(-1)

    def graph_batch(self, size: int) -> ForwardBatch:
        """The static decode batch of `size` rows: views of the device buffers that the graphs read."""
        T, L, B, W = self.small, self.lens_at, self.tables_at, self.graph_width
        d64, d32 = self.device64, self.device32
        return ForwardBatch(
            input_ids=d64[:size], positions=d64[T:T + size], slot_mapping=d64[2 * T:2 * T + size],
            logits_indices=None, pending_dst=None, pending_src=None, query_start_loc=d32[:size + 1],
            seq_lens=d32[L:L + size], block_tables=d32[B:B + size * W].view(size, W),
            num_tokens=size, num_seqs=size, max_query_len=1, max_seq_len=self.graph_max_context,
            query_start_host=np.arange(size + 1), seq_lens_host=np.zeros(size, dtype=np.int64), graph_size=size)

    def prefill_graph_batch(self, tokens: int) -> ForwardBatch:
        """The static one-sequence prefill of `tokens` rows (the real ones first, the rest padding)."""
        T, L, B, W = self.small, self.lens_at, self.tables_at, self.graph_width
        d64, d32 = self.device64, self.device32
        return ForwardBatch(
            input_ids=d64[:tokens], positions=d64[T:T + tokens], slot_mapping=d64[2 * T:2 * T + tokens],
            logits_indices=d64[3 * T:3 * T + 1], pending_dst=None, pending_src=None, query_start_loc=d32[:2],
            seq_lens=d32[L:L + 1], block_tables=d32[B:B + W].view(1, W),
            num_tokens=tokens, num_seqs=1, max_query_len=tokens, max_seq_len=self.graph_max_context,
            query_start_host=np.array([0, tokens]), seq_lens_host=np.array([tokens]), graph_tokens=tokens)

    def mixed_graph_batch(self, tokens: int, seqs: int) -> ForwardBatch:
        """The static step of a mixed graph: `tokens` rows over `seqs` sequences in the large layout, their tile map
        and `seqs` logits rows (the sampling sequences' first, the rest padding)."""
        ids, pos, slots, logits, _, _, query_start, seq_lens, tables = self._views(tokens, seqs, 0, seqs,
                                                                                  self.graph_width, self.max_tokens)
        return ForwardBatch(
            input_ids=ids, positions=pos, slot_mapping=slots, logits_indices=logits, pending_dst=None,
            pending_src=None, query_start_loc=query_start, seq_lens=seq_lens, block_tables=tables,
            num_tokens=tokens, num_seqs=seqs, max_query_len=tokens, max_seq_len=self.graph_max_context,
            query_start_host=np.zeros(seqs + 1, dtype=np.int64), seq_lens_host=np.zeros(seqs, dtype=np.int64),
            graph_mixed=(tokens, seqs), prefill_tiles=self._tile_map(self.device32, self._tiles(tokens, seqs)))

    def _tiles(self, tokens: int, seqs: int) -> int:
        """Rows of the tile map of a mixed graph of `tokens` and `seqs`: every sequence's last tile may be partial."""
        return -(-tokens // self.tile_rows) + seqs

    def _tile_map(self, region32, tiles: int):
        """[tiles, 2] view of the tile map in an int32 region (a host staging array or the device buffer)."""
        return region32[self.tiles_at:self.tiles_at + 2 * tiles].reshape(tiles, 2)

    def _mixed_layout(self, num_seqs: int, num_tokens: int, max_seq_len: int) -> Optional[tuple[int, int]]:
        """The smallest mixed graph (tokens, sequences) that holds this step, or None."""
        if max_seq_len > self.graph_max_context:
            return None
        return next(((t, s) for t, s in self.graph_mixed if t >= num_tokens and s >= num_seqs), None)

    def _graph_layout(self, num_seqs: int, num_tokens: int, max_seq_len: int, all_sample: bool,
                      prefill_graphs: bool) -> tuple[Optional[int], Optional[int]]:
        """(decode graph size, prefill graph tokens) this step can replay; (None, None) runs it eagerly."""
        if max_seq_len > self.graph_max_context:
            return None, None
        if num_tokens == num_seqs and all_sample and self.graph_sizes and num_seqs <= self.graph_sizes[-1]:
            return next(size for size in self.graph_sizes if size >= num_seqs), None
        if (prefill_graphs and num_seqs == 1 and self.graph_prefill_tokens
                and 1 < num_tokens <= self.graph_prefill_tokens[-1]):
            return None, next(size for size in self.graph_prefill_tokens if size >= num_tokens)
        return None, None

    def _host_views(self, pair) -> tuple:
        """numpy views of a staging pair: int64 whole, int32 whole, and the six int64 regions laid out for small
        steps and for large ones."""
        host64, host32 = pair[0].numpy(), pair[1].numpy()
        return host64, host32, {T: tuple(host64[i * T:(i + 1) * T] for i in range(6)) for T in (self.small, self.max_tokens)}

    def _views(self, n: int, num_logits: int, num_pending: int, rows_out: int, width: int, stride: int) -> tuple:
        """The device-buffer views that a batch of this shape reads, made once per shape: slicing a tensor
        costs over a microsecond, and a decode step's shape seldom changes from one step to the next."""
        key = (n, num_logits, num_pending, rows_out, width, stride)
        views = self._device_views.get(key)
        if views is None:
            if len(self._device_views) >= 1024:  # shapes seen long ago are unlikely to come back
                self._device_views.clear()
            T = stride
            L, B, d64, d32 = self.lens_at, self.tables_at, self.device64, self.device32
            views = (d64[:n], d64[T:T + n], d64[2 * T:2 * T + n], d64[3 * T:3 * T + num_logits],
                     d64[4 * T:4 * T + num_pending] if num_pending else None,
                     d64[5 * T:5 * T + num_pending] if num_pending else None,
                     d32[:rows_out + 1], d32[L:L + rows_out], d32[B:B + rows_out * width].view(rows_out, width))
            self._device_views[key] = views
        return views

    def _stride(self, num_tokens: int) -> int:
        """How far apart a step's six int64 arrays lie: `small` for small steps, else max_tokens."""
        return self.small if num_tokens <= self.small else self.max_tokens

    def _staging_pair(self):
        pin = self.device.type == "cuda"
        return (torch.empty(6 * self.max_tokens, dtype=torch.int64, pin_memory=pin),
                torch.empty(self.tables_at + self.max_seqs * self.max_blocks, dtype=torch.int32, pin_memory=pin))

    def build(self, sched: SchedulerOutput, previous_seqs: Optional[list] = None,
              prefill_graphs: bool = True) -> tuple[ForwardBatch, list]:
        """Returns the batch and the sequences that sample this step, in logits-row order.

        `previous_seqs`: the sequences the previous step sampled, in order (a pending token of previous_seqs[i]
        is row i of that step's sampled ids). Without `prefill_graphs`, a lone prefill is laid out for an eager
        forward."""
        items = sched.scheduled
        num_seqs = len(items)
        seqs = [item.seq for item in items]
        start_list, end_list = [item.start for item in items], [item.end for item in items]
        num_tokens = sum(end_list) - sum(start_list)
        if num_tokens > self.max_tokens or num_seqs > self.max_seqs:
            raise ValueError(f"step of {num_tokens} tokens / {num_seqs} sequences exceeds the runner's buffers")
        staging64, staging32 = self.staging[self.turn]
        max_seq_len = max(end_list) if num_seqs else 0
        samples = [i for i, item in enumerate(items) if item.samples]
        graph_size, graph_tokens = self._graph_layout(num_seqs, num_tokens, max_seq_len, len(samples) == num_seqs,
                                                      prefill_graphs)
        mixed = None  # a step no decode or lone-prefill graph takes may fit a mixed graph
        if prefill_graphs and graph_size is None and graph_tokens is None:
            mixed = self._mixed_layout(num_seqs, num_tokens, max_seq_len)
        # padding for a decode or lone-prefill graph stays within the small layout; mixed graphs read the large one
        stride = self.max_tokens if mixed else self._stride(num_tokens)
        host64, host32, regions = self.host_views[self.turn]
        ids, pos, slots, logit_rows, pending_dst, pending_src = regions[stride]
        self.turn = (self.turn + 1) % len(self.staging)
        bs = self.block_size
        rows = np.array(self.rows.rows_for(seqs), dtype=np.int64)
        starts = np.array(start_list, dtype=np.int64)
        table = self.rows.table
        if num_tokens == num_seqs:  # decode rows only: one token each, all in numpy
            query_start = self._arange[:num_seqs + 1]
            seq_lens = starts + 1
            ids[:num_seqs] = [seq.token_ids[start] for seq, start in zip(seqs, start_list)]
            pos[:num_seqs] = starts
            if num_seqs <= 16:  # a few rows: Python ints cost less than numpy's calls (a table row = the seq's blocks)
                slots[:num_seqs] = [seq.block_table[start // bs] * bs + start % bs
                                    for seq, start in zip(seqs, start_list)]
            else:
                slots[:num_seqs] = table[rows, starts // bs].astype(np.int64) * bs + starts % bs
            max_query_len = 1 if num_seqs else 0
        else:
            seq_lens = np.array(end_list, dtype=np.int64)
            query_start = np.zeros(num_seqs + 1, dtype=np.int64)
            np.cumsum(seq_lens - starts, out=query_start[1:])
            for i, item in enumerate(items):
                t, n, start = query_start[i], item.end - item.start, item.start
                tokens = item.seq.token_ids[start:item.end]
                ids[t:t + n] = tokens if n > 1 else tokens[0]
                p = np.arange(start, item.end)
                pos[t:t + n] = p
                slots[t:t + n] = table[rows[i], p // bs].astype(np.int64) * bs + p % bs
            max_query_len = int(np.diff(query_start).max())
        num_pending, pending_in_order = self._pending_rows(ids[:num_tokens], query_start, seqs, previous_seqs,
                                                           pending_dst, pending_src)
        sampling_seqs = seqs if len(samples) == num_seqs else [seqs[i] for i in samples]
        num_logits = len(samples)
        if num_logits < num_seqs:
            logit_rows[:num_logits] = query_start[1:][samples] - 1
        else:  # every sequence samples (no index list to apply)
            logit_rows[:num_logits] = self._arange[:num_seqs] if num_tokens == num_seqs else query_start[1:] - 1
        rows_out = graph_size or (mixed[1] if mixed else num_seqs)
        width = self.graph_width if graph_size or graph_tokens or mixed else max(1, -(-max_seq_len // bs))
        L, B = self.lens_at, self.tables_at
        host32[:num_seqs + 1] = self._arange32[:num_seqs + 1] if num_tokens == num_seqs else query_start
        host32[L:L + num_seqs] = seq_lens
        n32 = B + rows_out * width
        tables = host32[B:n32].reshape(rows_out, width)
        tables[:num_seqs] = self.rows.table[rows, :width]
        padded = graph_tokens or graph_size or (mixed[0] if mixed else num_tokens)
        if padded > num_tokens:  # padding rows: no K/V write, no context
            ids[num_tokens:padded], pos[num_tokens:padded], slots[num_tokens:padded] = 0, 0, -1
        if rows_out > num_seqs:  # padding sequences: empty context
            host32[num_seqs + 1:rows_out + 1] = num_tokens
            host32[L + num_seqs:L + rows_out] = 0
            tables[num_seqs:] = 0
        if graph_tokens:  # the graph always reads one logits row: keep it in bounds
            logit_rows[0] = num_tokens - 1
        tiles = None
        if mixed:  # the graph reads `seqs` logits rows (padding ones in bounds) and the tile map
            logit_rows[num_logits:mixed[1]] = 0
            tiles = self._tiles(*mixed)
            prefill_tiles(host32[:rows_out + 1], self.tile_rows, self._tile_map(host32, tiles))
        if not self.on_host:
            self.device64[:6 * stride].copy_(staging64[:6 * stride], non_blocking=True)
            self.device32[:n32].copy_(staging32[:n32], non_blocking=True)
        views = self._views(padded, num_logits, num_pending, rows_out, width, stride)
        batch = ForwardBatch(
            input_ids=views[0], positions=views[1], slot_mapping=views[2], logits_indices=views[3],
            pending_dst=views[4], pending_src=views[5], query_start_loc=views[6], seq_lens=views[7],
            block_tables=views[8], num_tokens=num_tokens, num_seqs=num_seqs,
            max_query_len=max_query_len, max_seq_len=max_seq_len,
            query_start_host=query_start, seq_lens_host=seq_lens, graph_size=graph_size, graph_tokens=graph_tokens,
            graph_mixed=mixed, pending_in_order=pending_in_order,
            prefill_tiles=self._tile_map(self.device32, tiles) if tiles else None,
        )
        return batch, sampling_seqs

    def _pending_rows(self, ids: np.ndarray, query_start: np.ndarray, seqs: list, previous_seqs: Optional[list],
                      pending_dst: np.ndarray, pending_src: np.ndarray) -> tuple[int, bool]:
        """Input rows whose token the previous step sampled and the host has not read yet (taken on the device):
        writes their rows and their places in the previous step's sampled ids; returns how many there are, and
        whether row i takes sampled id i for each of them (ForwardBatch.pending_in_order)."""
        pending = (ids == PLACEHOLDER).nonzero()[0]
        num_pending = len(pending)
        if not num_pending:
            return 0, False
        if len(ids) == len(seqs):  # one token per sequence: row i is sequence i
            seq_of_row = pending
        else:
            seq_of_row = np.searchsorted(query_start, pending, side="right") - 1
            if (query_start[seq_of_row + 1] - query_start[seq_of_row] != 1).any():
                raise RuntimeError("a chunk of several tokens holds a pending token")
        pending_dst[:num_pending] = pending
        waiting = seqs if num_pending == len(seqs) else [seqs[i] for i in seq_of_row.tolist()]
        if waiting == previous_seqs:  # the steady state: the same sequences in the same order
            pending_src[:num_pending] = self._arange[:num_pending]
            return num_pending, num_pending == len(ids)  # every row pending: dst is 0..n-1 too
        index = {seq.seq_id: i for i, seq in enumerate(previous_seqs)}
        pending_src[:num_pending] = [index[seq.seq_id] for seq in waiting]
        return num_pending, False
