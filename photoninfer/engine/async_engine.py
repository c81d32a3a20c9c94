"""AsyncLLMEngine: one LLMEngine step loop shared by every HTTP request (continuous batching across clients).

The synchronous `LLMEngine` is touched by exactly one thread, the engine thread, which loops
"drain inbox -> step -> hand outputs over". The asyncio side never calls the engine: it puts add/abort
commands in a thread-safe inbox and reads outputs from a per-request asyncio queue, filled through
`loop.call_soon_threadsafe`. Torch releases the GIL inside its ops, so the event loop stays responsive
while a step runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable, Optional, Union

from photoninfer.errors import InvalidRequestError, PhotonInferError
from photoninfer.outputs import CompletionOutput, RequestOutput
from photoninfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

Prompt = Union[str, list[int]]


class QueueFullError(PhotonInferError):
    """Too many requests are already waiting; the client should retry later (HTTP 429)."""


class EngineDeadError(PhotonInferError):
    """The engine thread is not running (stopped or crashed); no request can be served (HTTP 503)."""


class ServerShuttingDownError(EngineDeadError):
    """The server stopped before this request finished (its shutdown timeout expired) (HTTP 503)."""


class RequestFailedError(PhotonInferError):
    """The engine failed while serving this request; other requests go on."""


class RequestStream:
    """What one caller reads: `(index, RequestOutput)` items until each of its sequences has finished.

    One caller request may fan out into several engine requests (n > 1, several prompts); `index` says
    which. Leaving the `async for` early (or calling `abort`) aborts whatever is still running.
    """

    def __init__(self, engine: "AsyncLLMEngine", request_id: str, sub_ids: list[str]):
        self._engine = engine
        self.request_id = request_id
        self.sub_ids = sub_ids
        self.pending = set(sub_ids)  # sub-requests not finished yet
        self.queue: asyncio.Queue = asyncio.Queue()
        self.arrival_time = time.monotonic()
        self.first_token_time: Optional[float] = None
        self.finished_time: Optional[float] = None
        self.finish_reasons: dict[int, Optional[str]] = {}
        self.num_generated_tokens = 0
        self.failed = False
        self.aborted = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self.pending and self.queue.empty():
            raise StopAsyncIteration
        item = await self.queue.get()
        if item is None:  # aborted while we waited
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    @property
    def finished(self) -> bool:
        return not self.pending

    @property
    def outcome(self) -> str:
        """One word for metrics: stop | length | abort | error."""
        if self.failed:
            return "error"
        if self.aborted or self.pending:
            return "abort"
        reasons = set(self.finish_reasons.values())
        return "length" if "length" in reasons else (reasons.pop() if len(reasons) == 1 else "stop")

    def abort(self) -> None:
        """Stops this request's sequences now and frees their KV blocks (no-op once finished)."""
        if self.pending:
            self.aborted = True
            self._engine._abort(self)
            self.queue.put_nowait(None)  # wakes a reader blocked on the queue (e.g. abort from shutdown)


@dataclasses.dataclass
class _Add:
    stream: RequestStream
    requests: list[tuple[str, Prompt, SamplingParams]]
    done: asyncio.Future


@dataclasses.dataclass
class _Abort:
    sub_ids: list[str]


class AsyncLLMEngine:
    """Runs `engine.step()` in a background thread and serves many asyncio callers from it.

    `max_queue` bounds how many requests may wait for a slot; beyond it `submit` raises QueueFullError.
    `on_step(stats)` is called in the engine thread after every step (for metrics).
    """

    def __init__(self, engine: Any, max_queue: Optional[int] = None,
                 on_step: Optional[Callable[[Any], None]] = None):
        self.engine = engine
        self.max_queue = max_queue
        self.on_step = on_step
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stopping = False
        self._stats = engine.stats()  # snapshot refreshed by the engine thread; safe to read anywhere
        # Loop-side state (only touched from the event loop thread).
        self._routes: dict[str, tuple[RequestStream, int]] = {}
        self._pending_adds = 0
        # Engine-thread-side state: engine request ids not finished yet.
        self._active: set[str] = set()

    # ----------------------------------------------------------------- lifecycle (event loop side)

    def start(self) -> None:
        """Starts the engine thread; call from inside the running event loop that will use this engine."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="photoninfer-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    async def shutdown(self, abort_in_flight: bool = True) -> None:
        """Stops the engine thread. In-flight requests are aborted first unless `abort_in_flight` is
        False, in which case the thread finishes them (drain) before it exits."""
        self._stopping = True
        if abort_in_flight:
            for stream in {stream for stream, _ in self._routes.values()}:
                stream.abort()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def end_in_flight(self, error: Exception) -> None:
        """Ends every in-flight request now: its engine sequences are aborted and its reader gets `error`
        (used when the server's shutdown timeout expires, so callers can still answer cleanly)."""
        for stream in {stream for stream, _ in self._routes.values()}:
            stream.aborted = True
            self._abort(stream)
            stream.queue.put_nowait(error)

    def stats(self):
        """The latest engine statistics (EngineStats), as of the last step or inbox change."""
        return self._stats

    # ----------------------------------------------------------------- requests (event loop side)

    async def submit(self, request_id: str, requests: list[tuple[Prompt, SamplingParams]]) -> RequestStream:
        """Queues the engine requests of one caller request, all or none.

        Returns once the engine has accepted them, so validation errors (InvalidRequestError from
        `add_request`, e.g. prompt too long) reach the caller before any response is sent.
        """
        if not self.is_running:
            raise EngineDeadError("the inference engine is not running")
        self._check_queue_room(len(requests))
        sub_ids = [request_id] if len(requests) == 1 else [f"{request_id}-{i}" for i in range(len(requests))]
        stream = RequestStream(self, request_id, sub_ids)
        for index, sub_id in enumerate(sub_ids):
            self._routes[sub_id] = (stream, index)
        done = self._loop.create_future()
        self._pending_adds += len(sub_ids)
        self._send(_Add(stream, [(sid, p, sp) for sid, (p, sp) in zip(sub_ids, requests)], done))
        try:
            await done
        except BaseException:  # rejected by the engine, or the caller went away while waiting
            rejected = done.done() and not done.cancelled() and done.exception() is not None
            if rejected:  # the engine already undid its part
                self._unroute(stream)
            else:
                stream.abort()
            raise
        return stream

    def _check_queue_room(self, num_sequences: int) -> None:
        """`max_queue` counts sequences (one per prompt and choice), not HTTP requests."""
        if self.max_queue is None:
            return
        if num_sequences > self.max_queue:
            raise InvalidRequestError(
                f"this request needs {num_sequences} sequences (prompts x n), but at most {self.max_queue} may "
                f"wait on this server (--max-queue); send fewer prompts or a smaller n")
        waiting = self._stats.num_waiting + self._pending_adds
        if waiting + num_sequences > self.max_queue:
            raise QueueFullError(f"too many sequences are waiting: {waiting} waiting and {num_sequences} more in "
                                 f"this request exceed the limit of {self.max_queue}; retry later")

    def _abort(self, stream: RequestStream) -> None:
        self._unroute(stream)
        stream.pending.clear()
        self._send(_Abort(list(stream.sub_ids)))

    def _unroute(self, stream: RequestStream) -> None:
        for sub_id in stream.sub_ids:
            self._routes.pop(sub_id, None)

    def _send(self, command) -> None:
        self._inbox.put(command)
        self._wake.set()

    # ----------------------------------------------------------------- delivery (event loop side)

    def _resolve(self, done: asyncio.Future, num: int, error: Optional[BaseException]) -> None:
        self._pending_adds -= num
        if done.done():  # the caller was cancelled meanwhile; it aborts its own requests
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for output in outputs:
            route = self._routes.get(output.request_id)
            if route is None:
                continue  # aborted meanwhile
            stream, index = route
            completion = output.outputs[0]
            if completion.finish_reason == "error":  # the engine isolated a failure of this request
                self._fail([output.request_id], RuntimeError(completion.stop_reason))
                continue
            if completion.token_ids and stream.first_token_time is None:
                stream.first_token_time = now
            stream.queue.put_nowait((index, output))
            if output.finished:
                stream.finish_reasons[index] = completion.finish_reason
                stream.num_generated_tokens += len(completion.token_ids)
                stream.pending.discard(output.request_id)
                self._routes.pop(output.request_id, None)
                if not stream.pending:
                    stream.finished_time = now

    def _fail(self, sub_ids: list[str], error: BaseException) -> None:
        for sub_id in sub_ids:
            route = self._routes.get(sub_id)
            if route is None:
                continue
            stream = route[0]
            self._unroute(stream)
            self._send(_Abort(list(stream.sub_ids)))  # its sibling choices stop too (finished ids are no-ops)
            stream.failed = True
            stream.pending.clear()
            stream.finished_time = time.monotonic()
            stream.queue.put_nowait(RequestFailedError(f"the engine failed on this request: {error}"))

    def _fail_everything(self, error: BaseException) -> None:
        """The engine thread died: fail every routed request and every add still in the inbox."""
        self._fail(list(self._routes), error)
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                self._resolve(command.done, len(command.requests), EngineDeadError("the inference engine stopped"))

    # ----------------------------------------------------------------- engine thread

    def _run(self) -> None:
        try:
            while True:
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    if self._stopping:
                        return
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._step()
        except BaseException as exc:  # a bug outside step(): fail everyone rather than hang them
            logger.exception("engine thread crashed")
            self._stopping = True
            try:
                self._loop.call_soon_threadsafe(self._fail_everything, exc)
            except RuntimeError:  # the event loop is already closed
                pass
        finally:
            self._stopping = True

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            self._recover(exc)
            return
        self._stats = self.engine.stats()
        if self.on_step is not None:
            try:
                self.on_step(self._stats)
            except Exception:  # metrics must never take the engine down
                logger.exception("on_step callback failed")
        snapshots = [_snapshot(output) for output in outputs]
        for output in outputs:
            if output.finished:
                self._active.discard(output.request_id)
        if snapshots:
            self._loop.call_soon_threadsafe(self._deliver, snapshots)

    def _recover(self, exc: Exception) -> None:
        """A step raised: abort the request it names (exc.request_id), or else every request in the engine,
        tell their callers, and keep the loop alive for everyone else."""
        culprit = getattr(exc, "request_id", None)
        victims = [culprit] if culprit in self._active else list(self._active)
        logger.error("engine step failed (%s: %s); failing %d request(s)", type(exc).__name__, exc, len(victims),
                     exc_info=exc)
        for sub_id in victims:
            self._engine_abort(sub_id)
        self._stats = self.engine.stats()
        self._loop.call_soon_threadsafe(self._fail, victims, exc)

    def _drain_inbox(self) -> None:
        changed = False
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
            changed = True
            if isinstance(command, _Add):
                self._add(command)
            else:
                for sub_id in command.sub_ids:
                    self._engine_abort(sub_id)
        if changed:
            self._stats = self.engine.stats()

    def _add(self, command: _Add) -> None:
        added: list[str] = []
        error: Optional[BaseException] = None
        try:
            for sub_id, prompt, params in command.requests:
                self.engine.add_request(sub_id, prompt, params)
                added.append(sub_id)
                self._active.add(sub_id)
        except Exception as exc:  # all or none: undo the part that went in
            error = exc
            for sub_id in added:
                self._engine_abort(sub_id)
        self._stats = self.engine.stats()  # before resolving, so the caller never sees a stale queue length
        self._loop.call_soon_threadsafe(self._resolve, command.done, len(command.requests), error)

    def _engine_abort(self, sub_id: str) -> None:
        self._active.discard(sub_id)
        try:
            self.engine.abort_request(sub_id)
        except Exception:
            logger.exception("abort_request(%s) failed", sub_id)


def _snapshot(output: RequestOutput) -> RequestOutput:
    """Copies the mutable lists, so the engine may keep appending to its own objects while the
    event loop reads this one."""
    completions: list[CompletionOutput] = [
        dataclasses.replace(c, token_ids=list(c.token_ids), logprobs=None if c.logprobs is None else list(c.logprobs))
        for c in output.outputs
    ]
    return dataclasses.replace(output, outputs=completions, prompt_token_ids=list(output.prompt_token_ids or []))
