"""RequestGuard: ASGI middleware run before any route — API key check, then request body size and read
time limits.

It is plain ASGI (not a FastAPI dependency) so that it answers before FastAPI parses the body: a client
without the key gets 401 even when its JSON is also broken, and a huge body is never parsed at all.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Callable, Optional

from photoninfer.server.errors import error_body

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 30.0  # to receive the whole body once the headers are in
PROTECTED_PREFIX = "/v1/"  # the OpenAI API; the page, /health, /metrics and /docs stay open


class _BodyTooLarge(Exception):
    pass


class RequestGuard:
    def __init__(self, app, api_key: Optional[str] = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 on_reject: Callable[[int], object] = lambda status: None,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT_S):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.on_reject = on_reject
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and scope["path"].startswith(PROTECTED_PREFIX) and not self._authorized(scope):
            return await self._reject(send, 401, "missing or incorrect API key; send 'Authorization: Bearer <key>'",
                                      "invalid_api_key", [(b"www-authenticate", b"Bearer")])
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await self._reject(send, 400, f"invalid Content-Length header {declared!r}")
            if int(declared) > self.max_body_bytes:
                return await self._reject(send, 413, self._too_large_message(int(declared)), "request_too_large")
        try:
            messages = await asyncio.wait_for(self._read_body(receive), self.body_timeout)
        except _BodyTooLarge:
            return await self._reject(send, 413, self._too_large_message(None), "request_too_large")
        except asyncio.TimeoutError:  # a slow (or stalled) client must not hold a connection forever
            return await self._reject(send, 408, f"the request body did not arrive within {self.body_timeout:g} s",
                                      "request_timeout", [(b"connection", b"close")])
        return await self.app(scope, _replay(messages, receive), send)

    def _authorized(self, scope) -> bool:
        value = _header(scope, b"authorization") or ""
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode())

    async def _read_body(self, receive) -> list[dict]:
        """Reads the whole body (counting streamed bytes, as Content-Length may be absent or lie)."""
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages  # the client went away; the route will see the disconnect
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                raise _BodyTooLarge()
            if not message.get("more_body", False):
                return messages

    def _too_large_message(self, size: Optional[int]) -> str:
        got = f" ({size} bytes)" if size is not None else ""
        return f"request body is too large{got}; the limit is {self.max_body_bytes} bytes"

    async def _reject(self, send, status: int, message: str, code: Optional[str] = None, headers=()):
        self.on_reject(status)
        body = json.dumps(error_body(status, message, None, code)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *headers]})
        await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> Optional[str]:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _replay(messages: list[dict], receive):
    """A receive() that hands out the buffered body first, then the real channel (for disconnects)."""
    pending = list(messages)

    async def replayed():
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
