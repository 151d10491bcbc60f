"""The aiohttp application: OpenAI-compatible routes over an `AsyncEngine`.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models[/{model}],
GET /health, GET /metrics. Every error is an OpenAI error object; one INFO line per request.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from jaxinfer.errors import CapacityError, InputError
from jaxinfer.server import protocol
from jaxinfer.server.async_engine import (
    AsyncEngine,
    EngineProtocol,
    RequestGroup,
    ServerBusyError,
    UnavailableError,
)
from jaxinfer.server.generation import (
    chat_completions_response,
    completions_response,
)
from jaxinfer.server.metrics import CONTENT_TYPE, ServerMetrics
from jaxinfer.server.protocol import APIError

logger = logging.getLogger("jaxinfer.server")

#: Largest request body (a long prompt as token ids is ~10 bytes a token).
MAX_BODY_BYTES = 64 << 20
#: Seconds a refused client is asked to wait (the `Retry-After` header of a 429).
RETRY_AFTER_S = 1


@dataclasses.dataclass
class ServerState:
    """What the handlers share: the engine, its asyncio front, metrics, the served name."""

    engine: EngineProtocol
    async_engine: AsyncEngine
    metrics: ServerMetrics
    model_name: str
    max_model_len: int
    created: int
    token_text: Callable[[int], str]

    def check_model(self, model: str | None) -> str:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                                f"`{self.model_name}` (see GET /v1/models)",
                           param="model", code="model_not_found")
        return self.model_name

    def submit(self, requests: list[tuple[list[int], Any, str]]) -> RequestGroup:
        """Submit to the engine; refusals become the API errors clients understand."""
        try:
            return self.async_engine.submit(requests)
        except UnavailableError as e:
            raise APIError(503, str(e), "server_error", code="unavailable") from None
        except ServerBusyError as e:
            raise APIError(429, str(e), "rate_limit_error", code="too_many_requests") from None
        except (InputError, CapacityError) as e:
            raise protocol.bad_request(str(e)) from None


STATE = web.AppKey("state", ServerState)
#: What the handler adds to the request's log line (request id, tokens, finish reasons).
_log_details: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("log_details")


def create_app(engine: EngineProtocol, *, max_pending: int | None = None,
               served_model_name: str | None = None) -> web.Application:
    """The application serving `engine` (already started; the caller owns and stops it).

    Args:
      engine: the engine.
      max_pending: admission limit (see `AsyncEngine`); default 4 x max_num_seqs.
      served_model_name: the name clients use (default: `engine.model_name`).
    """
    metrics = ServerMetrics()
    tokenizer = engine.tokenizer

    @functools.lru_cache(maxsize=1 << 16)
    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)

    max_model_len = (getattr(engine.config, "max_model_len", None)
                     or engine.cfg.max_position_embeddings)
    state = ServerState(
        engine=engine,
        async_engine=AsyncEngine(engine, max_pending, on_finished=metrics.observe_finished),
        metrics=metrics, model_name=served_model_name or engine.model_name,
        max_model_len=int(max_model_len), created=protocol.now(), token_text=token_text)
    app = web.Application(middlewares=[_errors_and_log], client_max_size=MAX_BODY_BYTES)
    app[STATE] = state
    app.on_shutdown.append(_on_shutdown)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model}", _model)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    return app


async def _on_shutdown(app: web.Application) -> None:
    app[STATE].async_engine.begin_shutdown()


def _error_response(error: APIError) -> web.Response:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 429 else None
    return web.json_response(error.to_dict(), status=error.status, headers=headers)


_REJECTION_REASONS = {400: "invalid", 404: "not_found", 429: "rate_limit", 503: "shutting_down"}


@web.middleware
async def _errors_and_log(request: web.Request, handler: Any) -> web.StreamResponse:
    """OpenAI error objects for every failure, and one log line per request."""
    start = time.perf_counter()
    info: dict[str, Any] = {}
    _log_details.set(info)
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except APIError as e:
        status = e.status
        info["error"] = e.message
        if e.status in _REJECTION_REASONS:
            request.app[STATE].metrics.observe_rejected(_REJECTION_REASONS[e.status])
        return _error_response(e)
    except web.HTTPException as e:  # unknown route, wrong method, body too large
        status = e.status
        info["error"] = e.reason
        return _error_response(APIError(
            e.status, f"{request.method} {request.path}: {e.text or e.reason}",
            "invalid_request_error" if e.status < 500 else "server_error"))
    except (ConnectionResetError, asyncio.CancelledError):
        status = 499  # nginx's "client closed request"; the engine requests were aborted
        info["error"] = "client disconnected"
        raise
    except Exception as e:
        logger.exception("%s %s failed", request.method, request.path)
        info["error"] = repr(e)
        return _error_response(APIError(500, f"internal server error: {e!r}", "server_error"))
    finally:
        level = logging.DEBUG if request.path in ("/health", "/metrics") else logging.INFO
        if logger.isEnabledFor(level):
            details = " ".join(f"{k}={v}" for k, v in info.items())
            logger.log(level, "%s %s %d %.3fs %s", request.method, request.path, status,
                       time.perf_counter() - start, details)


async def _json_body(request: web.Request) -> dict[str, Any]:
    return protocol.parse_json_body(await request.read())


async def _completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    parsed, prompts = protocol.parse_completion_request(await _json_body(request))
    model = state.check_model(parsed.model)
    rid = protocol.request_id("cmpl")
    tokenizer = state.engine.tokenizer
    prompt_ids = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    max_tokens = parsed.max_tokens
    if max_tokens is None:
        max_tokens = protocol.DEFAULT_COMPLETION_MAX_TOKENS
    sampling = protocol.make_sampling_params(parsed, max_tokens)
    ids = [rid] if len(prompts) == 1 else [f"{rid}-{i}" for i in range(len(prompts))]
    _log_details.get()["id"] = rid
    group = state.submit([(p, sampling, i) for p, i in zip(prompt_ids, ids, strict=True)])
    return await completions_response(request, group, parsed, rid, model, state.token_text,
                                      _log_details.get())


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    parsed, messages = protocol.parse_chat_request(await _json_body(request))
    model = state.check_model(parsed.model)
    rid = protocol.request_id("chatcmpl")
    try:
        prompt_ids = state.engine.tokenizer.encode_chat(messages)
    except InputError as e:
        raise protocol.bad_request(str(e), "messages") from None
    # Without max_tokens a chat answer may fill the context; an over-long prompt is left
    # for the engine to refuse with its own message.
    max_tokens = parsed.max_tokens
    if max_tokens is None:
        max_tokens = max(1, state.max_model_len - len(prompt_ids))
    sampling = protocol.make_sampling_params(parsed, max_tokens)
    _log_details.get()["id"] = rid
    group = state.submit([(prompt_ids, sampling, rid)])
    return await chat_completions_response(request, group, parsed, rid, model,
                                           state.token_text, _log_details.get())


def _model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.created,
            "owned_by": "jaxinfer", "max_model_len": state.max_model_len}


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request.app[STATE])]})


async def _model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.check_model(request.match_info["model"])
    return web.json_response(_model_card(state))


async def _health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.async_engine.shutting_down:
        return web.json_response({"status": "shutting_down"}, status=503)
    if not state.async_engine.is_healthy():
        return web.json_response(
            {"status": "unhealthy", "message": "the engine thread is not running"}, status=503)
    return web.json_response({"status": "ok", "model": state.model_name,
                              "pending": state.async_engine.num_pending})


async def _metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        stats = state.engine.stats()
    except Exception:  # a dead engine still lets the request counters be scraped
        logger.exception("engine stats failed")
        stats = None
    body = state.metrics.render(stats, state.async_engine.num_pending)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
