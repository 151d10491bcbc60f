"""What the engine reports back: per-request deltas as tokens are produced, and engine stats."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability, with the most likely alternatives at that position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class RequestDelta:
    """New output of one request since its previous delta (the engine thread sends these).

    Attributes:
      request_id: the request.
      text: new text (stop strings excluded; held back while it may start a stop string).
      token_ids: new output token ids.
      logprobs: one entry per new token when the request asked for log-probabilities.
      finished: this is the request's last delta.
      finish_reason: "stop" (EOS or stop string), "length", or "abort" when finished.
      num_prompt_tokens, num_output_tokens: totals so far (for usage accounting).
      num_cached_tokens: prompt tokens served from the prefix cache.
      error: a message when the request failed inside the engine (finished is then True).
    """

    request_id: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A snapshot for /metrics and /health."""

    num_running: int
    num_waiting: int
    kv_pages_in_use: int
    kv_pages_total: int
    prefix_cache_hit_rate: float
    num_preemptions: int
    steps: int
    generated_tokens: int
    prompt_tokens: int
