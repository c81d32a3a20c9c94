"""Greedy parity with HF transformers (the reference, run here) on tiny random-weight models, float32.

A batch of prompts with lengths 1..300 runs at once; then again with a tiny token budget (chunked prefill)
and a tiny KV cache (preemption by recompute): the tokens must not change.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from photoninfer import LLM, SamplingParams

PROMPT_LENS = [1, 5, 17, 64, 100, 150, 257, 300]
NEW_TOKENS = 12


def hf_greedy(model, prompt: list[int]):
    """HF's greedy continuation and the log_softmax of each chosen token."""
    out = model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, return_dict_in_generate=True, output_logits=True,
        pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


@pytest.fixture(scope="module", params=["llama3", "qwen3", "smollm2"])
def reference(request, make_tiny_model):
    path = make_tiny_model(request.param)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1234)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]
    with torch.no_grad():
        expected = [hf_greedy(model, p) for p in prompts]
    return path, prompts, expected, model


# min_tokens bans EOS exactly like HF's min_new_tokens, so both sides generate NEW_TOKENS tokens
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=0)


def check_matches(outputs, expected):
    for out, (tokens, logprobs) in zip(outputs, expected):
        completion = out.outputs[0]
        assert completion.token_ids == tokens
        assert completion.finish_reason == "length"
        ours = [completion.logprobs[i][t].logprob for i, t in enumerate(tokens)]
        assert max(abs(a - b) for a, b in zip(ours, logprobs)) < 1e-4


def test_batched_greedy_equals_hf(reference):
    path, prompts, expected, _ = reference
    llm = LLM(path, dtype="float32", device="cpu")
    check_matches(llm.generate(prompts, GREEDY), expected)
    assert llm.engine.stats().num_preemptions == 0


def test_chunked_prefill_keeps_tokens(reference):
    path, prompts, expected, _ = reference
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=48)
    check_matches(llm.generate(prompts, GREEDY), expected)


def test_preemption_keeps_tokens(reference):
    path, prompts, expected, _ = reference
    # the longest request needs ceil(312/16) = 20 blocks; the whole batch needs ~60
    llm = LLM(path, dtype="float32", device="cpu", num_kv_blocks=24, max_num_batched_tokens=128)
    check_matches(llm.generate(prompts, GREEDY), expected)
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0
    assert stats.kv_blocks_used == 0


def test_prefix_cache_keeps_tokens(reference):
    """Prompts sharing prefixes of 40..290 tokens with earlier ones reuse cached blocks, tokens unchanged."""
    path, prompts, _, model = reference
    longest = prompts[-1]
    shared = [longest[:n] + prompts[i][:5] for i, n in enumerate([40, 100, 170, 290])]
    with torch.no_grad():
        expected = [hf_greedy(model, p) for p in shared]
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=128)
    llm.generate([longest], GREEDY)  # fills the cache with the long prompt's blocks
    check_matches(llm.generate(shared, GREEDY), expected)
    stats = llm.engine.stats()
    assert stats.prefix_cache_hit_tokens >= (32 + 96 + 160 + 288)
    assert stats.kv_blocks_used == 0


@pytest.mark.parametrize("options", [{}, {"max_num_batched_tokens": 48}, {"num_kv_blocks": 24, "max_num_batched_tokens": 128}],
                         ids=["batched", "chunked", "preempting"])
def test_async_scheduling_keeps_tokens(reference, options):
    """Steps overlapped as on a GPU (each step's inputs taken from the previous step's device tensor, results
    read one step later) give the same tokens and free every block."""
    path, prompts, expected, _ = reference
    llm = LLM(path, dtype="float32", device="cpu", async_scheduling=True, **options)
    assert llm.engine.async_scheduling
    check_matches(llm.generate(prompts, GREEDY), expected)
    assert llm.engine.stats().kv_blocks_used == 0
