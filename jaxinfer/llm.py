"""`LLM`: load a model and generate text for a list of prompts (the Python API).

Requests are admitted while KV pages last; each step either prefills prompt chunks (packed
up to a token budget) or decodes one token for every running request. Decode steps are
dispatched before the previous step's tokens reach the host, so the host's stop checks and
detokenization overlap device work.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxinfer.batch import SequenceChunk, bucket, build_step_batch
from jaxinfer.cache.paged import kv_bytes_per_token
from jaxinfer.config import ModelConfig
from jaxinfer.errors import CapacityError, InputError
from jaxinfer.model.params import Params
from jaxinfer.runner import CompileStats, ModelRunner
from jaxinfer.sampling import SamplingParams, pack_sampling, resolve_seed
from jaxinfer.tokenizer import IncrementalDetokenizer, Tokenizer
from jaxinfer.weights.loader import load_model

TextCallback = Callable[[int, str], None]
Prompt = str | Sequence[int]


@dataclasses.dataclass
class RequestOutput:
    """The result of one prompt.

    Attributes:
      index: position of the prompt in the `generate` call.
      prompt: the prompt text (None when token ids were given).
      prompt_token_ids: the tokens the model saw.
      text: generated text (stop string and end-of-sequence token excluded).
      token_ids: generated tokens (an end-of-sequence token included).
      finish_reason: "stop" (EOS or stop string) or "length" (max_tokens or context).
      ttft_s: seconds from the call to the first token (compilation excluded).
      decode_s: seconds from the first to the last token (compilation excluded).
    """

    index: int
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    ttft_s: float
    decode_s: float


@dataclasses.dataclass
class GenerateStats:
    """Totals of the last `generate` call."""

    wall_s: float = 0.0
    compile_s: float = 0.0
    programs_compiled: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0


@dataclasses.dataclass
class _Request:
    index: int
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    max_new: int
    stop_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer
    pages: list[int] = dataclasses.field(default_factory=list)
    generated: list[int] = dataclasses.field(default_factory=list)
    num_scheduled: int = 0  # tokens whose KV is written once every dispatched step ran
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None
    first_token_at: float = 0.0
    finished_at: float = 0.0


class LLM:
    """A loaded model ready to generate.

    Args:
      params, cfg, tokenizer: the model (see `jaxinfer.load`).
      max_model_len: longest sequence (prompt + output); defaults to the model's context.
      page_size: tokens per KV page.
      kv_cache_tokens: KV pool size in tokens; defaults to 1 GiB worth, and at least one
        full-length sequence.
      max_num_seqs: most sequences decoded together.
      max_num_batched_tokens: token budget of one prefill step (a power of two).
    """

    def __init__(
        self,
        params: Params,
        cfg: ModelConfig,
        tokenizer: Tokenizer,
        *,
        max_model_len: int | None = None,
        page_size: int = 16,
        kv_cache_tokens: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
    ):
        for name, value in (("page_size", page_size), ("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens),
                            ("max_model_len", max_model_len),
                            ("kv_cache_tokens", kv_cache_tokens)):
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise InputError(f"invalid LLM option {name}={value!r}: must be an integer >= 1"
                                 + (" (or None for the default)"
                                    if name in ("max_model_len", "kv_cache_tokens") else ""))
        self.cfg = cfg
        self.tokenizer = tokenizer
        if max_model_len is not None and max_model_len > cfg.max_position_embeddings:
            raise InputError(
                f"max_model_len={max_model_len} exceeds the model's context of "
                f"{cfg.max_position_embeddings} tokens")
        self.max_model_len = int(max_model_len or cfg.max_position_embeddings)
        if kv_cache_tokens is None:
            kv_cache_tokens = max(self.max_model_len, (1 << 30) // kv_bytes_per_token(cfg))
        self.page_size = page_size
        self.num_pages = -(-kv_cache_tokens // page_size)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = bucket(max_num_batched_tokens)
        self.runner = ModelRunner(params, cfg, num_pages=self.num_pages, page_size=page_size)
        self._free_pages = list(range(self.num_pages))
        self.last_stats = GenerateStats()

    @property
    def params(self) -> Params:
        return self.runner.params

    @property
    def compile_stats(self) -> CompileStats:
        return self.runner.compile_stats

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        on_text: TextCallback | None = None,
    ) -> list[RequestOutput]:
        """Generate a completion for each prompt.

        Args:
          prompts: a string, a list of token ids, or a list of either.
          sampling_params: one for all prompts or one per prompt (default: greedy, 256 tokens).
          on_text: called as `on_text(prompt_index, text_delta)` while text is produced.

        Raises:
          InputError: a prompt is empty or longer than the context, or parameters are invalid.
          CapacityError: a request can never fit in the KV cache.
        """
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts
            and isinstance(prompts[0], (int, np.integer))
        ):
            prompts = [prompts]  # type: ignore[list-item]
        encoded = []
        for p in prompts:  # type: ignore[union-attr]
            if isinstance(p, str):
                encoded.append((p, self.tokenizer.encode(p)))
            else:
                encoded.append((None, [int(t) for t in p]))
        return self._generate(encoded, sampling_params, on_text)

    def chat(
        self,
        conversations: Sequence[dict[str, str]] | Sequence[Sequence[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        on_text: TextCallback | None = None,
    ) -> list[RequestOutput]:
        """Like `generate`, for chat conversations rendered with the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        encoded = []
        for messages in conversations:
            text = self.tokenizer.apply_chat_template(list(messages))  # type: ignore[arg-type]
            encoded.append((text, self.tokenizer.encode_chat(list(messages))))  # type: ignore
        return self._generate(encoded, sampling_params, on_text)

    # ------------------------------------------------------------------ internals
    def _make_requests(
        self, encoded: list[tuple[str | None, list[int]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
    ) -> list[_Request]:
        if sampling_params is None:
            sampling_params = SamplingParams(temperature=0.0)
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(encoded)
        if len(sampling_params) != len(encoded):
            raise InputError(
                f"got {len(sampling_params)} sampling parameters for {len(encoded)} prompts; "
                "pass one for all or one per prompt")
        requests = []
        for i, ((text, ids), sp) in enumerate(zip(encoded, sampling_params, strict=True)):
            if not ids:
                raise InputError(f"prompt {i} is empty; give at least one token")
            if max(ids) >= self.cfg.vocab_size or min(ids) < 0:
                raise InputError(
                    f"prompt {i} has token ids outside the vocabulary [0, {self.cfg.vocab_size})")
            if len(ids) >= self.max_model_len:
                raise InputError(
                    f"prompt {i} has {len(ids)} tokens but the context holds "
                    f"{self.max_model_len} (prompt + output); shorten the prompt"
                    + ("" if self.max_model_len == self.cfg.max_position_embeddings else
                       f" or raise max_model_len (up to {self.cfg.max_position_embeddings})"))
            max_new = min(sp.max_tokens, self.max_model_len - len(ids))
            need = -(-(len(ids) + max_new) // self.page_size)
            if need > self.num_pages:
                raise CapacityError(
                    f"prompt {i} needs {need * self.page_size} tokens of KV cache but the pool "
                    f"holds {self.num_pages * self.page_size}; raise kv_cache_tokens or lower "
                    "max_tokens")
            stop_ids = frozenset() if sp.ignore_eos else (
                frozenset(self.tokenizer.stop_token_ids) | frozenset(self.cfg.eos_token_ids))
            stop_ids = stop_ids | frozenset(sp.stop_token_ids)
            requests.append(_Request(
                index=i, prompt=text, prompt_ids=list(ids), params=sp, seed=resolve_seed(sp),
                max_new=max_new, stop_ids=stop_ids,
                detokenizer=IncrementalDetokenizer(
                    self.tokenizer, list(ids), skip_special_tokens=sp.skip_special_tokens),
            ))
        return requests

    def _clock(self) -> float:
        """Wall time that stands still while programs compile."""
        return time.perf_counter() - self.runner.compile_stats.seconds

    def _generate(
        self, encoded: list[tuple[str | None, list[int]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        on_text: TextCallback | None,
    ) -> list[RequestOutput]:
        requests = self._make_requests(encoded, sampling_params)
        stats = GenerateStats(prompt_tokens=sum(len(r.prompt_ids) for r in requests))
        compile_before = (self.compile_stats.seconds, self.compile_stats.programs)
        wall_start = time.perf_counter()
        start = self._clock()
        try:
            self._run(requests, on_text, stats)
        finally:
            for r in requests:  # never leak pages, even when interrupted
                self._release(r)
        stats.wall_s = time.perf_counter() - wall_start
        stats.compile_s = self.compile_stats.seconds - compile_before[0]
        stats.programs_compiled = self.compile_stats.programs - compile_before[1]
        stats.generated_tokens = sum(len(r.generated) for r in requests)
        self.last_stats = stats
        return [
            RequestOutput(
                index=r.index, prompt=r.prompt, prompt_token_ids=r.prompt_ids, text=r.text,
                token_ids=list(r.generated), finish_reason=r.finish_reason or "length",
                ttft_s=r.first_token_at - start, decode_s=r.finished_at - r.first_token_at)
            for r in requests
        ]

    def _pages_needed(self, r: _Request) -> int:
        return -(-(len(r.prompt_ids) + r.max_new) // self.page_size)

    def _admissible(self, r: _Request, running: list[_Request]) -> bool:
        """A request is admitted when a sequence slot and all its pages are free."""
        return (len(running) < self.max_num_seqs
                and self._pages_needed(r) <= len(self._free_pages))

    def _release(self, r: _Request) -> None:
        self._free_pages.extend(r.pages)
        r.pages = []

    def _run(self, requests: list[_Request], on_text: TextCallback | None,
             stats: GenerateStats) -> None:
        waiting = collections.deque(requests)
        running: list[_Request] = []
        pending: tuple[jax.Array, list[_Request]] | None = None
        while waiting or running or pending:
            if pending is None:
                for r in [r for r in running if r.finish_reason]:
                    running.remove(r)
                    self._release(r)
            while waiting and self._admissible(waiting[0], running):
                r = waiting.popleft()
                r.pages = [self._free_pages.pop() for _ in range(self._pages_needed(r))]
                running.append(r)
            active = [r for r in running if not r.finish_reason]
            prefill = [r for r in active if r.num_scheduled < len(r.prompt_ids)]
            if pending is not None:
                reqs = pending[1]
                # Keep dispatching ahead while the batch cannot change: nobody to admit, no
                # prompt to prefill, and every request needs at least one more token.
                can_pipeline = (
                    not prefill and reqs == active
                    and not (waiting and self._admissible(waiting[0], running))
                    and all(len(r.generated) + 1 < r.max_new for r in reqs))
                if not can_pipeline:
                    self._accept_all(pending, on_text)
                    pending = None
                    continue
                out, _ = self._dispatch(reqs, [0] * len(reqs), stats, tokens=pending[0])
                self._accept_all(pending, on_text)
                pending = (out, reqs)
            elif prefill:
                self._prefill(prefill, on_text, stats)
            elif active:
                out, _ = self._dispatch(active, [r.generated[-1] for r in active], stats)
                pending = (out, active)  # decode-only: sequence slot i is request i
            elif waiting and not running:
                raise CapacityError("the KV cache cannot hold the next request")

    def _prefill(self, prefill: list[_Request], on_text: TextCallback | None,
                 stats: GenerateStats) -> None:
        # Whole prompts are packed while they fit, so most steps start every sequence at
        # position 0 (prefix-free: attention reads no pages). A prompt is split only when it
        # alone exceeds the budget; its later chunks then run alone.
        budget = self.max_num_batched_tokens
        chunks, reqs = [], []
        for r in prefill:
            remaining = len(r.prompt_ids) - r.num_scheduled
            if chunks and remaining > budget:
                break
            n = min(remaining, budget)
            chunks.append(r.prompt_ids[r.num_scheduled:r.num_scheduled + n])
            reqs.append(r)
            budget -= n
            if budget == 0 or r.num_scheduled > 0:
                break
        out, slots = self._dispatch(reqs, chunks, stats)
        tokens = np.asarray(out)[slots]
        for r, token in zip(reqs, tokens, strict=True):
            if r.num_scheduled == len(r.prompt_ids):
                self._accept(r, int(token), on_text)

    def _dispatch(self, reqs: list[_Request], new_tokens: list[Any], stats: GenerateStats,
                  tokens: jax.Array | None = None) -> tuple[jax.Array, np.ndarray]:
        """Build and launch one step; advances each request's `num_scheduled`.

        Returns the device tokens [S] and each request's sequence slot in them.
        """
        chunks = []
        for r, toks in zip(reqs, new_tokens, strict=True):
            toks = toks if isinstance(toks, list) else [toks]
            chunks.append(SequenceChunk(toks, r.num_scheduled, r.pages))
            r.num_scheduled += len(toks)
        step = build_step_batch(chunks, page_size=self.page_size,
                                num_slots=self.runner.num_slots)
        # The token sampled now is output token number num_scheduled - prompt length; it
        # seeds the draw, so sampled output does not depend on how steps were batched.
        sampling = pack_sampling(
            [r.params for r in reqs], [r.seed for r in reqs],
            [max(r.num_scheduled - len(r.prompt_ids), 0) for r in reqs], len(step.kv_lens),
            step.seq_index)
        stats.steps += 1
        return self.runner.step(step, sampling, tokens), step.seq_index

    def _accept_all(self, pending: tuple[jax.Array, list[_Request]],
                    on_text: TextCallback | None) -> None:
        tokens = np.asarray(pending[0])
        for r, token in zip(pending[1], tokens, strict=False):
            if not r.finish_reason:
                self._accept(r, int(token), on_text)

    def _accept(self, r: _Request, token: int, on_text: TextCallback | None) -> None:
        now = self._clock()
        if not r.generated:
            r.first_token_at = now
        r.generated.append(token)
        stop_strings = r.params.stop
        if token in r.stop_ids:
            r.finish_reason = "stop"
            r.text += r.detokenizer.flush()  # text held back for an unfinished character
        else:
            r.text += r.detokenizer.add(token)
            if len(r.generated) >= r.max_new:
                r.finish_reason = "length"
                r.text += r.detokenizer.flush()
            if stop_strings:
                search_from = max(0, r.emitted - max(map(len, stop_strings)))
                hits = [i for s in stop_strings if (i := r.text.find(s, search_from)) >= 0]
                if hits:
                    r.text = r.text[:min(hits)]
                    r.finish_reason = "stop"
        if r.finish_reason:
            r.finished_at = now
        # Hold back a possible stop string's prefix until it is decided.
        hold = 0 if r.finish_reason or not stop_strings else max(map(len, stop_strings)) - 1
        upto = max(r.emitted, len(r.text) - hold)
        if on_text is not None and upto > r.emitted:
            on_text(r.index, r.text[r.emitted:upto])
        r.emitted = upto


def load(
    model: str | os.PathLike[str] | None = None, *, dtype: str = "float32",
    progress: bool = True, **llm_options: Any,
) -> LLM:
    """Load a model (GGUF file, HF folder, `checkpoints/` name; None: SmolLM2-135M-Instruct).

    Args:
      model: where the model is.
      dtype: "float32" (fastest on CPU) or "bfloat16".
      progress: show a progress bar while loading.
      **llm_options: `LLM` options (max_model_len, page_size, kv_cache_tokens, ...), and
        `attention_impl`.
    """
    overrides = {k: llm_options.pop(k) for k in ("attention_impl", "matmul_impl")
                 if k in llm_options}
    loaded = load_model(model, dtype=dtype, progress=progress, **overrides)
    return LLM(loaded.params, loaded.cfg, loaded.tokenizer, **llm_options)
