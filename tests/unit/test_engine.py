"""LLMEngine behaviour on a tiny random-weight model: stops, seeds, aborts, limits, bad requests."""

import pytest
import torch

from photoninfer import LLM, SamplingParams
from photoninfer.errors import InvalidRequestError


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async-scheduling"])
def llm(make_tiny_model, request):
    """Every behaviour holds with steps read back at once and with steps overlapped as on a GPU."""
    return LLM(make_tiny_model("llama3"), dtype="float32", device="cpu", max_model_len=256,
               async_scheduling=request.param)


PROMPT = "The quick brown fox jumps over the lazy dog"


def greedy(llm, **kwargs):
    params = SamplingParams(temperature=0.0, max_tokens=kwargs.pop("max_tokens", 24), ignore_eos=True, **kwargs)
    return llm.generate(PROMPT, params)[0].outputs[0]


def test_max_tokens_ends_with_length(llm):
    out = greedy(llm, max_tokens=7)
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


def test_stop_string_is_cut_from_the_text(llm):
    full = greedy(llm).text
    stop = full[8:12]
    cut = full.find(stop)
    out = greedy(llm, stop=[stop])
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[:cut]
    with_stop = greedy(llm, stop=[stop], include_stop_str_in_output=True)
    assert with_stop.text == full[: cut + len(stop)]


def test_stop_token_id_ends_generation(llm):
    full = greedy(llm).token_ids
    stop_token = full[5]
    out = greedy(llm, stop_token_ids=[stop_token])
    assert out.token_ids == full[: full.index(stop_token) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_token


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=7, max_tokens=20, ignore_eos=True)
    alone = llm.generate(PROMPT, seeded)[0].outputs[0].token_ids
    again = llm.generate(PROMPT, seeded)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True, seed=s)
              for n, s in [(5, None), (30, 3), (11, None), (17, 99)]]
    batch = llm.generate(["Hello", PROMPT, "Once upon a time", "a b c d e f", PROMPT], others[:1] + [seeded] + others[1:])
    assert alone == again == batch[1].outputs[0].token_ids
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, seed=8, max_tokens=20, ignore_eos=True)
    assert llm.generate(PROMPT, other_seed)[0].outputs[0].token_ids != alone


def test_n_gives_several_completions(llm):
    out = llm.generate(PROMPT, SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=10, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_logprobs_carry_chosen_token_and_top_n(llm):
    out = greedy(llm, max_tokens=5, logprobs=3)
    assert len(out.logprobs) == 5
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and entry[token].rank == 1  # greedy picks the top token
        assert len(entry) == 3
        assert sorted(lp.rank for lp in entry.values()) == [1, 2, 3]
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_abort_frees_blocks_and_stops_output(llm):
    engine = llm.engine
    engine.add_request("to-abort", PROMPT, SamplingParams(max_tokens=100, ignore_eos=True))
    engine.add_request("keeps-going", PROMPT, SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()
    assert engine.stats().kv_blocks_used > 0
    engine.abort_request("to-abort")
    engine.abort_request("unknown-id")  # ignored
    seen = set()
    while engine.has_unfinished_requests():
        seen |= {o.request_id for o in engine.step()}
    assert seen == {"keeps-going"}
    assert engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize("prompt,params,match", [
    ("", SamplingParams(), "prompt is empty"),
    ([], SamplingParams(), "prompt is empty"),
    ([1, 2, 10**9], SamplingParams(), "token ids"),
    (123, SamplingParams(), "string or a list"),
    ("hi", SamplingParams(max_tokens=10_000), "maximum context length of 256"),
    ("hi", SamplingParams(n=2), "one sequence per request"),
    ([1] * 300, SamplingParams(max_tokens=1), "300 tokens"),
])
def test_bad_requests_are_rejected_before_queueing(llm, prompt, params, match):
    with pytest.raises(InvalidRequestError, match=match):
        llm.engine.add_request("bad", prompt, params)
    assert not llm.engine.has_unfinished_requests() and "bad" not in llm.engine.requests


def test_duplicate_request_id_is_rejected(llm):
    llm.engine.add_request("dup", PROMPT, SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match="already in use"):
        llm.engine.add_request("dup", PROMPT, SamplingParams(max_tokens=2))
    llm.engine.abort_request("dup")


def test_a_failing_request_ends_with_error_and_the_others_go_on(llm):
    engine = llm.engine
    engine.add_request("broken", PROMPT, SamplingParams(max_tokens=10, ignore_eos=True))
    engine.add_request("healthy", PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))

    def explode(token_id):
        raise UnicodeDecodeError("utf-8", b"", 0, 1, "simulated detokenizer failure")

    engine.requests["broken"].detokenizer.add_token = explode
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out.outputs[0]
    assert finals["broken"].finish_reason == "error" and "simulated" in finals["broken"].stop_reason
    assert finals["healthy"].finish_reason == "length" and len(finals["healthy"].token_ids) == 4
    assert engine.stats().kv_blocks_used == 0


def test_final_only_steps_return_just_finished_requests_with_the_streamed_result(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    engine.add_request("streamed", PROMPT, params)
    streamed = [o for _ in iter(engine.has_unfinished_requests, False) for o in engine.step()]
    engine.add_request("final", PROMPT, params)
    finals = [o for _ in iter(engine.has_unfinished_requests, False) for o in engine.step(final_only=True)]
    assert len(streamed) == 5 and [o.finished for o in finals] == [True]
    assert finals[0].outputs[0].token_ids == streamed[-1].outputs[0].token_ids
    assert finals[0].outputs[0].text == streamed[-1].outputs[0].text


# ---- issue 8, defect 1: token ids are validated; a step failure fails its culprit alone -------------------

SMALL_VOCAB = 1000


@pytest.fixture(scope="module")
def small_vocab_llm(make_tiny_model):
    """A model whose vocabulary is smaller than its tokenizer's and whose EOS id lies outside it."""
    path = make_tiny_model("llama3", vocab_size=SMALL_VOCAB, eos_token_id=5000)
    return LLM(path, dtype="float32", device="cpu", max_model_len=256)


@pytest.mark.parametrize("prompt,params,param", [
    ([5, 6, 7], SamplingParams(stop_token_ids=[3, 49152], min_tokens=2), "stop_token_ids"),
    ([5, 6, 7], SamplingParams(stop_token_ids=[10**12]), "stop_token_ids"),
    ([5, 6, 49152], SamplingParams(), "prompt"),
    ([5, True, 7], SamplingParams(), "prompt"),  # not integers, whatever their value
    ([5, 6.0, 7], SamplingParams(), "prompt"),
    ([-1, 6, 7], SamplingParams(), "prompt"),
])
def test_token_ids_outside_the_vocabulary_are_rejected_at_admission(llm, prompt, params, param):
    with pytest.raises(InvalidRequestError, match="49152") as err:
        llm.engine.add_request("bad-ids", prompt, params)
    assert err.value.param == param
    assert "bad-ids" not in llm.engine.requests and not llm.engine.has_unfinished_requests()


def test_text_prompt_tokens_outside_the_model_vocabulary_are_rejected(small_vocab_llm):
    with pytest.raises(InvalidRequestError, match=f"vocabulary of {SMALL_VOCAB}") as err:
        small_vocab_llm.engine.add_request("big-ids", "The quick brown fox", SamplingParams())
    assert err.value.param == "prompt"


def test_eos_ids_outside_the_vocabulary_do_not_break_min_tokens(small_vocab_llm):
    out = small_vocab_llm.generate([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=6, min_tokens=3))[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 6


def _run_all(engine):
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out.outputs[0]
    return finals


def test_a_step_that_raises_fails_only_the_request_that_caused_it(llm):
    engine = llm.engine
    innocent = {
        "greedy": ("Once upon a time", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)),
        "seeded": (PROMPT, SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=8, ignore_eos=True)),
        "penalized": ("a b c d", SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=8,
                                                min_tokens=2, ignore_eos=True)),
    }
    alone = {}
    for rid, (prompt, params) in innocent.items():
        engine.add_request(rid, prompt, params)
        alone[rid] = _run_all(engine)[rid].token_ids

    engine.add_request("greedy", *innocent["greedy"])
    engine.add_request("culprit", PROMPT, SamplingParams(temperature=0.0, max_tokens=8, min_tokens=4))
    engine.add_request("seeded", *innocent["seeded"])
    engine.add_request("penalized", *innocent["penalized"])
    # Slip an out-of-vocabulary id past admission: the sampler's ban raises IndexError for this row.
    engine.requests["culprit"].banned_while_short = (engine.model_config.vocab_size + 7,)
    finals = _run_all(engine)

    assert finals["culprit"].finish_reason == "error" and "IndexError" in finals["culprit"].stop_reason
    for rid in innocent:
        assert finals[rid].finish_reason == "length" and finals[rid].token_ids == alone[rid], rid
    assert engine.stats().kv_blocks_used == 0 and not engine.requests


# ---- issue 8, defect 12: stop strings wait for min_tokens; a token budget below max_num_seqs starves no one --

def test_stop_string_does_not_end_the_output_before_min_tokens(llm):
    full = greedy(llm)
    stop = full.text[8:12]
    stopped = greedy(llm, stop=[stop])
    assert stopped.finish_reason == "stop"
    min_tokens = len(stopped.token_ids) + 2  # the stop string completed within these tokens
    out = greedy(llm, stop=[stop], min_tokens=min_tokens)
    assert len(out.token_ids) > min_tokens
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    assert out.text.startswith(full.text[: full.text.find(stop) + len(stop)])


def test_token_budget_below_max_num_seqs_keeps_every_running_sequence_going(make_tiny_model, monkeypatch):
    """max_num_batched_tokens=4 < max_num_seqs=16 is accepted (the chosen behaviour): admission only uses
    the budget that running sequences left, so every running sequence gets a token in every step, and the
    results equal an unconstrained engine's."""
    path = make_tiny_model("llama3")
    prompts = ["Hello", "Once upon a time there was", "a b c d e f g", "The quick brown fox", "1 2 3", "Why"]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    engine = LLM(path, dtype="float32", device="cpu", max_model_len=64, max_num_batched_tokens=4,
                 max_num_seqs=16).engine
    scheduled = []
    real_schedule = engine.scheduler.schedule

    def recording_schedule():
        out = real_schedule()
        scheduled.append({item.seq.seq_id for item in out.scheduled})
        return out

    monkeypatch.setattr(engine.scheduler, "schedule", recording_schedule)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    finals = {}
    while engine.has_unfinished_requests():
        running = {s.seq_id for s in engine.scheduler.running}
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out.outputs[0].token_ids
        assert running <= scheduled[-1], "a running sequence got no token this step"
        assert engine.stats().last_step_num_tokens <= 4
    reference = LLM(path, dtype="float32", device="cpu", max_model_len=64).generate(prompts, params)
    assert [finals[str(i)] for i in range(len(prompts))] == [o.outputs[0].token_ids for o in reference]


def test_fp8_kv_cache_holds_more_tokens_and_follows_float32(make_tiny_model):
    """kv_cache_dtype="fp8" on the CPU reference path: K/V stored as float8_e4m3fn, so the same memory budget
    holds four times float32's blocks, and greedy tokens start as the float32 cache's do."""
    path = make_tiny_model("llama3")
    options = dict(dtype="float32", device="cpu", max_model_len=256, kv_cache_memory_gb=0.01)
    exact, fp8 = LLM(path, **options), LLM(path, kv_cache_dtype="fp8", **options)
    assert fp8.engine.runner.kv_caches[0].dtype == torch.float8_e4m3fn
    assert abs(fp8.engine.runner.num_blocks - 4 * exact.engine.runner.num_blocks) < 4  # 1 byte against 4
    prompts = [[1, 2, 3, 4, 5], list(range(100, 160)), [7] * 30]
    params = SamplingParams(temperature=0.0, max_tokens=4)
    first = [[o.outputs[0].token_ids[0] for o in llm.generate(prompts, params)] for llm in (exact, fp8)]
    assert sum(a == b for a, b in zip(*first)) >= 2
