"""Malformed and hostile requests: each gets the exact 4xx and an OpenAI error body, never a 5xx."""

from __future__ import annotations

import json

import httpx
import pytest
from server_harness import API_KEY, wait_until_idle

pytestmark = pytest.mark.timeout(120)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
JSON = {"Content-Type": "application/json"}
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MESSAGES = [{"role": "user", "content": "hi"}]
MAX_MODEL_LEN = 512  # as started in server_harness.MAIN_SERVER_ARGS


def chat(**fields):
    return {"messages": MESSAGES, "max_tokens": 4, **fields}


def completion(**fields):
    return {"prompt": "hi", "max_tokens": 4, **fields}


# (id, path, body: dict | raw bytes | str, extra headers, expected status, expected param or None, text in message)
CASES = [
    ("invalid-json", CHAT, b'{"messages": [', {}, 400, None, "not valid JSON"),
    ("json-array-body", CHAT, b"[1, 2, 3]", {}, 400, None, "JSON object"),
    ("json-string-body", CHAT, b'"hello"', {}, 400, None, "JSON object"),
    ("empty-body", CHAT, b"", {}, 400, None, "body"),
    ("nan-literal", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', {}, 400,
     "temperature", ""),
    ("deeply-nested-json", CHAT, b"[" * 100_000 + b"]" * 100_000, {}, 400, None, ""),
    ("text-plain-content-type", CHAT, json.dumps(chat()).encode(), {"Content-Type": "text/plain"}, 400, None,
     "Content-Type"),
    ("missing-messages", CHAT, {"max_tokens": 4}, {}, 400, "messages", "messages"),
    ("messages-not-list", CHAT, {"messages": "hi"}, {}, 400, "messages", ""),
    ("empty-messages", CHAT, {"messages": []}, {}, 400, "messages", "at least 1"),
    ("unknown-role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, {}, 400, "messages[0].role", "role"),
    ("non-string-content", CHAT, {"messages": [{"role": "user", "content": 123}]}, {}, 400, "messages[0].content", ""),
    ("image-content-part", CHAT,
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}, {}, 400,
     "messages[0].content[0].type", "'text'"),
    ("message-missing-content", CHAT, {"messages": [{"role": "user"}]}, {}, 400, "messages[0].content", ""),
    ("negative-max-tokens", CHAT, chat(max_tokens=-1), {}, 400, "max_tokens", ""),
    ("zero-max-tokens", CHAT, chat(max_tokens=0), {}, 400, "max_tokens", ""),
    ("string-max-tokens", CHAT, chat(max_tokens="10"), {}, 400, "max_tokens", ""),
    ("float-max-tokens", CHAT, chat(max_tokens=10.5), {}, 400, "max_tokens", ""),
    ("temperature-5", CHAT, chat(temperature=5), {}, 400, "temperature", ""),
    ("negative-temperature", CHAT, chat(temperature=-0.5), {}, 400, "temperature", ""),
    ("top-p-zero", CHAT, chat(top_p=0), {}, 400, "top_p", ""),
    ("top-p-above-one", CHAT, chat(top_p=1.5), {}, 400, "top_p", ""),
    ("top-k-negative", CHAT, chat(top_k=-5), {}, 400, "top_k", ""),
    ("min-p-above-one", CHAT, chat(min_p=2), {}, 400, "min_p", ""),
    ("presence-penalty-3", CHAT, chat(presence_penalty=3), {}, 400, "presence_penalty", ""),
    ("frequency-penalty-string", CHAT, chat(frequency_penalty="high"), {}, 400, "frequency_penalty", ""),
    ("repetition-penalty-zero", CHAT, chat(repetition_penalty=0), {}, 400, "repetition_penalty", ""),
    ("n-zero", CHAT, chat(n=0), {}, 400, "n", ""),
    ("n-too-large", CHAT, chat(n=1000), {}, 400, "n", ""),
    ("stop-list-too-long", CHAT, chat(stop=[f"s{i}" for i in range(17)]), {}, 400, "stop", ""),
    ("stop-empty-string", CHAT, chat(stop=""), {}, 400, "stop", ""),
    ("stop-not-strings", CHAT, chat(stop=[1, 2]), {}, 400, "stop[0]", "valid string"),
    ("seed-string", CHAT, chat(seed="42"), {}, 400, "seed", ""),
    ("seed-beyond-int64", CHAT, chat(seed=2**70), {}, 400, "seed", ""),
    ("top-logprobs-too-many", CHAT, chat(logprobs=True, top_logprobs=50), {}, 400, "top_logprobs", ""),
    ("top-logprobs-without-logprobs", CHAT, chat(top_logprobs=2), {}, 400, "top_logprobs", "logprobs"),
    ("stream-not-bool", CHAT, chat(stream="yes"), {}, 400, "stream", ""),
    ("stream-options-wrong-type", CHAT, chat(stream=True, stream_options="usage"), {}, 400, "stream_options", ""),
    ("min-tokens-above-max", CHAT, chat(min_tokens=10), {}, 400, "min_tokens", "max_tokens"),
    ("tools-unsupported", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), {}, 400, "tools",
     "not supported"),
    ("json-response-format", CHAT, chat(response_format={"type": "json_object"}), {}, 400, "response_format", ""),
    ("unknown-model", CHAT, chat(model="gpt-9"), {}, 404, "model", "gpt-9"),
    ("prompt-over-max-model-len", CHAT, {"messages": [{"role": "user", "content": "hello " * 2000}]}, {}, 400,
     "prompt", str(MAX_MODEL_LEN)),
    ("prompt-plus-max-tokens-over", CHAT, chat(max_tokens=MAX_MODEL_LEN), {}, 400, "max_tokens", str(MAX_MODEL_LEN)),
    ("huge-max-tokens", CHAT, chat(max_tokens=10**12), {}, 400, "max_tokens", str(MAX_MODEL_LEN)),
    ("completion-empty-prompt", COMPLETIONS, completion(prompt=""), {}, 400, "prompt", "empty"),
    ("completion-empty-prompt-list", COMPLETIONS, completion(prompt=[]), {}, 400, "prompt", "empty"),
    ("completion-token-id-out-of-vocab", COMPLETIONS, completion(prompt=[1, 2, 10**9]), {}, 400, "prompt",
     "vocabulary"),
    ("completion-negative-token-id", COMPLETIONS, completion(prompt=[1, -2]), {}, 400, "prompt[1]", "greater than"),
    ("completion-mixed-prompt-list", COMPLETIONS, completion(prompt=["a", 1]), {}, 400, "prompt[1]", ""),
    ("completion-missing-prompt", COMPLETIONS, {"max_tokens": 4}, {}, 400, "prompt", ""),
    ("completion-logprobs-too-many", COMPLETIONS, completion(logprobs=21), {}, 400, "logprobs", ""),
    ("completion-logprobs-negative", COMPLETIONS, completion(logprobs=-1), {}, 400, "logprobs", ""),
    ("completion-negative-max-tokens", COMPLETIONS, completion(max_tokens=-1), {}, 400, "max_tokens", ""),
    ("completion-suffix", COMPLETIONS, completion(suffix="end"), {}, 400, "suffix", ""),
    ("completion-best-of", COMPLETIONS, completion(best_of=3), {}, 400, "best_of", ""),
    ("completion-over-max-model-len", COMPLETIONS, completion(prompt="hello " * 2000), {}, 400, "prompt",
     str(MAX_MODEL_LEN)),
    # JSON may escape a lone surrogate; no tokenizer can encode it, and the error names the field
    ("completion-lone-surrogate", COMPLETIONS, b'{"prompt": "\\ud800", "max_tokens": 4}', {}, 400, "prompt",
     "UTF-8"),
    ("completion-lone-surrogate-in-batch", COMPLETIONS, b'{"prompt": ["fine", "a\\udc00b"], "max_tokens": 4}', {},
     400, "prompt", "prompt[1]"),
    ("chat-lone-surrogate", CHAT, b'{"messages": [{"role": "user", "content": "hi \\ud83d"}]}', {}, 400,
     "messages[0].content", "UTF-8"),
    ("chat-lone-surrogate-in-part", CHAT,
     b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}', {}, 400,
     "messages[0].content[0].text", "UTF-8"),
    ("stop-lone-surrogate", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\udfff"]}', {},
     400, "stop[0]", "unicode"),
    ("logit-bias-key-lone-surrogate", COMPLETIONS, b'{"prompt": "hi", "logit_bias": {"\\ud800": 1}}', {}, 400,
     "logit_bias", "UTF-8"),
    ("user-lone-surrogate", COMPLETIONS, b'{"prompt": "hi", "user": "\\ud800"}', {}, 400, "user", "UTF-8"),
    ("no-api-key", CHAT, chat(), {"Authorization": ""}, 401, None, "API key"),
    ("wrong-api-key", CHAT, chat(), {"Authorization": "Bearer nope"}, 401, None, "API key"),
    ("basic-auth-scheme", CHAT, chat(), {"Authorization": f"Basic {API_KEY}"}, 401, None, "API key"),
    ("no-api-key-on-models", "/v1/models", None, {"Authorization": ""}, 401, None, "API key"),
    ("no-api-key-and-bad-json", CHAT, b"{", {"Authorization": ""}, 401, None, "API key"),
    ("unknown-route", "/v1/nothing-here", chat(), {}, 404, None, "/v1/nothing-here"),
]


def _send(http: httpx.Client, path, body, headers):
    headers = {**AUTH, **JSON, **headers}
    headers = {k: v for k, v in headers.items() if v}  # an empty value means: leave this header out
    if body is None:
        return http.get(path, headers=headers)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(path, content=content, headers=headers)


def _assert_openai_error(response: httpx.Response, status: int, param, text: str):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if param is not None:
        assert error["param"] == param, error
    assert text.lower() in error["message"].lower(), error


@pytest.fixture(scope="module")
def raw_http(server):
    """A client without default auth, so each case decides its own headers."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.mark.parametrize("path,body,headers,status,param,text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_gets_openai_error(raw_http, path, body, headers, status, param, text):
    _assert_openai_error(_send(raw_http, path, body, headers), status, param, text)


def test_get_on_post_route_is_405_with_openai_body(raw_http):
    _assert_openai_error(raw_http.get(CHAT, headers=AUTH), 405, None, "")


def test_body_over_limit_by_content_length_is_413(raw_http):
    big = json.dumps(chat(user="x" * (5 * 1024 * 1024))).encode()
    try:
        response = raw_http.post(CHAT, content=big, headers={**AUTH, **JSON})
    except httpx.TransportError:  # the server may close before the client finished sending; that is fine too
        pytest.skip("connection closed before the 413 could be read")
    _assert_openai_error(response, 413, None, "too large")


def test_body_over_limit_when_streamed_without_length_is_413(raw_http):
    def chunks():  # chunked transfer encoding: no Content-Length, the server must count
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(80):
            yield b"x" * 65536
        yield b'"}]}'

    try:
        response = raw_http.post(CHAT, content=chunks(), headers={**AUTH, **JSON})
    except httpx.TransportError:
        pytest.skip("connection closed before the 413 could be read")
    _assert_openai_error(response, 413, None, "too large")


def test_lone_surrogate_in_chat_does_not_blame_the_template(raw_http):
    body = b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 4}'
    response = raw_http.post(CHAT, content=body, headers={**AUTH, **JSON})
    _assert_openai_error(response, 400, "messages[0].content", "surrogate")
    assert "template" not in response.json()["error"]["message"]


@pytest.mark.parametrize("path,body", [
    (COMPLETIONS, b'{"prompt": "smile \\ud83d\\ude00", "max_tokens": 2}'),
    (CHAT, b'{"messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}], "max_tokens": 2}'),
], ids=["completions", "chat"])
def test_surrogate_pair_is_a_character_not_an_error(raw_http, path, body):
    response = raw_http.post(path, content=body, headers={**AUTH, **JSON})
    assert response.status_code == 200, response.text


def test_rejections_are_counted_and_engine_stays_clean(server, http):
    text = http.get("/metrics").text
    assert 'photoninfer_requests_total{outcome="rejected"}' in text
    assert wait_until_idle(server.url)["kv_blocks_used"] == 0
    assert http.get("/health").json() == {"status": "ok"}
