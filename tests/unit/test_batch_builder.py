"""BatchBuilder's shortcuts (reused views and block-table rows, the decode layout, pending tokens of an unchanged
batch) lay every step out exactly as a plain rebuild from the schedule does."""

import random

import numpy as np
import pytest
import torch

from photoninfer import LLM, SamplingParams
from photoninfer.engine.scheduler import ScheduledSequence, SchedulerOutput
from photoninfer.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus
from photoninfer.runner.batch import BatchBuilder, BlockTableRows


def reference_layout(sched: SchedulerOutput, previous_seqs, block_size: int) -> dict:
    """The step's batch computed the slow, obvious way, one token at a time."""
    ids, positions, slots, query_start, seq_lens, logits, dst, src = [], [], [], [0], [], [], [], []
    for item in sched.scheduled:
        seq = item.seq
        for p in range(item.start, item.end):
            if seq.token_ids[p] == PLACEHOLDER:
                dst.append(len(ids))
                src.append(next(i for i, s in enumerate(previous_seqs) if s is seq))
            ids.append(seq.token_ids[p])
            positions.append(p)
            slots.append(seq.block_table[p // block_size] * block_size + p % block_size)
        query_start.append(len(ids))
        seq_lens.append(item.end)
        if item.samples:
            logits.append(len(ids) - 1)
    return dict(input_ids=ids, positions=positions, slot_mapping=slots, query_start_loc=query_start,
                seq_lens=seq_lens, logits_indices=logits, pending_dst=dst, pending_src=src)


def check_batch(batch, sampling_seqs, sched, previous_seqs, block_size):
    want = reference_layout(sched, previous_seqs, block_size)
    for name, values in want.items():
        got = getattr(batch, name)
        got = [] if got is None else got.tolist()
        assert got == values, name
    assert batch.num_tokens == len(want["input_ids"]) and batch.num_seqs == len(sched.scheduled)
    assert batch.query_start_host.tolist() == want["query_start_loc"]
    assert batch.seq_lens_host.tolist() == want["seq_lens"]
    assert batch.max_seq_len == max(want["seq_lens"])
    assert batch.max_query_len == max(np.diff(want["query_start_loc"]))
    for row, item in zip(batch.block_tables.tolist(), sched.scheduled):  # the blocks attention reads
        needed = -(-item.end // block_size)
        assert row[:needed] == item.seq.block_table[:needed]
    assert [s.seq_id for s in sampling_seqs] == [item.seq.seq_id for item in sched.scheduled if item.samples]


def test_engine_batches_equal_a_plain_rebuild_through_joins_finishes_and_preemptions(make_tiny_model):
    """An overlapped (async) run whose batches change all the time: requests join mid-run, finish at
    different lengths, are preempted by a small cache and chunked by a small token budget; batch sizes cross
    the builder's small-batch threshold. Every laid-out step must equal the plain rebuild."""
    llm = LLM(make_tiny_model("llama3"), dtype="float32", device="cpu", async_scheduling=True, num_kv_blocks=90,
              block_size=8, max_num_batched_tokens=64, max_num_seqs=32)
    engine, builder = llm.engine, llm.engine.runner.batch_builder
    seen = {"steps": 0, "decode_sizes": set(), "pending_shuffled": 0, "pending_steady": 0, "pending_in_order": 0}
    real_build = builder.build

    def checked_build(sched, previous_seqs=None, prefill_graphs=True):
        batch, sampling_seqs = real_build(sched, previous_seqs, prefill_graphs)
        check_batch(batch, sampling_seqs, sched, previous_seqs, builder.block_size)
        seen["steps"] += 1
        if batch.num_tokens == batch.num_seqs:
            seen["decode_sizes"].add(batch.num_seqs)
        if batch.pending_dst is not None:
            decode = batch.num_tokens == batch.num_seqs
            pending = [sched.scheduled[i].seq for i in batch.pending_dst.tolist()] if decode else None
            seen["pending_steady" if pending == previous_seqs else "pending_shuffled"] += 1
        if batch.pending_in_order:  # one copy of the first rows serves: dst and src are both 0..n-1
            rows = list(range(batch.num_tokens))
            assert batch.pending_dst.tolist() == batch.pending_src.tolist() == rows
            seen["pending_in_order"] += 1
        return batch, sampling_seqs

    builder.build = checked_build
    rng = random.Random(0)

    def add(name):
        prompt = [rng.randrange(3, 5000) for _ in range(rng.randrange(5, 40))]
        params = SamplingParams(temperature=0.0, max_tokens=rng.randrange(3, 30), ignore_eos=True)
        engine.add_request(name, prompt, params)

    for i in range(30):
        add(f"first-{i}")
    step = 0
    while engine.has_unfinished_requests():
        engine.step()
        step += 1
        if step % 7 == 0 and step < 60:
            add(f"late-{step}")
    assert seen["steps"] > 30 and engine.stats().num_preemptions > 0
    assert min(seen["decode_sizes"]) <= 16 < max(seen["decode_sizes"])  # both ways of computing slots
    assert seen["pending_steady"] and seen["pending_shuffled"] and seen["pending_in_order"]
    assert engine.stats().kv_blocks_used == 0


def _running(name, prompt_len, blocks):
    seq = Sequence(name, list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=8), 0.0)
    seq.status, seq.block_table, seq.num_computed_tokens = SequenceStatus.RUNNING, list(blocks), prompt_len - 1
    return seq


def test_a_row_is_rewritten_when_its_sequence_gets_new_blocks_without_a_release():
    """A sequence preempted in a step that launched nothing (so the builder never saw it preempted) comes back
    with a new block list, maybe shorter than its old one: its row must not keep the old blocks."""
    rows = BlockTableRows(max_num_seqs=2, max_blocks_per_seq=4)
    seq = _running("a", 40, [7, 8, 9])
    row = rows.row_for(seq)
    seq.block_table = [1, 2]  # freed (the block manager sets a new list) and allocated again
    assert rows.rows_for([seq]) == [row]
    assert rows.table[row, :2].tolist() == [1, 2]


def test_rows_of_sequences_no_longer_running_are_reclaimed_when_none_is_free():
    rows = BlockTableRows(max_num_seqs=2, max_blocks_per_seq=4)
    done, preempted = _running("done", 10, [1]), _running("preempted", 10, [2])
    rows.rows_for([done, preempted])
    done.status, preempted.status = SequenceStatus.FINISHED, SequenceStatus.PREEMPTED
    fresh = [_running("new-0", 10, [3]), _running("new-1", 10, [4])]
    assert sorted(rows.rows_for(fresh)) == [0, 1]
    assert [rows.table[r, 0] for r in rows.rows_for(fresh)] == [3, 4]


def test_reused_views_follow_the_shape_of_each_step():
    """Views made for one step's shape are handed out again for that shape only, and hold the new step's data."""
    builder = BatchBuilder(64, 8, 8, 4, torch.device("cpu"))
    seqs = [_running(f"s{i}", 9 + i, [2 * i, 2 * i + 1, 20 + i]) for i in range(3)]
    one = SchedulerOutput([ScheduledSequence(s, s.num_computed_tokens, s.num_computed_tokens + 1, True)
                           for s in seqs])
    first, _ = builder.build(one)
    check_batch(first, seqs, one, None, 4)
    for s in seqs:
        s.num_computed_tokens += 1
        s.token_ids.append(11)
    two = SchedulerOutput([ScheduledSequence(s, s.num_computed_tokens, s.num_computed_tokens + 1, True)
                           for s in seqs[:2]])
    second, _ = builder.build(two)
    check_batch(second, seqs[:2], two, None, 4)
    assert second.input_ids.shape == (2,) and second.block_tables.shape[0] == 2


def test_small_steps_lay_their_arrays_out_close_together():
    """A step of at most `small` tokens keeps its six int64 arrays `small` apart (a short copy to the device);
    a larger one `max_tokens` apart. Both lay the step out correctly, one after the other in the same buffers."""
    builder = BatchBuilder(2048, 4, 80, 16, torch.device("cpu"))
    assert builder.small == 512
    long_seq = _running("long", 700, range(44))
    long_seq.num_computed_tokens = 0
    decode = [_running(f"d{i}", 30 + i, [50 + 2 * i, 51 + 2 * i]) for i in range(2)]
    for sched, stride in [
        (SchedulerOutput([ScheduledSequence(s, s.num_computed_tokens, s.num_computed_tokens + 1, True)
                          for s in decode]), 512),
        (SchedulerOutput([ScheduledSequence(long_seq, 0, 700, True)]), 2048),
        (SchedulerOutput([ScheduledSequence(long_seq, 0, 300, False)]
                         + [ScheduledSequence(s, s.num_computed_tokens, s.num_computed_tokens + 1, True)
                            for s in decode]), 512),
    ]:
        batch, sampling = builder.build(sched)
        check_batch(batch, sampling, sched, None, 16)
        assert batch.positions.storage_offset() == stride
        assert batch.slot_mapping.storage_offset() == 2 * stride


def test_mixed_graphs_must_fit_the_builders_buffers():
    """The mixed graphs' (tokens, sequences) lie within the large layout, the sequence rows and the tile map."""
    builder = BatchBuilder(64, 8, 16, 16, torch.device("cpu"))
    for mixed, tile_rows in (([(128, 4)], 16), ([(64, 16)], 16), ([(64, 4)], 8)):
        with pytest.raises(ValueError, match="must fit 64 tokens and 8 sequences, in tiles of at least 16 rows"):
            builder.use_graphs([1, 2], [16], mixed, tile_rows)
    builder.use_graphs([1, 2], [16], [(64, 8), (32, 4)], 16)
    builder.graph_max_context = 96
    assert builder.graph_mixed == [(32, 4), (64, 8)]  # the smallest that holds a step is taken
    assert builder._mixed_layout(3, 40, 20) == (64, 8) and builder._mixed_layout(3, 20, 20) == (32, 4)
    assert builder._mixed_layout(9, 40, 20) is None and builder._mixed_layout(3, 40, 97) is None  # too long


def test_mixed_graph_sizes_from_the_environment_are_checked():
    from photoninfer.runner.cuda_graph import parse_mixed_tokens

    assert parse_mixed_tokens("256,512") == (256, 512)
    assert parse_mixed_tokens("none") == parse_mixed_tokens("") == ()
    for bad in ("256,abc", "0", "256,-512", ","):
        with pytest.raises(ValueError, match="PHOTONINFER_MIXED_GRAPH_TOKENS"):
            parse_mixed_tokens(bad)
