"""Prompt logprobs without a model: validation, which rows of a chunk give which entries, the row-sliced
log-softmax, no prefix reuse for requests that ask for them, and prefill-only (max_tokens 0) scheduling."""

import pytest
import torch

import photoninfer.runner.prompt_logprobs as prompt_logprobs
from photoninfer.engine.block_manager import BlockManager
from photoninfer.engine.scheduler import Scheduler
from photoninfer.engine.sequence import Sequence
from photoninfer.errors import InvalidRequestError
from photoninfer.runner.prompt_logprobs import prompt_rows, prompt_token_logprobs
from photoninfer.sampling_params import SamplingParams


@pytest.mark.parametrize("value", [-1, 21, "3", 2.0, True])
def test_prompt_logprobs_out_of_range_or_not_an_integer_is_rejected(value):
    with pytest.raises(InvalidRequestError, match="prompt_logprobs") as err:
        SamplingParams(prompt_logprobs=value)
    assert err.value.param == "prompt_logprobs"


def test_max_tokens_zero_is_allowed_but_not_below():
    assert SamplingParams(max_tokens=0, prompt_logprobs=0).max_tokens == 0
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(max_tokens=0, min_tokens=1)


@pytest.mark.parametrize("start,end,prompt_len,first_entry,expected", [
    (0, 10, 10, 1, range(0, 9)),  # whole prompt at once: the last row samples instead
    (0, 4, 10, 1, range(0, 4)),  # first chunk: its last row predicts the next chunk's first token
    (4, 8, 10, 5, range(4, 8)),
    (8, 10, 10, 9, range(8, 9)),
    (0, 8, 10, 6, range(5, 8)),  # recompute after preemption: entries 1..5 are known
    (0, 10, 10, 10, range(9, 9)),  # all known
    (10, 11, 10, 10, range(10, 9)),  # decoding
    (0, 1, 1, 1, range(0, 0)),  # a one-token prompt has no entries
])
def test_prompt_rows(start, end, prompt_len, first_entry, expected):
    assert list(prompt_rows(start, end, prompt_len, first_entry)) == list(expected)


def test_prompt_token_logprobs_equal_log_softmax_across_slices(monkeypatch):
    monkeypatch.setattr(prompt_logprobs, "ROWS_PER_SLICE", 3)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 8, generator=g)
    head = torch.randn(50, 8, generator=g)
    targets = torch.randint(0, 50, (7,), generator=g)
    results = prompt_token_logprobs(hidden, targets, 4, lambda h: h @ head.T)
    reference = torch.log_softmax(hidden @ head.T, dim=-1)
    assert len(results) == 7
    for row, target, result in zip(reference, targets.tolist(), results):
        assert result.token_id == target
        assert result.logprob == pytest.approx(float(row[target]), abs=1e-6)
        assert result.rank == int((row > row[target]).sum()) + 1
        values, ids = torch.topk(row, 4)
        assert [t for t, _ in result.top_logprobs] == ids.tolist()
        assert [v for _, v in result.top_logprobs] == pytest.approx(values.tolist(), abs=1e-6)
    assert all(r.top_logprobs == [] for r in prompt_token_logprobs(hidden, targets, 0, lambda h: h @ head.T))


def test_a_request_for_prompt_logprobs_reuses_no_cached_prefix():
    manager = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(1, 14))
    first = Sequence("first", prompt, SamplingParams(), 0.0)
    manager.allocate(first, len(prompt))
    first.num_computed_tokens = len(prompt)
    manager.cache_full_blocks(first)
    manager.free(first)
    plain = Sequence("plain", prompt, SamplingParams(), 0.0)
    assert len(manager.cached_prefix(plain)) == 3
    wants = Sequence("wants", prompt, SamplingParams(prompt_logprobs=0), 0.0)
    assert manager.cached_prefix(wants) == []


def test_max_tokens_zero_prefills_in_chunks_and_never_samples():
    scheduler = Scheduler(BlockManager(num_blocks=16, block_size=4), max_num_seqs=4, max_num_batched_tokens=6)
    seq = Sequence("prefill-only", list(range(1, 11)), SamplingParams(max_tokens=0), 0.0)
    scheduler.add(seq)
    steps = []
    for _ in range(2):
        out = scheduler.schedule()
        steps += [(s.start, s.end, s.samples) for s in out.scheduled]
        scheduler.postprocess(out, {})
    assert steps == [(0, 6, False), (6, 10, False)]
    assert seq.num_computed_tokens == 10 and seq.num_output_tokens == 0
