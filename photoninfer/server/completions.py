"""POST /v1/completions: raw prompts (text or token ids, one or a batch) -> engine -> JSON or SSE.

`echo` with `logprobs` scores the prompt too (OpenAI's legacy format, as evaluation harnesses use it): the
logprobs object starts with the prompt's tokens, the first with a null logprob; `max_tokens: 0` scores the
prompt alone.
"""

from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from photoninfer.engine.async_engine import RequestStream
from photoninfer.outputs import CompletionOutput, RequestOutput
from photoninfer.server.errors import APIError
from photoninfer.server.protocol import CompletionRequest
from photoninfer.server.serving import ServingContext, completion_logprobs, usage


async def create_completion(ctx: ServingContext, body: CompletionRequest, request: Request) -> Response:
    ctx.check_model(body.model)
    _reject_unsupported(body)
    prompts = _prompts(body.prompt, ctx.vocab_size)
    scores_prompt = body.echo and body.logprobs is not None
    params = body.sampling_params(body.max_tokens, body.logprobs, ctx.vocab_size,
                                  prompt_logprobs=body.logprobs if scores_prompt else None)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    stream = await ctx.submit(request_id, prompts, params, body.n)
    echoes = [_prompt_text(ctx.tokenizer, p) for p in prompts] if body.echo else [""] * len(prompts)
    if body.stream:
        events = _events(ctx, stream, body, echoes)
        return ctx.streaming_response(stream, events)
    finals = await ctx.collect(stream, request)
    return JSONResponse(_response(ctx, request_id, body, finals, echoes))


def _reject_unsupported(body: CompletionRequest) -> None:
    if body.suffix:
        raise APIError(400, "suffix is not supported by this server", "suffix")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", "logit_bias")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, f"best_of must equal n ({body.n}) on this server, got {body.best_of}", "best_of")


def _prompts(prompt, vocab_size: int) -> list:
    """Normalizes the four OpenAI prompt shapes to a list of prompts (str or token id list)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    for i, item in enumerate(prompt):
        if len(item) == 0:
            raise APIError(400, f"prompt[{i}] must not be empty", "prompt")
        if isinstance(item, list) and max(item) >= vocab_size:
            raise APIError(400, f"prompt[{i}] holds token id {max(item)}, but the vocabulary has {vocab_size} "
                                f"tokens (ids 0..{vocab_size - 1})", "prompt")
    return list(prompt)


def _prompt_text(tokenizer, prompt) -> str:
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt)


def _response(ctx: ServingContext, request_id: str, body: CompletionRequest, finals: dict, echoes: list) -> dict:
    choices, generated, prompt_ids = [], 0, {}
    for index in sorted(finals):
        output = finals[index]
        completion = output.outputs[0]
        echo = echoes[index // body.n]
        prompt_ids[index // body.n] = output.prompt_token_ids
        generated += len(completion.token_ids)
        logprobs = None
        if body.logprobs is not None and body.echo:
            prompt_part = _echo_logprobs(ctx.tokenizer, output, body.logprobs)
            logprobs = _joined(prompt_part, completion_logprobs(ctx.tokenizer, completion, 0, body.logprobs,
                                                                _end_offset(prompt_part)))
        elif body.logprobs is not None:
            logprobs = completion_logprobs(ctx.tokenizer, completion, 0, body.logprobs, len(echo))
        choices.append({"index": index, "text": echo + completion.text, "logprobs": logprobs,
                        "finish_reason": completion.finish_reason})
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": ctx.model_name,
            "choices": choices, "usage": usage(prompt_ids, generated)}


async def _events(ctx: ServingContext, stream: RequestStream, body: CompletionRequest, echoes: list):
    """text_completion chunks: the echoed prompt first (if asked), then text deltas, then usage."""
    created = int(time.time())
    num_choices = len(echoes) * body.n

    def chunk(choices: list, **extra) -> dict:
        return {"id": stream.request_id, "object": "text_completion", "created": created,
                "model": ctx.model_name, "choices": choices, **extra}

    scores_prompt = body.echo and body.logprobs is not None
    if body.echo and not scores_prompt:
        yield chunk([{"index": i, "text": echoes[i // body.n], "logprobs": None, "finish_reason": None}
                     for i in range(num_choices)])
    text_start = [len(echoes[i // body.n]) for i in range(num_choices)]  # where each choice's new text starts
    sent_chars = [0] * num_choices
    sent_tokens = [0] * num_choices
    prompt_ids = {}
    echoed: set[int] = set()
    async for index, output in stream:
        completion = output.outputs[0]
        if scores_prompt and index not in echoed:  # the first output of a choice carries the prompt's logprobs
            echoed.add(index)
            prompt_part = _echo_logprobs(ctx.tokenizer, output, body.logprobs)
            text_start[index] = _end_offset(prompt_part)
            yield chunk([{"index": index, "text": echoes[index // body.n], "logprobs": prompt_part,
                          "finish_reason": None}])
        prompt_ids[index // body.n] = output.prompt_token_ids
        delta = completion.text[sent_chars[index]:]
        logprobs = None
        if body.logprobs is not None and len(completion.token_ids) > sent_tokens[index]:
            offset = text_start[index] + sent_chars[index]
            logprobs = completion_logprobs(ctx.tokenizer, completion, sent_tokens[index], body.logprobs, offset)
        sent_chars[index], sent_tokens[index] = len(completion.text), len(completion.token_ids)
        if delta or logprobs or completion.finish_reason:
            yield chunk([{"index": index, "text": delta, "logprobs": logprobs,
                          "finish_reason": completion.finish_reason}])
    if body.stream_options and body.stream_options.include_usage:
        yield chunk([], usage=usage(prompt_ids, sum(sent_tokens)))


def _echo_logprobs(tokenizer, output: RequestOutput, top_n: int) -> dict:
    """The prompt's part of the legacy `logprobs` object: nothing precedes the first token, so its logprob
    and top_logprobs are null. Text offsets count the tokens' own texts from 0."""
    ids, entries = output.prompt_token_ids, output.prompt_logprobs
    first = tokenizer.decode(ids[:1], skip_special_tokens=False)
    rest = completion_logprobs(tokenizer, CompletionOutput(0, "", ids[1:], logprobs=entries[1:]), 0, top_n, len(first))
    return {"tokens": [first] + rest["tokens"], "token_logprobs": [None] + rest["token_logprobs"],
            "top_logprobs": [None] + rest["top_logprobs"], "text_offset": [0] + rest["text_offset"]}


def _end_offset(part: dict) -> int:
    return part["text_offset"][-1] + len(part["tokens"][-1])


def _joined(first: dict, second: dict) -> dict:
    return {key: first[key] + second[key] for key in first}
