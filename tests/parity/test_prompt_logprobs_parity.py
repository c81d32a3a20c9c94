"""Prompt logprobs against HF transformers' log_softmax in float32 (the reference, run here) on tiny models:
in one batch, with chunked prefill, after a prefix-cache hit, under preemption, and prefill-only (max_tokens 0);
the scheduling cases also with steps overlapped as on a GPU (async scheduling).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from photoninfer import LLM, SamplingParams

PROMPT_LENS = [1, 2, 17, 64, 150, 300]
TOP = 3
TOL = 1e-4


def build_reference(path: str):
    """(model dir, prompts, per prompt the HF log_softmax [P - 1, V] of the rows that predict tokens 1..P-1)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(4321)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]
    with torch.no_grad():
        expected = [torch.log_softmax(model(torch.tensor([p])).logits[0, :-1].float(), dim=-1) for p in prompts]
    return path, prompts, expected


@pytest.fixture(scope="module", params=["llama3", "qwen3", "smollm2"])
def each_model(request, make_tiny_model):
    return build_reference(make_tiny_model(request.param))


@pytest.fixture(scope="module")
def reference(make_tiny_model):
    """The scheduling tests do not depend on the architecture: one model serves them."""
    return build_reference(make_tiny_model("llama3"))


@pytest.fixture(params=[False, True], ids=["sync", "async-scheduling"])
def async_scheduling(request) -> bool:
    return request.param


def params(max_tokens=3, prompt_logprobs=TOP):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=prompt_logprobs)


def check_prompt_logprobs(prompt: list[int], ours, hf: torch.Tensor) -> None:
    """ours: RequestOutput.prompt_logprobs; hf: [P - 1, V] reference rows."""
    assert ours is not None and len(ours) == len(prompt)
    assert ours[0] is None
    if len(prompt) == 1:
        return
    targets = torch.tensor(prompt[1:]).unsqueeze(1)
    chosen = [entry[token] for token, entry in zip(prompt[1:], ours[1:])]
    hf_chosen = hf.gather(1, targets)
    assert (torch.tensor([lp.logprob for lp in chosen]) - hf_chosen.squeeze(1)).abs().max() < TOL
    # rank: 1 + how many tokens are more likely (ties within the tolerance may go either way)
    ranks = torch.tensor([lp.rank for lp in chosen])
    assert bool(((hf > hf_chosen + TOL).sum(1) + 1 <= ranks).all())
    assert bool((ranks <= (hf > hf_chosen - TOL).sum(1)).all())
    best = torch.topk(hf, TOP, dim=1).values
    for i, (token, entry) in enumerate(zip(prompt[1:], ours[1:])):
        alternatives = {t: lp for t, lp in entry.items() if lp.rank <= TOP}
        assert sorted(lp.rank for lp in alternatives.values()) == list(range(1, TOP + 1))
        assert len(entry) == TOP + (token not in alternatives)
        ids = list(alternatives)
        values = torch.tensor([alternatives[t].logprob for t in ids])
        assert (values - hf[i, ids]).abs().max() < TOL
        assert (values - best[i, [alternatives[t].rank - 1 for t in ids]]).abs().max() < TOL


def check_all(outputs, prompts, expected):
    for out, prompt, hf in zip(outputs, prompts, expected):
        check_prompt_logprobs(prompt, out.prompt_logprobs, hf)


def test_prompt_logprobs_equal_hf_in_one_batch(each_model):
    path, prompts, expected = each_model
    llm = LLM(path, dtype="float32", device="cpu")
    outputs = llm.generate(prompts, params())
    check_all(outputs, prompts, expected)
    assert all(len(o.outputs[0].token_ids) == 3 for o in outputs)
    assert llm.generate(prompts[3], params(prompt_logprobs=None))[0].prompt_logprobs is None


def test_chunked_prefill_yields_every_entry(reference, async_scheduling):
    path, prompts, expected = reference
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=24, async_scheduling=async_scheduling)
    check_all(llm.generate(prompts, params()), prompts, expected)


def test_prefix_cache_hit_does_not_skip_them(reference, async_scheduling):
    """The same prompt twice: the second time its blocks are cached, yet its prompt logprobs are whole."""
    path, prompts, expected = reference
    llm = LLM(path, dtype="float32", device="cpu", async_scheduling=async_scheduling)
    stats = llm.engine.stats
    llm.generate(prompts[-1], params(prompt_logprobs=None))  # caches the prompt's full blocks
    hits = stats().prefix_cache_hit_tokens
    for _ in range(2):
        check_prompt_logprobs(prompts[-1], llm.generate(prompts[-1], params())[0].prompt_logprobs, expected[-1])
    assert stats().prefix_cache_hit_tokens == hits  # it computed its whole prompt
    llm.generate(prompts[-1], params(prompt_logprobs=None))
    assert stats().prefix_cache_hit_tokens > hits  # while a request without them does reuse the cache


def test_preemption_does_not_duplicate_them(reference, async_scheduling):
    path, prompts, expected = reference
    # 24 blocks of 16 tokens for ~660 prompt + 240 generated tokens: sequences are preempted both halfway
    # through their chunked prompt (recomputed entries are not asked again) and while decoding
    llm = LLM(path, dtype="float32", device="cpu", num_kv_blocks=24, max_num_batched_tokens=64,
              async_scheduling=async_scheduling)
    outputs = llm.generate(prompts, params(max_tokens=40))
    check_all(outputs, prompts, expected)
    assert llm.engine.stats().num_preemptions > 0
    assert llm.engine.stats().kv_blocks_used == 0


def test_max_tokens_zero_only_prefills(reference, async_scheduling):
    path, prompts, expected = reference
    llm = LLM(path, dtype="float32", device="cpu", max_model_len=300, async_scheduling=async_scheduling)
    outputs = llm.generate(prompts, params(max_tokens=0))  # the 300-token prompt fills the context exactly
    check_all(outputs, prompts, expected)
    for out in outputs:
        assert out.outputs[0].token_ids == [] and out.outputs[0].text == ""
        assert out.outputs[0].finish_reason == "length"
    plain = llm.generate(prompts[2], SamplingParams(max_tokens=0))[0]
    assert plain.prompt_logprobs is None and plain.outputs[0].finish_reason == "length"
    assert llm.engine.stats().kv_blocks_used == 0
