"""Connection limits below the ASGI app: how long a client may take to send its request headers, and how
many connections may be open at once. (The body's read time is bounded in guard.py, where the body is read.)

The app never sees a request whose headers are incomplete, so both limits live in uvicorn's HTTP protocol:
a subclass of its h11 protocol (h11 ships with uvicorn; httptools is optional) that adds two checks.
This reaches into uvicorn's internals (`cycle`, `connections`, `loop`), hence the pinned uvicorn range.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.h11_impl import H11Protocol

from photoninfer.server.errors import error_body

DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 1024

_REASONS = {408: "Request Timeout", 503: "Service Unavailable"}


def guarded_protocol(header_timeout: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline on request headers (else 408) and a cap on open connections
    (connections beyond it get 503 on their first bytes and are closed)."""
    return type("GuardedH11Protocol", (_GuardedH11Protocol,),
                {"header_timeout": header_timeout, "max_connections": max_connections})


class _GuardedH11Protocol(H11Protocol):
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._over_limit = len(self.connections) > self.max_connections
        self._time_headers()

    def data_received(self, data: bytes) -> None:
        if self._over_limit:  # answered once the client has sent something, so that it reads the answer
            self._refuse(503, f"the server has too many open connections (limit {self.max_connections}); "
                              "retry later", "too_many_connections")
            return
        super().data_received(data)
        self._time_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _reading_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _time_headers(self) -> None:
        """Starts the clock when a request begins (a new connection, or the first bytes after a response:
        an idle keep-alive connection is uvicorn's own timeout_keep_alive) and stops it once its headers are in."""
        if not self._reading_headers():
            self._stop_header_timer()
        elif self._header_timer is None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._reading_headers() and not self.transport.is_closing():
            self._refuse(408, f"the request headers did not arrive within {self.header_timeout:g} s",
                         "request_timeout")

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answers with an OpenAI error body outside any request cycle, then closes the connection."""
        body = json.dumps(error_body(status, message, None, code)).encode()
        head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        self._stop_header_timer()
        self.transport.write(head + body)
        self.transport.close()
