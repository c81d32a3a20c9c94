"""POST /v1/chat/completions: messages -> chat template -> engine -> one JSON answer or an SSE stream."""

from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from photoninfer.engine.async_engine import RequestStream
from photoninfer.errors import InvalidRequestError
from photoninfer.server.errors import APIError
from photoninfer.server.protocol import ChatCompletionRequest
from photoninfer.server.serving import ServingContext, chat_logprobs, usage


async def create_chat_completion(ctx: ServingContext, body: ChatCompletionRequest, request: Request) -> Response:
    ctx.check_model(body.model)
    _reject_unsupported(body)
    prompt = chat_prompt(ctx.tokenizer, body)
    top_n = _top_logprobs(body)
    params = body.sampling_params(body.max_completion_tokens or body.max_tokens, top_n, ctx.vocab_size)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    stream = await ctx.submit(request_id, [prompt], params, body.n)
    if body.stream:
        events = _events(ctx, stream, body, top_n)
        return ctx.streaming_response(stream, events)
    finals = await ctx.collect(stream, request)
    return JSONResponse(_response(ctx, request_id, body, finals, top_n))


def chat_prompt(tokenizer, body: ChatCompletionRequest) -> list[int]:
    """Token ids of the conversation rendered with the model's chat template, ready for the assistant's turn."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    try:
        return tokenizer.encode_chat(messages, add_generation_prompt=True)
    except Exception as exc:  # templates raise on conversations they do not support (e.g. role order)
        raise InvalidRequestError(f"the model's chat template rejected these messages: {exc}", "messages") from exc


def _reject_unsupported(body: ChatCompletionRequest) -> None:
    for field in ("tools", "functions", "function_call", "logit_bias"):
        if getattr(body, field):
            raise APIError(400, f"{field} is not supported by this server", field)
    if body.tool_choice not in (None, "none"):
        raise APIError(400, "tool_choice is not supported by this server", "tool_choice")
    if body.response_format not in (None, {"type": "text"}):
        raise APIError(400, "only response_format {\"type\": \"text\"} is supported", "response_format")


def _top_logprobs(body: ChatCompletionRequest):
    """Engine `logprobs` count: None when not asked for, else how many alternatives to return."""
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


def _response(ctx: ServingContext, request_id: str, body: ChatCompletionRequest, finals: dict, top_n) -> dict:
    choices, generated, prompt_ids = [], 0, {}
    for index in sorted(finals):
        output = finals[index]
        completion = output.outputs[0]
        prompt_ids[0] = output.prompt_token_ids
        generated += len(completion.token_ids)
        choices.append({
            "index": index,
            "message": {"role": "assistant", "content": completion.text},
            "logprobs": None if top_n is None else chat_logprobs(ctx.tokenizer, completion, 0, top_n),
            "finish_reason": completion.finish_reason,
        })
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": ctx.model_name,
            "choices": choices, "usage": usage(prompt_ids, generated)}


async def _events(ctx: ServingContext, stream: RequestStream, body: ChatCompletionRequest, top_n):
    """chat.completion.chunk events: a role chunk per choice, content deltas, a finish chunk, then usage."""
    created = int(time.time())

    def chunk(choices: list, **extra) -> dict:
        return {"id": stream.request_id, "object": "chat.completion.chunk", "created": created,
                "model": ctx.model_name, "choices": choices, **extra}

    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                 for i in range(body.n)])
    sent_chars = [0] * body.n
    sent_tokens = [0] * body.n
    prompt_ids = {}
    async for index, output in stream:
        completion = output.outputs[0]
        prompt_ids[0] = output.prompt_token_ids
        delta = completion.text[sent_chars[index]:]
        logprobs = None
        if top_n is not None and len(completion.token_ids) > sent_tokens[index]:
            logprobs = chat_logprobs(ctx.tokenizer, completion, sent_tokens[index], top_n)
        sent_chars[index], sent_tokens[index] = len(completion.text), len(completion.token_ids)
        if delta or logprobs or completion.finish_reason:
            yield chunk([{"index": index, "delta": {"content": delta} if delta else {}, "logprobs": logprobs,
                          "finish_reason": completion.finish_reason}])
    if body.stream_options and body.stream_options.include_usage:
        yield chunk([], usage=usage(prompt_ids, sum(sent_tokens)))
