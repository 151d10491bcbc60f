"""The engine core: scheduler + runner + output processing, one synchronous `step()` at a time.

Each step the scheduler spends a token budget (decodes first, then prefill chunks: no
request ever waits for another's prompt), the runner executes it as one compiled program
with the cache donated, and each request's new token is checked against its stop rules.
`jaxinfer.engine.engine.Engine` drives this on a thread for the server; `jaxinfer.LLM`
drives it directly for offline batches.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxinfer.batch import build_step_batch
from jaxinfer.cache.paged import kv_bytes_per_token
from jaxinfer.config import ModelConfig
from jaxinfer.engine.output_state import OutputState
from jaxinfer.engine.outputs import EngineStats, RequestDelta, TokenLogprob
from jaxinfer.engine.request import Request, RequestStatus, is_length_limited
from jaxinfer.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from jaxinfer.errors import InputError
from jaxinfer.model.params import Params
from jaxinfer.runner import ModelRunner
from jaxinfer.sampling import SamplingParams, pack_sampling, resolve_seed
from jaxinfer.tokenizer import Tokenizer

OutputCallback = Callable[[RequestDelta], None]


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine limits and policies.

    Attributes:
      max_num_seqs: most requests running at once.
      max_num_batched_tokens: token budget of one step (decodes + prefill chunks).
      long_prefill_chunk: most prompt tokens one request computes per step.
      max_model_len: longest prompt + output (default: the model's context).
      kv_cache_tokens: KV pool size in tokens (default: 1 GiB worth, at least one
        full-length sequence).
      page_size: tokens per KV page. Setting it to max_model_len gives vAttention's
        contiguous per-slot layout with the same engine.
      enable_prefix_caching: share the KV of equal prompt prefixes between requests.
      enable_chunked_prefill: split prompts across steps beside decodes (Sarathi-Serve).
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    long_prefill_chunk: int = 512
    max_model_len: int | None = None
    kv_cache_tokens: int | None = None
    page_size: int = 16
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "long_prefill_chunk",
                     "max_model_len", "kv_cache_tokens", "page_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise InputError(f"invalid engine option {name}={value!r}: must be an "
                                 "integer >= 1")

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=min(self.max_num_seqs, self.max_num_batched_tokens),
            long_prefill_chunk=self.long_prefill_chunk,
            enable_chunked_prefill=self.enable_chunked_prefill,
            enable_prefix_caching=self.enable_prefix_caching)


@dataclasses.dataclass
class _Tracked:
    request: Request
    output: OutputState
    seed: int
    on_output: OutputCallback | None
    arrival: float
    first_token_at: float | None = None


class EngineCore:
    """Continuous batching over a paged KV cache, stepped by the caller."""

    def __init__(self, params: Params, cfg: ModelConfig, tokenizer: Tokenizer,
                 config: EngineConfig | None = None, *, mesh: Any = None,
                 sharding_rules: Any = None):
        self.config = config = config or EngineConfig()
        self.cfg = cfg
        self.tokenizer = tokenizer
        if config.max_model_len and config.max_model_len > cfg.max_position_embeddings:
            raise InputError(f"max_model_len={config.max_model_len} exceeds the model's "
                             f"context of {cfg.max_position_embeddings} tokens")
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        tokens = config.kv_cache_tokens or max(
            self.max_model_len, (1 << 30) // kv_bytes_per_token(cfg))
        self.page_size = config.page_size
        self.num_pages = -(-tokens // self.page_size)
        self.runner = ModelRunner(params, cfg, num_pages=self.num_pages, page_size=self.page_size,
                                  mesh=mesh, rules=sharding_rules)
        self.scheduler = Scheduler(config.scheduler_config(), self.num_pages, self.page_size)
        self.eos_ids = frozenset(tokenizer.stop_token_ids) | frozenset(cfg.eos_token_ids)
        self._tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()
        # Several processes (jax.distributed) run the same requests in the same order and
        # must sample the same tokens: unseeded requests draw from one generator whose seed
        # process 0 broadcasts (a per-process random seed would silently diverge).
        self._seed_source: random.Random | None = None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            base = multihost_utils.broadcast_one_to_all(np.uint32(secrets.randbits(32)))
            self._seed_source = random.Random(int(base))
        self.steps = 0
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.num_preemptions = 0

    # ------------------------------------------------------------------ requests
    def validate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 label: str = "the prompt") -> int:
        """Check a request; returns its max new tokens (capped to the context).

        Raises:
          InputError: empty prompt, ids outside the vocabulary, prompt over the context
            (messages start with `label`).
        """
        if not isinstance(params, SamplingParams):
            raise InputError("sampling_params must be a jaxinfer.SamplingParams")
        if len(prompt_ids) == 0:
            raise InputError(f"{label} is empty; give at least one token")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.cfg.vocab_size:
            raise InputError(
                f"{label} has token ids outside the vocabulary [0, {self.cfg.vocab_size})")
        if len(prompt_ids) >= self.max_model_len:
            raise InputError(
                f"{label} has {len(prompt_ids)} tokens but the context holds "
                f"{self.max_model_len} (prompt + output); shorten the prompt")
        return min(params.max_tokens, self.max_model_len - len(prompt_ids))

    def _seed_for(self, params: SamplingParams) -> int:
        if params.seed is None and self._seed_source is not None:
            return self._seed_source.getrandbits(32)
        return resolve_seed(params)

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams,
                    request_id: str | None = None, on_output: OutputCallback | None = None,
                    priority: int = 0, arrival_time: float | None = None) -> str:
        """Queue a request; `on_output` receives its deltas as `step()` produces them.

        Raises:
          InputError: see `validate`; or the id is in use.
          CapacityError: the request could never fit in the KV cache.
        """
        prompt = [int(t) for t in prompt_ids]
        max_new = self.validate(prompt, params)
        request_id = request_id or f"req-{next(self._ids)}"
        arrival = time.perf_counter() if arrival_time is None else arrival_time
        request = Request(request_id=request_id, prompt_token_ids=prompt,
                          sampling_params=params, arrival_time=arrival,
                          max_new_tokens=max_new, priority=priority)
        self.scheduler.add_request(request)
        self._tracked[request_id] = _Tracked(
            request=request, seed=self._seed_for(params), on_output=on_output, arrival=arrival,
            output=OutputState.create(request_id, prompt, params, self.tokenizer,
                                      self.eos_ids))
        return request_id

    def abort(self, request_id: str) -> bool:
        """Abort a request in any state (frees its pages); its final delta says "abort"."""
        tracked = self._tracked.pop(request_id, None)
        if tracked is None or not self.scheduler.abort_request(request_id):
            return False
        self._emit(tracked, tracked.output.take_delta(aborted=True))
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def reset_prefix_cache(self) -> int:
        """Drop all cached, unreferenced KV pages; returns how many were dropped."""
        return self.scheduler.allocator.reset_prefix_cache()

    def request(self, request_id: str) -> Request | None:
        """The live request with this id (None once finished or aborted)."""
        tracked = self._tracked.get(request_id)
        return None if tracked is None else tracked.request

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_pages_in_use=self.scheduler.kv_pages_in_use, kv_pages_total=self.num_pages,
            prefix_cache_hit_rate=self.scheduler.prefix_cache_hit_rate,
            num_preemptions=self.num_preemptions, steps=self.steps,
            generated_tokens=self.generated_tokens, prompt_tokens=self.prompt_tokens)

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestDelta]:
        """Run one step; returns (and sends to callbacks) the deltas it produced."""
        out = self.scheduler.schedule()
        self.num_preemptions += len(out.preempted)
        if out.is_empty:
            return []
        tokens, logprobs = self._execute(out)
        sampled = {entry.request_id: int(tokens[i])
                   for i, entry in enumerate(out.scheduled) if entry.samples}
        self.steps += 1
        self.prompt_tokens += sum(
            max(0, min(e.start + len(e.token_ids), e.request.num_prompt_tokens) - e.start)
            for e in out.scheduled)
        deltas = []
        for request in self.scheduler.update(out, sampled):
            tracked = self._tracked[request.request_id]
            if tracked.first_token_at is None:
                tracked.first_token_at = time.perf_counter()
            token = request.output_token_ids[-1]
            self.generated_tokens += 1
            reason = tracked.output.add_token(token, is_length_limited(request),
                                              logprobs.get(request.request_id))
            if reason is not None:
                status = (RequestStatus.FINISHED_LENGTH if reason == "length"
                          else RequestStatus.FINISHED_STOPPED)
                self.scheduler.finish_request(request.request_id, status)
                del self._tracked[request.request_id]
            delta = tracked.output.take_delta(num_cached_tokens=request.num_cached_tokens)
            if delta.text or delta.token_ids or delta.finished:
                deltas.append(delta)
                self._emit(tracked, delta)
        return deltas

    def _execute(self, out: SchedulerOutput) -> tuple[np.ndarray, dict[str, TokenLogprob]]:
        """Run the step on the device; returns each entry's token and requested logprobs."""
        entries = out.scheduled
        batch = build_step_batch(out.to_sequence_chunks(), page_size=self.page_size,
                                 num_slots=self.runner.num_slots, page_copies=out.page_copies)
        requests = [entry.request for entry in entries]
        params = [r.sampling_params for r in requests]
        histories = None
        if any(p.uses_penalties for p in params):
            histories = [(r.prompt_token_ids, r.output_token_ids) for r in requests]
        sampling = pack_sampling(
            params, [self._tracked[r.request_id].seed for r in requests],
            [r.num_output_tokens for r in requests], len(batch.kv_lens), batch.seq_index,
            histories=histories, vocab_size=self.cfg.vocab_size)
        device_tokens = self.runner.step(batch, sampling)
        tokens = np.asarray(device_tokens)[batch.seq_index]
        logprobs: dict[str, TokenLogprob] = {}
        if self.runner.last_packed is not None:
            packed = np.asarray(self.runner.last_packed)[batch.seq_index]
            k = (packed.shape[1] - 2) // 2
            for row, entry in zip(packed, entries, strict=True):
                want = entry.request.sampling_params.logprobs
                if entry.samples and want is not None:
                    top = tuple((int(row[2 + j]), float(row[2 + k + j])) for j in range(want))
                    logprobs[entry.request_id] = TokenLogprob(int(row[0]), float(row[1]), top)
        return tokens, logprobs

    def _emit(self, tracked: _Tracked, delta: RequestDelta) -> None:
        if tracked.on_output is not None:
            tracked.on_output(delta)
