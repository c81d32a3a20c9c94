"""Sampler statistics with fixed seeds: truncation sets and frequencies match the requested distribution."""

import math
import random

import pytest
import torch

from photoninfer.errors import InvalidRequestError
from photoninfer.runner.sampler import Sampler, SamplingRow, apply_penalties, truncated_probs
from photoninfer.sampling_params import SamplingParams

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
N = 6000


def draw(params: SamplingParams, n=N, logits=LOGITS, seed=0) -> torch.Tensor:
    sampler = Sampler(seed=seed)
    rows = [SamplingRow(params, [], 0, None)] * n
    results = sampler(logits.expand(n, -1).contiguous(), rows)
    return torch.bincount(torch.tensor([r.token_id for r in results]), minlength=logits.numel()).float() / n


def expected(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    return truncated_probs(logits / temperature, top_k, top_p, min_p)


def assert_close_to(freq, probs):
    # 5 standard errors of a binomial proportion: fails for a wrong distribution, not for noise
    tol = 5 * torch.sqrt(probs * (1 - probs) / N) + 1e-9
    assert torch.all((freq - probs).abs() <= tol), (freq, probs)
    assert torch.all(freq[probs == 0] == 0), "sampled a token outside the truncated set"


def test_plain_temperature_sampling_matches_softmax():
    assert_close_to(draw(SamplingParams(temperature=0.7)), torch.softmax(LOGITS / 0.7, -1))


def test_top_k_keeps_exactly_k_tokens():
    probs = expected(LOGITS, top_k=3)
    assert int((probs > 0).sum()) == 3
    assert_close_to(draw(SamplingParams(temperature=1.0, top_k=3)), probs)


def test_top_p_keeps_smallest_set_reaching_p():
    full = torch.softmax(LOGITS, -1)
    probs = expected(LOGITS, top_p=0.8)
    kept = int((probs > 0).sum())
    assert full[: kept - 1].sum() < 0.8 <= full[:kept].sum()
    assert_close_to(draw(SamplingParams(temperature=1.0, top_p=0.8)), probs)


def test_min_p_drops_tokens_below_fraction_of_the_best():
    full = torch.softmax(LOGITS, -1)
    probs = expected(LOGITS, min_p=0.2)
    assert torch.equal(probs > 0, full >= 0.2 * full.max())
    assert_close_to(draw(SamplingParams(temperature=1.0, min_p=0.2)), probs)


def test_greedy_is_argmax_and_seed_gives_same_draws():
    assert draw(SamplingParams(temperature=0.0), n=50)[0] == 1.0
    a = draw(SamplingParams(temperature=1.0, seed=5), n=200, seed=1)
    b = draw(SamplingParams(temperature=1.0, seed=5), n=200, seed=1)
    assert torch.equal(a, b)


def test_seeded_rows_do_not_depend_on_their_neighbours():
    def run(n_neighbours):
        sampler = Sampler(seed=0)
        gen = random.Random(42)
        row = SamplingRow(SamplingParams(temperature=1.0, seed=42), [], 0, gen)
        other = SamplingRow(SamplingParams(temperature=1.0), [], 0, None)
        tokens = []
        for _ in range(30):
            rows = [other] * n_neighbours + [row]
            res = sampler(LOGITS.expand(len(rows), -1).contiguous(), rows)
            tokens.append(res[-1].token_id)
        return tokens

    assert run(0) == run(5)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([2.0, -2.0, 1.0])
    apply_penalties(logits, SamplingRow(SamplingParams(repetition_penalty=2.0), [0, 1], 1, None))
    assert logits.tolist() == [1.0, -4.0, 1.0]


def test_presence_and_frequency_penalties_count_generated_tokens():
    logits = torch.zeros(4)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    apply_penalties(logits, SamplingRow(params, [3, 3, 1, 1, 2], 2, None))
    assert logits.tolist() == [0.0, -1.0, -0.75, 0.0]  # the prompt token 3 is not penalized


def test_banned_tokens_are_never_sampled():
    sampler = Sampler(seed=0)
    rows = [SamplingRow(SamplingParams(temperature=0.0), [], 0, None, banned_token_ids=(0,))]
    assert sampler(LOGITS.unsqueeze(0), rows)[0].token_id == 1


def test_logprobs_report_raw_distribution_rank_and_top_n():
    sampler = Sampler(seed=0)
    rows = [SamplingRow(SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.5), [0], 1, None)]
    res = sampler(LOGITS.unsqueeze(0), rows)[0]
    raw = torch.log_softmax(LOGITS, -1)
    assert math.isclose(res.logprob, float(raw[res.token_id]), rel_tol=1e-6)
    assert res.rank == int((raw > raw[res.token_id]).sum()) + 1
    assert [t for t, _ in res.top_logprobs] == [0, 1, 2]


@pytest.mark.parametrize("kwargs,param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"min_p": 2}, "min_p"), ({"max_tokens": -1}, "max_tokens"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logprobs": 50}, "logprobs"), ({"stop": [""]}, "stop"), ({"seed": 1.5}, "seed"),
    ({"temperature": float("nan")}, "temperature"), ({"n": 0}, "n"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
])
def test_invalid_sampling_params_raise_with_param_name(kwargs, param):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param and param in str(err.value)


def test_batched_truncation_keeps_the_same_sets_as_the_row_reference():
    """Mixed rows in one batch, including a flat row whose nucleus is wider than the searched columns."""
    from photoninfer.runner.sampler import NUCLEUS_SEARCH_WIDTH, batched_truncated_probs

    g = torch.Generator().manual_seed(0)
    vocab = 3 * NUCLEUS_SEARCH_WIDTH
    logits = torch.randn(7, vocab, generator=g) * 3
    logits[6] = torch.randn(vocab, generator=g) * 0.01  # nearly uniform: top_p 0.9 needs ~2.7k tokens
    params = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(top_p=0.5),
              SamplingParams(temperature=1.3, top_k=40, top_p=0.8), SamplingParams(min_p=0.1), SamplingParams(),
              SamplingParams(temperature=0.9, top_p=0.999, min_p=0.01), SamplingParams(top_p=0.9)]
    batched = batched_truncated_probs(logits, [SamplingRow(p, [], 0, None) for p in params])
    for i, p in enumerate(params):
        reference = truncated_probs(logits[i] / p.temperature, p.top_k, p.top_p, p.min_p)
        assert torch.equal(batched[i] > 0, reference > 0), i
        torch.testing.assert_close(batched[i] / batched[i].sum(), reference)
    assert int((batched[6] > 0).sum()) > NUCLEUS_SEARCH_WIDTH


def test_a_vanishing_top_p_keeps_only_the_best_token():
    """top_p = 5e-324 (found by the server fuzz test) rounds to 0 in float32: it must act like greedy, not crash."""
    sampler = Sampler(seed=0)
    for top_k in (0, 3):
        rows = [SamplingRow(SamplingParams(temperature=1.0, top_p=5e-324, top_k=top_k), [], 0, None)] * 20
        assert {r.token_id for r in sampler(LOGITS.expand(20, -1).contiguous(), rows)} == {0}


@pytest.mark.parametrize("shape", ["zipf", "gaussian", "nearly_uniform"])
@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9, 0.99])
def test_top_p_is_exact_on_a_flat_32k_vocabulary(shape, top_p):
    """The nucleus is the same set as a full sort's, whatever share of the mass the searched columns hold:
    a 32k vocabulary whose best 1,024 tokens hold well under all of it (issue 8, defect 6)."""
    from photoninfer.runner.sampler import batched_truncated_probs

    vocab = 32_000
    g = torch.Generator().manual_seed(1)
    if shape == "zipf":  # p ~ 1/rank: the best 1,024 hold about 69% of the mass
        logits = -torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))[torch.randperm(vocab, generator=g)]
    elif shape == "gaussian":
        logits = torch.randn(vocab, generator=g) * 1.5
    else:
        logits = torch.randn(vocab, generator=g) * 0.05
    params = [SamplingParams(top_p=top_p), SamplingParams(temperature=0.8, top_k=50, top_p=top_p),
              SamplingParams(temperature=1.5, top_p=top_p)]
    batched = batched_truncated_probs(logits.expand(len(params), -1).contiguous(),
                                      [SamplingRow(p, [], 0, None) for p in params])
    for i, p in enumerate(params):
        reference = truncated_probs(logits / p.temperature, p.top_k, p.top_p, p.min_p)
        assert int((batched[i] > 0).sum()) == int((reference > 0).sum()), (i, p)
        assert torch.equal(batched[i] > 0, reference > 0), (i, p)


def test_a_plain_greedy_batch_takes_the_argmax_shortcut_with_the_general_result():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    rows = [SamplingRow(SamplingParams(temperature=0.0), [1, 2], 1, None) for _ in range(6)]
    assert all(row.plain for row in rows)
    sampler = Sampler(seed=0)
    state = sampler.rng.getstate()
    fast = [r.token_id for r in sampler(logits, rows)]
    assert sampler.rng.getstate() == state  # a greedy batch draws nothing
    for row in rows:
        row.plain = False  # through the general path
    assert fast == [r.token_id for r in Sampler(seed=0)(logits, rows)] == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("params, banned", [
    (SamplingParams(temperature=0.7), ()),
    (SamplingParams(temperature=0.0, logprobs=2), ()),
    (SamplingParams(temperature=0.0, repetition_penalty=1.2), ()),
    (SamplingParams(temperature=0.0, presence_penalty=0.5), ()),
    (SamplingParams(temperature=0.0), (4,)),
], ids=["temperature", "logprobs", "repetition", "presence", "banned"])
def test_rows_that_need_more_than_an_argmax_are_not_plain(params, banned):
    assert not SamplingRow(params, [], 0, None, banned_token_ids=banned).plain
