"""The server through the official `openai` client (sync and async): chat and text completions, streamed
and not, usage, stop strings, seeds, n, logprobs, and greedy text equal to the offline `LLM` API."""

from __future__ import annotations

import asyncio

import openai
import pytest

from photoninfer import LLM, SamplingParams

from server_harness import API_KEY, metric_samples, wait_until_idle

pytestmark = pytest.mark.timeout(300)

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def offline():
    """The offline API on the same default model: the reference for greedy text."""
    return LLM(max_model_len=512, kv_cache_memory_gb=0.1)


def test_models_list(client, model):
    models = client.models.list().data
    assert [m.id for m in models] == [model]
    assert "SmolLM2" in model


def test_chat_greedy_matches_offline_llm(client, model, offline):
    reply = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=20)
    expected = offline.chat(QUESTION, SamplingParams(temperature=0, max_tokens=20))[0]
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert reply.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_completion_greedy_matches_offline_llm(client, model, offline):
    reply = client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=12)
    expected = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12))[0]
    assert reply.choices[0].text == expected.outputs[0].text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12


def test_chat_stream_with_usage_equals_non_stream(client, model):
    whole = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=16)
    chunks = list(client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_completion_stream_and_echo(client, model):
    whole = client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=10)
    chunks = list(client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=10, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    echoed = client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=10, echo=True)
    assert echoed.choices[0].text == PROMPT + whole.choices[0].text


def test_completion_batch_of_prompts_and_token_ids(client, model, offline):
    token_ids = offline.get_tokenizer().encode(PROMPT)
    reply = client.completions.create(model=model, prompt=[PROMPT, "Once upon a time"], temperature=0, max_tokens=6)
    by_ids = client.completions.create(model=model, prompt=token_ids, temperature=0, max_tokens=6)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].text == by_ids.choices[0].text
    assert reply.usage.prompt_tokens == len(token_ids) + len(offline.get_tokenizer().encode("Once upon a time"))


def test_stop_string_ends_text_before_it(client, model):
    free = client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=16).choices[0].text
    words = free.split()
    assert len(words) >= 3, free
    stop = " " + words[2]
    stopped = client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=16, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == free[: free.index(stop)]


def test_seed_reproducible_and_n_choices_differ(client, model):
    def ask(seed):
        return client.chat.completions.create(model=model, messages=QUESTION, temperature=1.0, max_tokens=12,
                                              seed=seed, n=3)

    first, again, other = ask(1234), ask(1234), ask(99)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1, "choices of one request should be sampled independently"
    assert texts != [c.message.content for c in other.choices]
    assert 3 <= first.usage.completion_tokens <= 3 * 12  # usage counts every choice's tokens


def test_chat_logprobs(client, model):
    reply = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=5,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 5
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely token
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    assert "".join(e.token for e in content) == reply.choices[0].message.content


def test_completion_logprobs_streamed(client, model):
    chunks = list(client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=4, logprobs=2,
                                            stream=True))
    tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    tops = [t for c in chunks for t in c.choices[0].logprobs.top_logprobs]
    assert len(tokens) == 4 and all(len(t) == 2 for t in tops)


def test_max_completion_tokens_and_length_finish(client, model):
    reply = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_completion_tokens=3)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3


def test_async_client_concurrent_mixed_requests(server, model):
    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        chat = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=8)
        text = client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=8)

        async def streamed():
            stream = await client.chat.completions.create(model=model, messages=QUESTION, temperature=0,
                                                          max_tokens=8, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        results = await asyncio.gather(chat, text, streamed())
        await client.close()
        return results

    chat, text, streamed = asyncio.run(main())
    assert chat.choices[0].message.content == streamed
    assert text.usage.completion_tokens == 8
    wait_until_idle(server.url)


def test_page_docs_health_metrics_and_engine_panel(server, http):
    page = http.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert http.get("/static/app.js").status_code == 200
    assert "swagger" in http.get("/docs").text.lower()
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/api/engine", "/metrics"} <= set(paths)
    assert http.get("/health").json() == {"status": "ok"}
    status = http.get("/api/engine").json()
    assert set(status) == {"running", "waiting", "kv_blocks_used", "kv_blocks_total", "generation_tokens_per_s",
                           "model"}
    assert status["kv_blocks_total"] > 0 and "SmolLM2" in status["model"]
    metrics = http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("photoninfer_requests_total", "photoninfer_time_to_first_token_seconds_bucket",
                 "photoninfer_time_per_output_token_seconds_bucket", "photoninfer_e2e_request_latency_seconds_bucket",
                 "photoninfer_num_requests_running", "photoninfer_num_requests_waiting", "photoninfer_kv_blocks_used",
                 "photoninfer_kv_blocks_total", "photoninfer_prompt_tokens_total",
                 "photoninfer_generation_tokens_total", "photoninfer_step_num_seqs_bucket"):
        assert name in metrics.text, name


def test_repeated_conversation_prefix_comes_from_the_prefix_cache(client, model, http):
    def hits():
        return metric_samples(http.get("/metrics").text, "photoninfer_prefix_cache_hit_tokens")[
            "photoninfer_prefix_cache_hit_tokens_total"]

    history = [{"role": "system", "content": "You are a patient teacher who explains things step by step. " * 3},
               {"role": "user", "content": "What is a prime number?"}]
    first = client.chat.completions.create(model=model, messages=history, max_tokens=8, temperature=0)
    before = hits()
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "Give an example."}]
    client.chat.completions.create(model=model, messages=history, max_tokens=8, temperature=0)
    # the second turn's prompt starts with the whole first prompt (about 70 tokens): its full blocks are reused
    assert hits() - before >= 48
