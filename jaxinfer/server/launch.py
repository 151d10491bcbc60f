"""Running the app: `serve` (blocking, the CLI's) and `ServerThread` (background, for tests)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from typing import Any

from aiohttp import web

from jaxinfer.errors import JaxinferError
from jaxinfer.server.app import STATE, create_app

logger = logging.getLogger("jaxinfer.server")

#: Seconds in-flight handlers get to finish when the server stops (their requests are
#: aborted first, so they end quickly).
SHUTDOWN_TIMEOUT_S = 5.0


def _runner(app: web.Application) -> web.AppRunner:
    # handler_cancellation: a client that hangs up cancels its handler, whose request
    # group then aborts the engine requests (frees their KV pages) even before any output.
    return web.AppRunner(app, access_log=None, handler_cancellation=True,
                         shutdown_timeout=SHUTDOWN_TIMEOUT_S)


def serve(engine: Any, *, host: str = "127.0.0.1", port: int = 8000,
          max_pending: int | None = None, served_model_name: str | None = None) -> None:
    """Start `engine`, serve it over HTTP until SIGINT or SIGTERM, then stop both.

    Args:
      engine: a `jaxinfer.engine.engine.Engine` (not started yet).
      host, port: where to listen.
      max_pending: admission limit (see `AsyncEngine`).
      served_model_name: the model name clients use (default: the engine's).
    """
    asyncio.run(_serve(engine, host, port, max_pending, served_model_name))


async def _serve(engine: Any, host: str, port: int, max_pending: int | None,
                 served_model_name: str | None) -> None:
    engine.start()
    app = create_app(engine, max_pending=max_pending, served_model_name=served_model_name)
    runner = _runner(app)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # not on Windows
            loop.add_signal_handler(sig, stop.set)
    try:
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as e:
            raise JaxinferError(f"cannot listen on {host}:{port}: {e.strerror or e}; "
                                "choose another --host or --port") from None
        state = app[STATE]
        logger.info("serving %s on http://%s:%d (max_pending=%d)", state.model_name, host,
                    port, state.async_engine.max_pending)
        await stop.wait()
        logger.info("shutting down")
    finally:
        app[STATE].async_engine.begin_shutdown()
        # The engine ends its pending requests with "abort", which ends open streams.
        await loop.run_in_executor(None, engine.shutdown)
        await runner.cleanup()


class ServerThread:
    """Serves an app from a background thread with its own event loop.

    `with ServerThread(create_app(engine)) as server: ... server.url ...`. Port 0 (the
    default) takes a free port. The engine is the caller's to start and shut down.
    """

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0):
        self.app = app
        self.host = host
        self.port = port
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="jaxinfer-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported by start() when it happens during start-up
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        runner = _runner(self.app)
        await runner.setup()
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            self.port = sock.getsockname()[1]
            await web.SockSite(runner, sock).start()
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()

