"""`photoninfer serve`: load the model, start the engine thread and the OpenAI-compatible HTTP server.

SIGTERM / Ctrl-C: uvicorn stops accepting connections and waits for in-flight requests (streams included)
to finish, up to --shutdown-timeout seconds. Requests still running then are ended: a stream gets an error
event and `data: [DONE]`, any other request a 503. Then the engine thread stops and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Callable


logger = logging.getLogger("photoninfer.server")

# After --shutdown-timeout the engine ends the requests still running; uvicorn cancels whatever has not
# finished answering this much later (a client that stopped reading its stream).
_LAST_RESORT_GRACE_S = 5.0


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    from photoninfer.cli import add_engine_args

    parser = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    g.add_argument("--port", type=int, default=5728, help="port to listen on (0 picks a free one)")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    g.add_argument("--served-model-name", default=None, help="model name clients use (default: the model file)")
    g.add_argument("--max-queue", type=int, default=1024,
                   help="sequences (prompts x n of each request) allowed to wait before new requests get HTTP 429 "
                        "(default 1024)")
    g.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body accepted, else HTTP 413 (default 4 MiB)")
    g.add_argument("--header-timeout", type=float, default=None,
                   help="seconds a client has to send a request's headers, else HTTP 408 and the connection is "
                        "closed (default 10)")
    g.add_argument("--body-timeout", type=float, default=None,
                   help="seconds a client has to send a request's body once the headers are in, else HTTP 408 "
                        "(default 30)")
    g.add_argument("--max-connections", type=int, default=None,
                   help="open connections allowed at once; beyond it new ones get HTTP 503 (default 1024)")
    g.add_argument("--shutdown-timeout", type=float, default=60.0,
                   help="seconds to let in-flight requests finish after SIGTERM; then those still running "
                        "end with an error (default 60)")
    parser.set_defaults(func=run_serve)
    return parser


def _server_class():
    """uvicorn.Server that logs where the chat page is once the socket is listening, and that ends the
    requests still running when the shutdown timeout expires (uvicorn is imported here, not at module level,
    so the CLI's other commands start without the server's dependencies)."""
    import uvicorn

    class Server(uvicorn.Server):
        shutdown_timeout: float = 60.0
        on_shutdown_timeout: Callable[[], None] = staticmethod(lambda: None)

        async def shutdown(self, sockets=None) -> None:
            # uvicorn's own timeout cancels request tasks mid-write (a bare close and CancelledError
            # tracebacks); ours comes first and ends them through the engine, so each answers cleanly.
            deadline = asyncio.get_running_loop().call_later(self.shutdown_timeout, self.on_shutdown_timeout)
            try:
                await super().shutdown(sockets)
            finally:
                deadline.cancel()

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and self.servers and self.servers[0].sockets:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
                shown = f"[{shown}]" if ":" in shown else shown
                logger.info("PhotonInfer is ready: chat page at http://%s:%d/  (API under /v1, docs at /docs)",
                            shown, port)

    return Server


def _check_limits(args: argparse.Namespace) -> None:
    for flag, value in (("--max-queue", args.max_queue), ("--max-connections", args.max_connections),
                        ("--max-body-bytes", args.max_body_bytes)):
        if value is not None and value < 1:
            raise SystemExit(f"{flag} must be at least 1, got {value}")
    for flag, value in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout)):
        if value is not None and not value > 0:
            raise SystemExit(f"{flag} must be a positive number of seconds, got {value}")
    if not args.shutdown_timeout >= 0:
        raise SystemExit(f"--shutdown-timeout must be >= 0 seconds, got {args.shutdown_timeout}")


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from photoninfer.cli import engine_config_from_args
    from photoninfer.engine.async_engine import AsyncLLMEngine, ServerShuttingDownError
    from photoninfer.engine.llm_engine import LLMEngine
    from photoninfer.server.app import ServerSettings, create_app
    from photoninfer.server.connections import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_MAX_CONNECTIONS, guarded_protocol
    from photoninfer.server.guard import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES

    _check_limits(args)
    logger.info("loading the model ...")
    engine = LLMEngine(engine_config_from_args(args))
    async_engine = AsyncLLMEngine(engine, max_queue=args.max_queue)
    settings = ServerSettings(served_model_name=args.served_model_name, api_key=args.api_key,
                              max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
                              body_timeout=args.body_timeout or DEFAULT_BODY_TIMEOUT_S)
    app = create_app(async_engine, settings)
    protocol = guarded_protocol(args.header_timeout or DEFAULT_HEADER_TIMEOUT_S,
                                args.max_connections or DEFAULT_MAX_CONNECTIONS)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=logging.getLogger().level,
                            timeout_graceful_shutdown=args.shutdown_timeout + _LAST_RESORT_GRACE_S, log_config=None,
                            http=protocol)
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; by then the work is
    # done, so let that re-raised signal end the process with status 0 instead of killing it.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    server = _server_class()(config)
    server.shutdown_timeout = args.shutdown_timeout
    server.on_shutdown_timeout = lambda: async_engine.end_in_flight(ServerShuttingDownError(
        f"the server is shutting down and its --shutdown-timeout ({args.shutdown_timeout:g} s) expired before "
        "this request finished"))
    server.run()
    logger.info("server stopped")
    return 0
