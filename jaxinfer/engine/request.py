"""The host state of one generation request (host side, never imports jax).

A request's known tokens are its prompt followed by its output; `num_computed_tokens` of them
have their keys and values in the KV cache. The scheduler's only job is to close that gap.
"""

from __future__ import annotations

import dataclasses
import enum

from jaxinfer.errors import InputError
from jaxinfer.sampling import SamplingParams


class RequestStatus(enum.Enum):
    """Where a request is in its life: waiting, running, preempted, or finished (3 ways)."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again after its pages were taken; recomputes on return
    FINISHED_STOPPED = "finished_stopped"  # end-of-sequence token or stop string
    FINISHED_LENGTH = "finished_length"  # max_new_tokens reached
    FINISHED_ABORTED = "finished_aborted"  # cancelled by the caller

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset(
    {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED})


# eq=False: two requests with equal fields are still two requests (identity semantics).
@dataclasses.dataclass(eq=False)
class Request:
    """Mutable host state of one request.

    Attributes:
      request_id: unique among unfinished requests.
      prompt_token_ids: the prompt (at least one token).
      sampling_params: how to sample; the scheduler does not read it.
      arrival_time: seconds (any clock); orders requests of equal priority.
      max_new_tokens: most output tokens, already capped by the caller to the context.
      output_token_ids: tokens generated so far.
      num_computed_tokens: leading tokens of `all_token_ids` whose KV is in the cache.
      status: see `RequestStatus`.
      priority: lower is admitted first.
      num_cached_tokens: prompt tokens served from the prefix cache (or a shared prefix) at
        first admission, for metrics.
      num_preemptions: times this request lost its pages and had to recompute.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    max_new_tokens: int
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    priority: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        self.prompt_token_ids = [int(t) for t in self.prompt_token_ids]
        self.output_token_ids = [int(t) for t in self.output_token_ids]
        if not self.prompt_token_ids:
            raise InputError(f"request {self.request_id!r} has an empty prompt; give a token")
        if (not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool)
                or self.max_new_tokens < 1):
            raise InputError(f"request {self.request_id!r} has max_new_tokens="
                             f"{self.max_new_tokens!r}; it must be an integer >= 1")

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by output (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    def slice_token_ids(self, start: int, end: int) -> list[int]:
        """`all_token_ids[start:end]` without copying the whole sequence."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - num_prompt]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Known tokens: prompt + output."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_to_compute(self) -> int:
        """Known tokens whose KV is not yet cached.

        The rest of the prompt while prefilling, 1 while decoding (the last sampled token),
        and everything known after a preemption (recompute).
        """
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """More than one token to compute: a prompt (or a recompute) is in progress."""
        return self.num_tokens_to_compute > 1


def is_length_limited(request: Request) -> bool:
    """Whether `request` has produced `max_new_tokens` tokens and must be finished."""
    return len(request.output_token_ids) >= request.max_new_tokens
