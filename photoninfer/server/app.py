"""The FastAPI app: OpenAI-compatible routes, health, metrics, the chat page and its live engine panel.

`create_app(engine, settings)` wires one AsyncLLMEngine into the routes; the app's lifespan starts the
engine thread and stops it after uvicorn has drained the open requests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import time
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from photoninfer.engine.async_engine import AsyncLLMEngine
from photoninfer.server.chat_completions import create_chat_completion
from photoninfer.server.completions import create_completion
from photoninfer.server.errors import APIError, install_error_handlers
from photoninfer.server.guard import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, RequestGuard
from photoninfer.server.metrics import ServerMetrics
from photoninfer.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EngineStatus,
    ModelCard,
    ModelList,
)
from photoninfer.server.serving import ClientDisconnected, ServingContext

STATIC_DIR = pathlib.Path(__file__).parent / "static"

_STREAM_DOC = {200: {"description": "JSON answer, or with stream=true a text/event-stream of chunks ending in "
                                    "`data: [DONE]`.", "content": {"text/event-stream": {}}}}
_ERRORS_DOC = {code: {"description": text} for code, text in {
    400: "invalid request", 401: "missing or wrong API key", 404: "unknown model",
    408: "request body too slow", 413: "body too large", 429: "waiting queue full"}.items()}


@dataclasses.dataclass
class ServerSettings:
    served_model_name: Optional[str] = None  # default: the engine's model name
    api_key: Optional[str] = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S  # seconds to receive a request body, else 408


def create_app(engine: AsyncLLMEngine, settings: Optional[ServerSettings] = None) -> FastAPI:
    settings = settings or ServerSettings()
    metrics = ServerMetrics(engine.stats)
    engine.on_step = metrics.observe_step
    ctx = ServingContext(engine, metrics, settings.served_model_name or engine.engine.model_name)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.shutdown()  # uvicorn has drained in-flight requests by now

    app = FastAPI(title="PhotonInfer", description="OpenAI-compatible LLM inference server.", lifespan=lifespan)
    install_error_handlers(app, metrics.count_rejected)
    app.add_middleware(RequestGuard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                       on_reject=metrics.count_rejected, body_timeout=settings.body_timeout)
    app.state.serving = ctx

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected):
        return Response(status_code=499)  # nobody reads it; the request was aborted and its blocks freed

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**_STREAM_DOC, **_ERRORS_DOC})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """Chat completion over the served model's chat template (streamed with `stream: true`)."""
        return await create_chat_completion(ctx, body, request)

    @app.post("/v1/completions", response_model=CompletionResponse, responses={**_STREAM_DOC, **_ERRORS_DOC})
    async def completions(body: CompletionRequest, request: Request):
        """Raw text completion of one prompt or a batch of prompts."""
        return await create_completion(ctx, body, request)

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        card = ModelCard(id=ctx.model_name, created=started, max_model_len=ctx.max_model_len)
        return ModelList(data=[card])

    @app.get("/health")
    async def health():
        if not engine.is_running:
            raise APIError(503, "the inference engine is not running", None, "engine_unavailable")
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics():
        """Prometheus text format."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/engine", response_model=EngineStatus)
    async def engine_status():
        """Live numbers for the chat page's engine panel."""
        stats = engine.stats()
        return EngineStatus(running=stats.num_running, waiting=stats.num_waiting,
                            kv_blocks_used=stats.kv_blocks_used, kv_blocks_total=stats.kv_blocks_total,
                            generation_tokens_per_s=round(metrics.generation_tokens_per_s(), 2),
                            model=ctx.model_name)

    @app.get("/", include_in_schema=False)
    async def chat_page():
        index = STATIC_DIR / "index.html"
        if not index.is_file():
            return JSONResponse({"error": {"message": "the chat page is not installed", "type": "not_found",
                                           "param": None, "code": None}}, status_code=404)
        return FileResponse(index)

    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    return app
