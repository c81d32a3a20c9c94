"""Plumbing shared by the chat and text completion routes: model check, fan-out of n choices, submitting to
the async engine, collecting a whole answer, streaming SSE, usage and logprobs formatting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
from typing import Any, AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import StreamingResponse

from photoninfer.engine.async_engine import AsyncLLMEngine, EngineDeadError, Prompt, RequestFailedError, RequestStream
from photoninfer.outputs import CompletionOutput, RequestOutput
from photoninfer.sampling_params import SamplingParams
from photoninfer.server.errors import APIError, engine_failure, error_body
from photoninfer.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

_MIN_LOGPROB = -9999.0  # JSON has no -Infinity; clients get a very small number instead


class ClientDisconnected(Exception):
    """The client closed the connection before its (non-streamed) answer was ready."""


@dataclasses.dataclass
class ServingContext:
    engine: AsyncLLMEngine
    metrics: ServerMetrics
    model_name: str

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.engine.model_config.vocab_size

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")

    async def submit(self, request_id: str, prompts: list[Prompt], params: SamplingParams, n: int) -> RequestStream:
        """Fans each prompt out into n engine requests (choice index = prompt * n + i) and queues them.

        With a seed, choice i uses seed + i, so choices differ yet the whole answer is reproducible.
        """
        requests = []
        for prompt in prompts:
            for i in range(n):
                seeded = params if params.seed is None or i == 0 else dataclasses.replace(
                    params, seed=(params.seed + i) % 2**63)
                requests.append((prompt, seeded))
        return await self.engine.submit(request_id, requests)

    async def collect(self, stream: RequestStream, request: Request) -> dict[int, RequestOutput]:
        """Waits for every choice's final output; aborts the request if the client disconnects first."""
        finals: dict[int, RequestOutput] = {}

        async def consume():
            async for index, output in stream:
                finals[index] = output

        try:
            await _until_disconnect(request, consume())
        finally:
            stream.abort()
            self.metrics.observe_request(stream)
        return finals

    def streaming_response(self, stream: RequestStream, events: AsyncIterator[dict]) -> StreamingResponse:
        """An SSE response; proxies are told not to buffer it, so tokens reach the client as they come."""
        return _EngineStreamResponse(stream, self.metrics, sse(stream, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _EngineStreamResponse(StreamingResponse):
    """A StreamingResponse that aborts its engine request however the response ends: finished, failed,
    cancelled at shutdown, or with the client gone before the first byte, when the body generator never
    even started (so no `finally` inside it would run)."""

    def __init__(self, stream: RequestStream, metrics: ServerMetrics, content, **kwargs):
        super().__init__(content, **kwargs)
        self.stream = stream
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.abort()  # frees the KV blocks at once; a no-op if the request has finished
            self.metrics.observe_request(self.stream)


async def sse(stream: RequestStream, events: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Frames events as server-sent events, ends with [DONE]; an engine failure becomes an error event."""
    try:
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n"
    except (RequestFailedError, EngineDeadError) as exc:  # the request failed, or the server is stopping
        status, code = engine_failure(exc)
        yield f"data: {json.dumps(error_body(status, str(exc), code=code))}\n\n"
    except Exception as exc:  # a bug while formatting: tell the client rather than cut the stream
        logger.exception("error while streaming %s", stream.request_id)
        yield f"data: {json.dumps(error_body(500, f'internal server error: {exc}', code='internal_error'))}\n\n"
    yield "data: [DONE]\n\n"


async def _until_disconnect(request: Request, work) -> None:
    """Runs `work`, cancelling it if the client goes away. The request body has been read already, so
    the next ASGI message can only be the disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        task.result()  # re-raises the work's error, if any
        return
    raise ClientDisconnected()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def usage(prompt_token_ids: dict[int, list[int]], completion_tokens: int) -> dict:
    """OpenAI usage; `prompt_token_ids` maps prompt number -> its tokens (counted once, not once per choice)."""
    prompt_tokens = sum(len(ids) for ids in prompt_token_ids.values())
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) and logprob > _MIN_LOGPROB else _MIN_LOGPROB


def _token_text(tokenizer, token_id: int, entry) -> str:
    text = getattr(entry, "decoded_token", None)
    return text if text is not None else tokenizer.decode([token_id])


def _ranked(alternatives: dict, top_n: int) -> list[tuple[int, Any]]:
    return sorted(alternatives.items(), key=lambda item: item[1].rank)[:top_n]


def chat_logprobs(tokenizer, completion: CompletionOutput, start: int, top_n: int) -> dict:
    """The chat `logprobs` object for tokens [start:] of a choice."""
    content = []
    for token_id, alternatives in zip(completion.token_ids[start:], (completion.logprobs or [])[start:]):
        chosen = alternatives.get(token_id)
        token = _token_text(tokenizer, token_id, chosen)
        content.append({
            "token": token,
            "logprob": _finite(chosen.logprob) if chosen else _MIN_LOGPROB,
            "bytes": list(token.encode("utf-8")),
            "top_logprobs": [
                {"token": (t := _token_text(tokenizer, alt_id, alt)), "logprob": _finite(alt.logprob),
                 "bytes": list(t.encode("utf-8"))}
                for alt_id, alt in _ranked(alternatives, top_n)
            ],
        })
    return {"content": content}


def completion_logprobs(tokenizer, completion: CompletionOutput, start: int, top_n: int, text_offset: int) -> dict:
    """The legacy completions `logprobs` object for tokens [start:]; offsets count from `text_offset`."""
    result = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = text_offset
    for token_id, alternatives in zip(completion.token_ids[start:], (completion.logprobs or [])[start:]):
        chosen = alternatives.get(token_id)
        token = _token_text(tokenizer, token_id, chosen)
        result["tokens"].append(token)
        result["token_logprobs"].append(_finite(chosen.logprob) if chosen else _MIN_LOGPROB)
        result["top_logprobs"].append({_token_text(tokenizer, alt_id, alt): _finite(alt.logprob)
                                       for alt_id, alt in _ranked(alternatives, top_n)})
        result["text_offset"].append(offset)
        offset += len(token)
    return result
