"""OpenAI API shapes: request parsing with helpful 400 messages, response and chunk builders.

Host side and framework-free: plain dicts in, plain dicts out, `APIError` for every refusal.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxinfer.engine.outputs import TokenLogprob
from jaxinfer.errors import InputError
from jaxinfer.sampling import MAX_LOGPROBS, SamplingParams

#: OpenAI's default for /v1/completions; chat defaults to the rest of the context.
DEFAULT_COMPLETION_MAX_TOKENS = 16
MAX_STOP_STRINGS = 16

TokenText = Callable[[int], str]


class APIError(Exception):
    """A refusal the client sees as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, not {_json_type(body)}")
    return body


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


class _Fields:
    """Typed access to a JSON object's fields; each wrong type is a 400 naming the field."""

    def __init__(self, body: Mapping[str, Any]):
        self._body = body

    def get(self, name: str) -> Any:
        return self._body.get(name)

    def number(self, name: str, default: float | None = None) -> float | None:
        value = self._body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad_request(f"'{name}' must be a number, got {_json_type(value)}", name)
        return float(value)

    def integer(self, name: str, default: int | None = None) -> int | None:
        value = self._body.get(name)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_request(f"'{name}' must be an integer, got {_json_type(value)}", name)
        return value

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self._body.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise bad_request(f"'{name}' must be true or false, got {_json_type(value)}", name)
        return value

    def string(self, name: str) -> str | None:
        value = self._body.get(name)
        if value is not None and not isinstance(value, str):
            raise bad_request(f"'{name}' must be a string, got {_json_type(value)}", name)
        return value

    def stop(self) -> tuple[str, ...]:
        value = self._body.get("stop")
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise bad_request("'stop' must be a string or a list of strings", "stop")
        if len(value) > MAX_STOP_STRINGS:
            raise bad_request(f"'stop' has {len(value)} strings; at most {MAX_STOP_STRINGS}",
                              "stop")
        return tuple(value)

    def token_ids(self, name: str) -> tuple[int, ...]:
        value = self._body.get(name)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(_is_int(t) for t in value):
            raise bad_request(f"'{name}' must be a list of integers", name)
        return tuple(value)

    def include_usage(self, stream: bool) -> bool:
        options = self._body.get("stream_options")
        if options is None:
            return False
        if not stream:
            raise bad_request("'stream_options' is only allowed with 'stream': true",
                              "stream_options")
        if not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object", "stream_options")
        return _Fields(options).boolean("include_usage")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """What both endpoints parse into (the prompt is added by the endpoint).

    Attributes:
      model: the requested model name (None: the served one).
      sampling: `SamplingParams` keyword arguments, all but max_tokens.
      max_tokens: most new tokens (None: the rest of the context).
      stream: answer with server-sent events.
      include_usage: streaming only: end with a usage chunk.
      logprobs: alternatives per token to report (None: no log-probabilities).
    """

    model: str | None
    sampling: Mapping[str, Any]
    max_tokens: int | None
    stream: bool
    include_usage: bool
    logprobs: int | None


def _common(body: Mapping[str, Any], fields: _Fields) -> dict[str, Any]:
    """Fields both endpoints share; refuses the OpenAI options this server does not do."""
    n = fields.integer("n", 1)
    if n != 1:
        raise bad_request(f"'n' must be 1 (got {n}); send several requests for several "
                          "samples", "n")
    if fields.get("logit_bias"):
        raise bad_request("'logit_bias' is not supported", "logit_bias")
    stream = fields.boolean("stream")
    sampling: dict[str, Any] = {
        "temperature": fields.number("temperature", 1.0),
        "top_p": fields.number("top_p", 1.0),
        "top_k": fields.integer("top_k", 0),
        "min_p": fields.number("min_p", 0.0),
        "seed": fields.integer("seed"),
        "stop": fields.stop(),
        "stop_token_ids": fields.token_ids("stop_token_ids"),
        "ignore_eos": fields.boolean("ignore_eos"),
        "skip_special_tokens": fields.boolean("skip_special_tokens", True),
        "presence_penalty": fields.number("presence_penalty", 0.0),
        "frequency_penalty": fields.number("frequency_penalty", 0.0),
        "repetition_penalty": fields.number("repetition_penalty", 1.0),
    }
    return {"model": fields.string("model"), "sampling": sampling, "stream": stream,
            "include_usage": fields.include_usage(stream)}


def parse_completion_request(
        body: Mapping[str, Any]) -> tuple[GenerationRequest, list[str | list[int]]]:
    """A /v1/completions body as a request and its prompts (one choice each)."""
    fields = _Fields(body)
    if fields.boolean("echo"):
        raise bad_request("'echo' is not supported; leave it false", "echo")
    if fields.get("suffix") is not None:
        raise bad_request("'suffix' is not supported", "suffix")
    best_of = fields.integer("best_of", 1)
    if best_of != 1:
        raise bad_request(f"'best_of' must be 1 (got {best_of})", "best_of")
    common = _common(body, fields)
    request = GenerationRequest(
        max_tokens=fields.integer("max_tokens", DEFAULT_COMPLETION_MAX_TOKENS),
        logprobs=fields.integer("logprobs"), **common)
    return request, _prompts(body.get("prompt"))


def _prompts(prompt: Any) -> list[str | list[int]]:
    """"text", [ids], ["text", ...] or [[ids], ...] as a list of prompts."""
    if prompt is None:
        raise bad_request("'prompt' is required: a string, a list of token ids, or a list of "
                          "either", "prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return [list(prompt)]
    if isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and p and all(_is_int(t) for t in p))
            for p in prompt):
        return [p if isinstance(p, str) else list(p) for p in prompt]
    raise bad_request("'prompt' must be a string, a non-empty list of token ids, or a "
                      "non-empty list of strings or of token-id lists", "prompt")


def parse_chat_request(
        body: Mapping[str, Any]) -> tuple[GenerationRequest, list[dict[str, str]]]:
    """A /v1/chat/completions body as a request and its messages (plain-text contents)."""
    fields = _Fields(body)
    if fields.get("tools"):
        raise bad_request("'tools' (function calling) is not supported", "tools")
    common = _common(body, fields)
    max_tokens = fields.integer("max_completion_tokens")
    if max_tokens is None:
        max_tokens = fields.integer("max_tokens")
    logprobs = None
    if fields.boolean("logprobs"):
        logprobs = fields.integer("top_logprobs", 0)
    elif fields.get("top_logprobs") is not None:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    request = GenerationRequest(max_tokens=max_tokens, logprobs=logprobs, **common)
    return request, _messages(body.get("messages"))


def _messages(messages: Any) -> list[dict[str, str]]:
    if messages is None:
        raise bad_request("'messages' is required: a list like [{\"role\": \"user\", "
                          "\"content\": \"Hello\"}]", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of message objects", "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object with 'role' and 'content'", "messages")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise bad_request(f"{where}.role must be a string such as \"user\"", "messages")
        if content is None:
            content = ""
        elif isinstance(content, list):  # content parts: only text ones are understood
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise bad_request(f"{where}.content: only text parts ({{\"type\": \"text\", "
                                  "\"text\": ...}) are supported", "messages")
            content = "".join(p["text"] for p in content)
        elif not isinstance(content, str):
            raise bad_request(f"{where}.content must be a string or a list of text parts",
                              "messages")
        out.append({"role": role, "content": content})
    return out


def make_sampling_params(request: GenerationRequest, max_tokens: int) -> SamplingParams:
    """The engine's `SamplingParams`; invalid values are a 400 with `InputError`'s message."""
    if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
        raise bad_request(f"log-probabilities: at most {MAX_LOGPROBS} alternatives per token "
                          f"can be returned, got {request.logprobs}", "logprobs")
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=request.logprobs,
                              **request.sampling)
    except InputError as e:
        raise bad_request(str(e)) from None


# ------------------------------------------------------------------------- responses

def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(num_prompt: int, num_output: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_output,
            "total_tokens": num_prompt + num_output}


def _top(entry: TokenLogprob, k: int) -> list[tuple[int, float]]:
    """The k likeliest alternatives, best first (the engine may return a few more)."""
    return sorted(entry.top, key=lambda t: -t[1])[:k]


def completion_logprobs(entries: Sequence[TokenLogprob], k: int, token_text: TokenText,
                        text_offset: int = 0) -> dict[str, Any]:
    """The legacy completions format: parallel lists, alternatives as {token: logprob}."""
    tokens, offsets, top = [], [], []
    for entry in entries:
        text = token_text(entry.token_id)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        alternatives = {token_text(t): lp for t, lp in _top(entry, k)}
        alternatives.setdefault(text, entry.logprob)  # the sampled token is always listed
        top.append(alternatives)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(entries: Sequence[TokenLogprob], k: int,
                  token_text: TokenText) -> dict[str, Any]:
    """The chat format: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [
        {**item(e.token_id, e.logprob),
         "top_logprobs": [item(t, lp) for t, lp in _top(e, k)]} for e in entries]}


def completion_choice(index: int, text: str, finish_reason: str | None,
                      logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_body(rid: str, created: int, model: str, choices: list[dict[str, Any]],
                    usage_: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage_}


def completion_chunk(rid: str, created: int, model: str, choices: list[dict[str, Any]],
                     usage_: dict[str, int] | None = None,
                     with_usage: bool = False) -> dict[str, Any]:
    body = {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices}
    if with_usage:  # OpenAI sends "usage": null on every chunk but the last when asked
        body["usage"] = usage_
    return body


def chat_choice(index: int, content: str, finish_reason: str | None,
                logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": content},
            "logprobs": logprobs, "finish_reason": finish_reason}


def chat_body(rid: str, created: int, model: str, choices: list[dict[str, Any]],
              usage_: dict[str, int] | None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage_}


def chat_chunk(rid: str, created: int, model: str, choices: list[dict[str, Any]],
               usage_: dict[str, int] | None = None, with_usage: bool = False) -> dict[str, Any]:
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices}
    if with_usage:  # OpenAI sends "usage": null on every chunk but the last when asked
        body["usage"] = usage_
    return body


def chat_chunk_choice(delta: dict[str, str], finish_reason: str | None = None,
                      logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def sse(data: Mapping[str, Any] | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
