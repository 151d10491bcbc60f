"""The asyncio side of the engine: requests as async iterators of deltas, admission control.

The engine thread calls back with each `RequestDelta`; `loop.call_soon_threadsafe` moves it
onto the event loop, into the request's queue. A consumer that stops early aborts its
requests, so the engine frees their KV pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from jaxinfer.engine.outputs import EngineStats, RequestDelta
from jaxinfer.sampling import SamplingParams

logger = logging.getLogger(__name__)

#: Default admission limit, as a multiple of the engine's max_num_seqs.
PENDING_PER_SEQUENCE = 4


class EngineProtocol(Protocol):
    """The part of `jaxinfer.engine.engine.Engine` the server uses."""

    config: Any
    tokenizer: Any
    cfg: Any
    model_name: str

    def add_request(self, prompt_token_ids: list[int], sampling_params: SamplingParams,
                    on_output: Callable[[RequestDelta], None],
                    request_id: str | None = None) -> str: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...


class ServerBusyError(Exception):
    """More requests are in the engine than the admission limit allows (HTTP 429)."""


class UnavailableError(Exception):
    """The server is shutting down or the engine thread is not running (HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class FinishedRequest:
    """Timings and counts of one finished request, for metrics and the request log.

    Times are `time.perf_counter()` seconds; `first_token_s` is None when no token came.
    """

    request_id: str
    finish_reason: str
    arrival_s: float
    first_token_s: float | None
    finish_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    error: str | None


@dataclasses.dataclass
class _Tracked:
    index: int
    queue: asyncio.Queue[tuple[int, RequestDelta]]
    arrival_s: float
    first_token_s: float | None = None


class RequestGroup:
    """One or more submitted requests, read as `(index, delta)` pairs in arrival order.

    Iteration ends once every request has sent its final delta. Use it as an async context
    manager: leaving the block aborts the requests that have not finished.
    """

    def __init__(self, owner: AsyncEngine, request_ids: list[str],
                 queue: asyncio.Queue[tuple[int, RequestDelta]]):
        self.request_ids = request_ids
        self._owner = owner
        self._queue = queue
        self._open = len(request_ids)

    def __aiter__(self) -> RequestGroup:
        return self

    async def __anext__(self) -> tuple[int, RequestDelta]:
        if self._open == 0:
            raise StopAsyncIteration
        index, delta = await self._queue.get()
        if delta.finished:
            self._open -= 1
        return index, delta

    async def __aenter__(self) -> RequestGroup:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.abort()

    def abort(self) -> None:
        """Abort the requests that have not finished (a no-op for finished ones)."""
        for rid in self.request_ids:
            self._owner.abort(rid)


class AsyncEngine:
    """Asyncio front of an engine whose `start()` has been called.

    Args:
      engine: the engine (`jaxinfer.engine.engine.Engine` or anything with its interface).
      max_pending: most requests inside the engine at once, running and waiting. Beyond it
        new requests are refused (`ServerBusyError`, HTTP 429) rather than queued in the
        server: the engine's own waiting queue already holds `max_pending - max_num_seqs`
        requests, and a longer queue only grows latency without bound while clients cannot
        tell; a 429 is retried with backoff by OpenAI clients. Default
        `PENDING_PER_SEQUENCE * max_num_seqs`.
      on_finished: called on the event loop with each finished request's timings (metrics).
    """

    def __init__(self, engine: EngineProtocol, max_pending: int | None = None,
                 on_finished: Callable[[FinishedRequest], None] | None = None):
        if max_pending is None:
            max_pending = PENDING_PER_SEQUENCE * int(engine.config.max_num_seqs)
        if max_pending < 1:
            raise ValueError(f"max_pending={max_pending} must be >= 1")
        self.engine = engine
        self.max_pending = max_pending
        self._on_finished = on_finished
        self._tracked: dict[str, _Tracked] = {}
        self._shutting_down = False

    @property
    def num_pending(self) -> int:
        """Requests submitted and not yet finished."""
        return len(self._tracked)

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def begin_shutdown(self) -> None:
        """Refuse new requests from now on (the caller then shuts the engine down)."""
        self._shutting_down = True

    def is_healthy(self) -> bool:
        """Whether the engine thread runs: the engine's `alive` (property or method) when it
        has one, and `stats()` answering."""
        alive = getattr(self.engine, "alive", True)
        try:
            if not (alive() if callable(alive) else alive):
                return False
            self.engine.stats()
        except Exception:  # a dead engine may fail in any way; health must not
            logger.exception("engine health check failed")
            return False
        return True

    def submit(self, requests: Sequence[tuple[list[int], SamplingParams, str]]) -> RequestGroup:
        """Put `(prompt_token_ids, sampling_params, request_id)` requests into the engine.

        All or none: the limit is checked for all of them first, and when the engine refuses
        one (InputError, CapacityError), the ones already added are aborted and the error
        is raised. Must be called on the event loop.

        Raises:
          UnavailableError, ServerBusyError, and the engine's `add_request` errors.
        """
        if self._shutting_down:
            raise UnavailableError("the server is shutting down")
        if self.num_pending + len(requests) > self.max_pending:
            raise ServerBusyError(
                f"the server is at its limit of {self.max_pending} requests in progress "
                f"({self.num_pending} now); retry later")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, RequestDelta]] = asyncio.Queue()
        added: list[str] = []
        try:
            for index, (ids, params, rid) in enumerate(requests):
                self._tracked[rid] = _Tracked(index, queue, time.perf_counter())
                try:
                    self.engine.add_request(ids, params, self._callback(loop, rid), rid)
                except RuntimeError as e:  # the engine is stopping or its thread failed
                    del self._tracked[rid]
                    raise UnavailableError(f"the engine is not running ({e})") from None
                except BaseException:
                    del self._tracked[rid]
                    raise
                added.append(rid)
        except BaseException:
            for rid in added:
                self.abort(rid)
            raise
        return RequestGroup(self, added, queue)

    async def generate(self, prompt_token_ids: list[int], sampling_params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestDelta]:
        """Submit one request and yield its deltas; the last has `finished=True`.

        Closing the generator early (`contextlib.aclosing`, task cancellation) aborts it.
        """
        rid = request_id or f"req-{uuid.uuid4().hex}"
        async with self.submit([(prompt_token_ids, sampling_params, rid)]) as group:
            async for _, delta in group:
                yield delta

    def abort(self, request_id: str) -> None:
        """Abort a request if it is still running; its final delta comes as usual."""
        if request_id not in self._tracked:  # finished, or never ours
            return
        try:
            self.engine.abort(request_id)
        except Exception:  # the engine may already be gone; the request then ends with it
            logger.exception("aborting request %s failed", request_id)

    def _callback(self, loop: asyncio.AbstractEventLoop,
                  rid: str) -> Callable[[RequestDelta], None]:
        def on_output(delta: RequestDelta) -> None:  # runs on the engine thread
            # A closed loop (RuntimeError) means nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._deliver, rid, delta, time.perf_counter())

        return on_output

    def _deliver(self, rid: str, delta: RequestDelta, at: float) -> None:
        tracked = self._tracked.get(rid)
        if tracked is None:
            return
        if tracked.first_token_s is None and delta.token_ids:
            tracked.first_token_s = at
        tracked.queue.put_nowait((tracked.index, delta))
        if not delta.finished:
            return
        del self._tracked[rid]
        if self._on_finished is None:
            return
        try:
            self._on_finished(FinishedRequest(
                request_id=rid, finish_reason=delta.finish_reason or "error",
                arrival_s=tracked.arrival_s, first_token_s=tracked.first_token_s, finish_s=at,
                num_prompt_tokens=delta.num_prompt_tokens,
                num_output_tokens=delta.num_output_tokens,
                num_cached_tokens=delta.num_cached_tokens, error=delta.error))
        except Exception:  # metrics must never break a response
            logger.exception("recording request %s failed", rid)
