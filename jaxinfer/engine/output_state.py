"""Per-request output bookkeeping (host side): detokenize, apply stop rules, build deltas."""

from __future__ import annotations

import dataclasses

from jaxinfer.engine.outputs import RequestDelta, TokenLogprob
from jaxinfer.sampling import SamplingParams
from jaxinfer.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclasses.dataclass
class OutputState:
    """Text produced so far for one request, and what has been reported.

    Stop strings are searched in the text; text that could still become the start of a stop
    string is held back until it is decided, so a client never sees a stop string.
    """

    request_id: str
    params: SamplingParams
    stop_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer
    num_prompt_tokens: int
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None
    pending_tokens: list[int] = dataclasses.field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    num_output_tokens: int = 0

    @classmethod
    def create(cls, request_id: str, prompt_ids: list[int], params: SamplingParams,
               tokenizer: Tokenizer, eos_ids: frozenset[int]) -> OutputState:
        stop_ids = frozenset() if params.ignore_eos else eos_ids
        return cls(request_id=request_id, params=params,
                   stop_ids=stop_ids | frozenset(params.stop_token_ids),
                   detokenizer=IncrementalDetokenizer(
                       tokenizer, list(prompt_ids),
                       skip_special_tokens=params.skip_special_tokens),
                   num_prompt_tokens=len(prompt_ids))

    def add_token(self, token: int, at_length_limit: bool,
                  logprob: TokenLogprob | None = None) -> str | None:
        """Account for one new token; returns the finish reason when it ends the request."""
        self.num_output_tokens += 1
        self.pending_tokens.append(token)
        if logprob is not None:
            self.pending_logprobs.append(logprob)
        stops = self.params.stop
        if token in self.stop_ids:
            self.finish_reason = "stop"
            self.text += self.detokenizer.flush()  # text held for an unfinished character
            return self.finish_reason
        self.text += self.detokenizer.add(token)
        if at_length_limit:
            self.finish_reason = "length"
            self.text += self.detokenizer.flush()
        if stops:
            search_from = max(0, self.emitted - max(map(len, stops)))
            hits = [i for s in stops if (i := self.text.find(s, search_from)) >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.finish_reason = "stop"
        return self.finish_reason

    def take_delta(self, num_cached_tokens: int = 0, aborted: bool = False) -> RequestDelta:
        """Everything new since the last delta (text withheld while a stop may be forming)."""
        if aborted and not self.finish_reason:
            self.finish_reason = "abort"
        finished = self.finish_reason is not None
        stops = self.params.stop
        hold = 0 if finished or not stops else max(map(len, stops)) - 1
        upto = max(self.emitted, len(self.text) - hold)
        text = self.text[self.emitted:upto]
        self.emitted = upto
        delta = RequestDelta(
            request_id=self.request_id, text=text, token_ids=tuple(self.pending_tokens),
            logprobs=(tuple(self.pending_logprobs) if self.params.logprobs is not None
                      else None),
            finished=finished, finish_reason=self.finish_reason,
            num_prompt_tokens=self.num_prompt_tokens, num_output_tokens=self.num_output_tokens,
            num_cached_tokens=num_cached_tokens)
        self.pending_tokens, self.pending_logprobs = [], []
        return delta
