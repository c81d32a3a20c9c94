"""Scheduler + BlockManager on fake requests: plain Python, no model."""

import pytest

from photoninfer.engine.block_manager import BlockManager
from photoninfer.engine.scheduler import Scheduler
from photoninfer.engine.sequence import Sequence, SequenceStatus
from photoninfer.sampling_params import SamplingParams


def make_seq(name, prompt_len, max_tokens=8):
    return Sequence(name, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), 0.0)


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=64, prefix_caching=True):
    return Scheduler(BlockManager(num_blocks, block_size, prefix_caching), max_num_seqs, budget)


def run_step(sched, token=7):
    """Schedule, pretend the model ran, sample `token` for sequences that reached their end."""
    out = sched.schedule()
    sampled = {s.seq.seq_id: token for s in out.scheduled if s.samples}
    sched.postprocess(out, sampled)
    return out


def scheduled_map(out):
    return {s.seq.request_id: s.num_new_tokens for s in out.scheduled}


def test_admission_respects_token_budget_and_max_num_seqs():
    sched = make_scheduler(max_num_seqs=2, budget=100)
    for i in range(4):
        sched.add(make_seq(f"r{i}", 10))
    out = run_step(sched)
    assert scheduled_map(out) == {"r0": 10, "r1": 10}  # max_num_seqs caps admission
    assert [s.request_id for s in sched.waiting] == ["r2", "r3"]
    assert all(s.status is SequenceStatus.RUNNING for s in sched.running)


def test_budget_limits_admission_and_chunks_the_last_admitted_prompt():
    sched = make_scheduler(budget=16)
    sched.add(make_seq("a", 10))
    sched.add(make_seq("b", 10))
    out = run_step(sched)
    assert scheduled_map(out) == {"a": 10, "b": 6}
    assert [s.samples for s in out.scheduled] == [True, False]
    b = sched.running[1]
    assert b.num_computed_tokens == 6 and b.num_output_tokens == 0


def test_long_prompt_is_prefilled_in_chunks_then_decodes():
    sched = make_scheduler(budget=8)
    seq = make_seq("long", 20)
    sched.add(seq)
    chunks = [scheduled_map(run_step(sched))["long"] for _ in range(3)]
    assert chunks == [8, 8, 4]
    assert seq.num_output_tokens == 1  # sampled only when the last chunk completed the prompt
    assert scheduled_map(run_step(sched)) == {"long": 1}
    assert seq.num_computed_tokens == 21 and seq.num_output_tokens == 2


def test_prefill_chunk_is_mixed_with_decodes_in_one_step():
    sched = make_scheduler(budget=8)
    sched.add(make_seq("a", 3))
    run_step(sched)  # a prefilled, decoding now
    sched.add(make_seq("b", 30))
    out = run_step(sched)
    assert scheduled_map(out) == {"a": 1, "b": 7}  # decode first, prompt chunk fills the rest


def preempt_newest(prefix_caching):
    """Two sequences outgrow 6 blocks of 4: the newer one is preempted. Returns (scheduler, old, new)."""
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64, prefix_caching=prefix_caching)
    old, new = make_seq("old", 8), make_seq("new", 8)
    sched.add(old)
    sched.add(new)
    run_step(sched)  # 2 blocks each, 2 free
    for _ in range(4):  # both grow into a third block, then "old" needs a 4th
        run_step(sched)
    for _ in range(8):
        out = run_step(sched)
        if out.preempted:
            assert [s.request_id for s in out.preempted] == ["new"]
            assert new.status is SequenceStatus.PREEMPTED and new.num_computed_tokens == 0
            assert new.block_table == [] and sched.waiting[0] is new
            return sched, old, new
    raise AssertionError("no preemption happened")


def test_preemption_frees_newest_and_resumes_by_recompute():
    sched, old, new = preempt_newest(prefix_caching=False)
    outputs_before = list(new.output_token_ids)
    sched.finish(old, "length")  # frees room: "new" is recomputed, prompt + its generated tokens
    out = run_step(sched)
    assert scheduled_map(out) == {"new": new.num_prompt_tokens + len(outputs_before)}
    assert new.output_token_ids[: len(outputs_before)] == outputs_before
    assert new.num_output_tokens == len(outputs_before) + 1


def test_preempted_sequence_resumes_from_its_cached_blocks():
    sched, old, new = preempt_newest(prefix_caching=True)
    num_tokens = new.num_tokens
    sched.finish(old, "length")
    out = run_step(sched)
    # every full block before the last token is reused; only the rest is recomputed
    reused = (num_tokens - 1) // 4 * 4
    assert scheduled_map(out) == {"new": num_tokens - reused}
    assert sched.block_manager.prefix_hit_tokens == reused


def test_common_prompt_prefix_shares_blocks():
    sched = make_scheduler(num_blocks=20, block_size=4)
    first = Sequence("first", list(range(1, 15)), SamplingParams(max_tokens=4), 0.0)  # 14 tokens: 3 full blocks
    sched.add(first)
    run_step(sched)
    second = Sequence("second", list(range(1, 13)) + [99, 98], SamplingParams(max_tokens=4), 0.0)
    sched.add(second)
    out = run_step(sched)
    assert scheduled_map(out) == {"first": 1, "second": 14 - 12}  # 12 common tokens = 3 cached blocks
    assert second.block_table[:3] == first.block_table[:3]
    assert [sched.block_manager.ref_counts[b] for b in first.block_table[:3]] == [2, 2, 2]
    sched.finish(first, "abort")
    sched.finish(second, "abort")
    assert sched.block_manager.num_free_blocks == 20


def test_cached_blocks_are_evicted_when_memory_is_needed():
    sched = make_scheduler(num_blocks=4, block_size=4)
    seq = make_seq("a", 9)  # 3 blocks, 2 of them full and cached
    sched.add(seq)
    run_step(sched)
    sched.finish(seq, "stop")
    bm = sched.block_manager
    assert bm.num_free_blocks == 4 and len(bm.cached_blocks) == 2
    stale = set(bm.cached_blocks)
    other = Sequence("b", list(range(50, 66)), SamplingParams(max_tokens=1), 0.0)  # needs all 4 blocks
    sched.add(other)
    run_step(sched)
    assert len(other.block_table) == 4 and not stale & set(bm.cached_blocks)  # a's entries were dropped
    again = make_seq("a-again", 9)
    assert bm.cached_prefix(again) == []


def test_abort_frees_blocks_at_once():
    sched = make_scheduler(num_blocks=10)
    seq = make_seq("a", 12)
    sched.add(seq)
    run_step(sched)
    assert sched.block_manager.num_free_blocks == 10 - 3  # 12 computed tokens in blocks of 4
    sched.finish(seq, "abort")
    assert sched.block_manager.num_free_blocks == 10 and not sched.has_unfinished()
    assert seq.finish_reason == "abort"


def test_abort_while_waiting_removes_from_queue():
    sched = make_scheduler()
    seq = make_seq("a", 5)
    sched.add(seq)
    sched.finish(seq, "abort")
    assert not sched.waiting and sched.schedule().is_empty


def test_no_block_leaked_after_many_requests_finish():
    sched = make_scheduler(num_blocks=12, block_size=4, max_num_seqs=4, budget=10)
    seqs = [make_seq(f"r{i}", 3 + (i * 7) % 13, max_tokens=3 + i % 5) for i in range(12)]
    for s in seqs:
        sched.add(s)
    for _ in range(500):
        if not sched.has_unfinished():
            break
        run_step(sched)
        for s in list(sched.running):
            if s.num_output_tokens >= s.params.max_tokens:
                sched.finish(s, "length")
    assert not sched.has_unfinished()
    assert all(s.num_output_tokens == s.params.max_tokens for s in seqs)
    assert sched.block_manager.num_free_blocks == 12
    assert all(c == 0 for c in sched.block_manager.ref_counts)


def test_block_manager_refcounts_and_errors():
    bm = BlockManager(4, 2)
    seq = make_seq("a", 3)
    assert bm.num_new_blocks_needed(seq, 3) == 2
    bm.allocate(seq, 3)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 2
    bm.allocate(seq, 4)  # still fits in 2 blocks
    assert len(seq.block_table) == 2
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(seq, 9)
    bm.free(seq)
    assert bm.num_free_blocks == 4


# ---- issue 8, defect 7: prefix-cache keys are a collision-resistant hash chain -----------------------------

def prefill(sched, seq):
    sched.add(seq)
    run_step(sched)
    sched.finish(seq, "stop")  # its full blocks stay cached


def test_a_block_is_reused_only_after_the_very_same_prefix():
    """Block 2 of "victim" follows block 1 = [0, 0, 0, 0]; a lookup whose block 1 differs must not find it,
    even when Python's hash() cannot tell the two first blocks apart: hash(2**61 - 1) == hash(0), so the
    old chain (parent = hash(parent key)) gave both second blocks the same key. Any 64-bit hash collides
    like this for ids in the vocabulary too, after an offline birthday search."""
    assert hash(2**61 - 1) == hash(0)
    sched = make_scheduler(num_blocks=20, block_size=4)
    prefill(sched, Sequence("victim", [0, 0, 0, 0] + [5, 6, 7, 8] + [9], SamplingParams(max_tokens=1), 0.0))
    prefill(sched, Sequence("other", [2**61 - 1] * 4 + [1, 2, 3, 4] + [9], SamplingParams(max_tokens=1), 0.0))
    probe = Sequence("probe", [2**61 - 1] * 4 + [5, 6, 7, 8] + [9], SamplingParams(max_tokens=1), 0.0)
    assert len(sched.block_manager.cached_prefix(probe)) == 1  # block 1 is "other"'s; block 2 is no one's


def test_prefix_keys_depend_on_the_cache_namespace():
    """Whatever changes the K/V (the model, its dtype) is part of the key: the same tokens under another
    namespace are different blocks. Keys are sha256 digests: stable across processes."""
    tokens = list(range(1, 10))
    keys = {}
    for namespace in (b"model-a", b"model-b", b"model-a"):
        bm = BlockManager(8, 4, namespace=namespace)
        seq = Sequence("s", tokens, SamplingParams(max_tokens=1), 0.0)
        bm.allocate(seq, 9)
        seq.num_computed_tokens = 9
        bm.cache_full_blocks(seq)
        keys.setdefault(namespace, []).append(set(bm.cached_blocks))
    assert keys[b"model-a"][0] == keys[b"model-a"][1] and len(keys[b"model-a"][0]) == 2
    assert not keys[b"model-a"][0] & keys[b"model-b"][0]
    assert all(isinstance(k, bytes) and len(k) == 32 for k in keys[b"model-a"][0])


def test_a_block_with_a_token_still_on_the_device_is_cached_once_it_is_known():
    """Async scheduling leaves a placeholder where a sampled id is not read back yet: that block's key is
    unknown, so it is neither cached nor remembered until the id arrives."""
    bm = BlockManager(8, 4)
    seq = Sequence("s", [1, 2, 3, 4, 5, 6, 7], SamplingParams(max_tokens=4), 0.0)
    seq.append_placeholder()
    bm.allocate(seq, 8)
    seq.num_computed_tokens = 8
    bm.cache_full_blocks(seq)
    assert len(bm.cached_blocks) == 1
    seq.resolve_placeholder(8)
    bm.cache_full_blocks(seq)
    probe = Sequence("probe", [1, 2, 3, 4, 5, 6, 7, 8, 9], SamplingParams(max_tokens=1), 0.0)
    assert bm.cached_prefix(probe) == seq.block_table[:2]
