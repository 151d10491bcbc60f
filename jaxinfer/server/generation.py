"""Turning a request group's deltas into OpenAI responses: whole, or streamed as SSE chunks.

Leaving a `RequestGroup` block early (client gone, handler cancelled) aborts its requests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from jaxinfer.engine.outputs import RequestDelta, TokenLogprob
from jaxinfer.server import protocol
from jaxinfer.server.async_engine import RequestGroup
from jaxinfer.server.protocol import APIError, GenerationRequest

TokenText = Callable[[int], str]
Log = dict[str, Any]


@dataclasses.dataclass
class _Choice:
    """One request's output gathered from its deltas."""

    text: str = ""
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0

    def add(self, delta: RequestDelta) -> None:
        self.text += delta.text
        self.logprobs.extend(delta.logprobs or ())
        self.num_prompt_tokens = delta.num_prompt_tokens
        self.num_output_tokens = delta.num_output_tokens
        if delta.finished:
            self.finish_reason = delta.finish_reason


def _failure(delta: RequestDelta) -> APIError:
    return APIError(500, f"generation failed: {delta.error}", "server_error")


def _usage(choices: list[_Choice]) -> dict[str, int]:
    return protocol.usage(sum(c.num_prompt_tokens for c in choices),
                          sum(c.num_output_tokens for c in choices))


def _log_usage(log: Log, choices: list[_Choice]) -> None:
    usage = _usage(choices)
    log["prompt_tokens"] = usage["prompt_tokens"]
    log["completion_tokens"] = usage["completion_tokens"]
    log["finish"] = ",".join(str(c.finish_reason) for c in choices)


async def _gather(group: RequestGroup) -> list[_Choice]:
    choices = [_Choice() for _ in group.request_ids]
    async with group:
        async for index, delta in group:
            if delta.error is not None:
                raise _failure(delta)
            choices[index].add(delta)
    return choices


async def _open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no"})  # proxies must not buffer the stream
    await response.prepare(request)
    return response


async def _close_stream(response: web.StreamResponse) -> web.StreamResponse:
    await response.write(protocol.sse("[DONE]"))
    await response.write_eof()
    return response


def _worth_sending(delta: RequestDelta, with_logprobs: bool) -> bool:
    """Deltas whose text is held back (a stop string may be forming) carry nothing new."""
    return bool(delta.text or delta.finished or (with_logprobs and delta.logprobs))


async def completions_response(request: web.Request, group: RequestGroup,
                               parsed: GenerationRequest, rid: str, model: str,
                               token_text: TokenText, log: Log) -> web.StreamResponse:
    """The /v1/completions answer: one choice per prompt, whole or streamed."""
    created = protocol.now()
    k = parsed.logprobs

    def logprobs(entries: Sequence[TokenLogprob] | None, offset: int) -> dict[str, Any] | None:
        if k is None:
            return None
        return protocol.completion_logprobs(entries or (), k, token_text, offset)

    if not parsed.stream:
        choices = await _gather(group)
        _log_usage(log, choices)
        return web.json_response(protocol.completion_body(
            rid, created, model,
            [protocol.completion_choice(i, c.text, c.finish_reason, logprobs(c.logprobs, 0))
             for i, c in enumerate(choices)], _usage(choices)))

    def chunk(choice_list: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        return protocol.sse(protocol.completion_chunk(rid, created, model, choice_list, usage,
                                                      with_usage=parsed.include_usage))

    response = await _open_stream(request)
    choices = [_Choice() for _ in group.request_ids]
    async with group:
        async for index, delta in group:
            if delta.error is not None:
                await response.write(protocol.sse(_failure(delta).to_dict()))
                return await _close_stream(response)
            offset = len(choices[index].text)
            choices[index].add(delta)
            if _worth_sending(delta, k is not None):
                await response.write(chunk([protocol.completion_choice(
                    index, delta.text, delta.finish_reason if delta.finished else None,
                    logprobs(delta.logprobs, offset))]))
    _log_usage(log, choices)
    if parsed.include_usage:
        await response.write(chunk([], _usage(choices)))
    return await _close_stream(response)


async def chat_completions_response(request: web.Request, group: RequestGroup,
                                    parsed: GenerationRequest, rid: str, model: str,
                                    token_text: TokenText, log: Log) -> web.StreamResponse:
    """The /v1/chat/completions answer, whole or streamed (the role first, then content)."""
    created = protocol.now()
    k = parsed.logprobs

    def logprobs(entries: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
        return None if k is None else protocol.chat_logprobs(entries or (), k, token_text)

    if not parsed.stream:
        choices = await _gather(group)
        _log_usage(log, choices)
        (choice,) = choices
        return web.json_response(protocol.chat_body(
            rid, created, model,
            [protocol.chat_choice(0, choice.text, choice.finish_reason,
                                  logprobs(choice.logprobs))], _usage(choices)))

    def chunk(choice_list: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        return protocol.sse(protocol.chat_chunk(rid, created, model, choice_list, usage,
                                                with_usage=parsed.include_usage))

    response = await _open_stream(request)
    choice = _Choice()
    async with group:
        await response.write(chunk([protocol.chat_chunk_choice(
            {"role": "assistant", "content": ""})]))
        async for _, delta in group:
            if delta.error is not None:
                await response.write(protocol.sse(_failure(delta).to_dict()))
                return await _close_stream(response)
            choice.add(delta)
            if _worth_sending(delta, k is not None):
                await response.write(chunk([protocol.chat_chunk_choice(
                    {"content": delta.text} if delta.text else {},
                    delta.finish_reason if delta.finished else None,
                    logprobs(delta.logprobs) if delta.logprobs else None)]))
    _log_usage(log, [choice])
    if parsed.include_usage:
        await response.write(chunk([], _usage([choice])))
    return await _close_stream(response)
