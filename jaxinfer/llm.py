"""`LLM`: load a model and generate text for a list of prompts (the Python API).

An offline batch runs on the serving engine's core (continuous batching, chunked prefill,
prefix caching) after BatchLLM-style planning: the batch is looked at as a whole, prompts
sharing a prefix compute it once, and requests with longer outputs start first.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.engine.core import EngineConfig, EngineCore
from jaxinfer.engine.offline import plan_batch
from jaxinfer.engine.outputs import RequestDelta, TokenLogprob
from jaxinfer.errors import CapacityError, InputError
from jaxinfer.model.params import Params
from jaxinfer.parallel.sharding import ShardingRules
from jaxinfer.runner import CompileStats
from jaxinfer.sampling import SamplingParams
from jaxinfer.tokenizer import Tokenizer
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
      logprobs: per token, when the sampling parameters asked for them.
      num_cached_tokens: prompt tokens whose KV was reused (prefix cache or shared prefix).
    """

    index: int
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    ttft_s: float
    decode_s: float
    logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0


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
class _Collected:
    """What `generate` gathers for one request from its deltas."""

    index: int
    prompt: str | None
    prompt_ids: list[int]
    text: list[str] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    first_token_at: float | None = None
    finished_at: float = 0.0
    num_cached_tokens: int = 0


class LLM:
    """A loaded model ready to generate.

    Args:
      params, cfg, tokenizer: the model (see `jaxinfer.load`).
      max_model_len: longest sequence (prompt + output); defaults to the model's context.
      page_size: tokens per KV page.
      kv_cache_tokens: KV pool size in tokens; defaults to 1 GiB worth, and at least one
        full-length sequence.
      max_num_seqs: most sequences decoded together.
      max_num_batched_tokens: token budget of one step.
      enable_prefix_caching: reuse the KV of equal prompt prefixes.
      enable_chunked_prefill: split long prompts across steps beside decodes.
      mesh: run tensor/data parallel over this mesh (`jaxinfer.parallel.make_mesh`); weights
        and the KV cache are placed with `sharding_rules` (default `ShardingRules()`).
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
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        mesh: jax.sharding.Mesh | None = None,
        sharding_rules: ShardingRules | None = None,
    ):
        self.config = EngineConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            long_prefill_chunk=max_num_batched_tokens, max_model_len=max_model_len,
            kv_cache_tokens=kv_cache_tokens, page_size=page_size,
            enable_prefix_caching=enable_prefix_caching,
            enable_chunked_prefill=enable_chunked_prefill)
        self.core = EngineCore(params, cfg, tokenizer, self.config, mesh=mesh,
                               sharding_rules=sharding_rules)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_model_len = self.core.max_model_len
        self.last_stats = GenerateStats()

    @property
    def params(self) -> Params:
        return self.core.runner.params

    def reset_prefix_cache(self) -> int:
        """Forget the KV cached from earlier calls (the next call recomputes every prompt)."""
        return self.core.reset_prefix_cache()

    @property
    def num_pages(self) -> int:
        """Pages in the KV pool."""
        return self.core.num_pages

    @property
    def compile_stats(self) -> CompileStats:
        return self.core.runner.compile_stats

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
    def _clock(self) -> float:
        """Wall time that stands still while programs compile."""
        return time.perf_counter() - self.compile_stats.seconds

    def _generate(
        self, encoded: list[tuple[str | None, list[int]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        on_text: TextCallback | None,
    ) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams(temperature=0.0)
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(encoded)
        if len(sampling_params) != len(encoded):
            raise InputError(
                f"got {len(sampling_params)} sampling parameters for {len(encoded)} prompts; "
                "pass one for all or one per prompt")
        # Validate everything before anything is queued: a bad prompt leaves no trace.
        max_new = []
        for i, ((_, ids), params) in enumerate(zip(encoded, sampling_params, strict=True)):
            max_new.append(self.core.validate(ids, params, label=f"prompt {i}"))
            capacity = self.core.num_pages * self.core.page_size
            if len(ids) + max_new[-1] - 1 > capacity:  # the last token is never computed
                raise CapacityError(
                    f"prompt {i} needs {len(ids) + max_new[-1] - 1} tokens of KV cache but the "
                    f"pool holds {capacity}; raise kv_cache_tokens or lower max_tokens")
        collected = [_Collected(i, text, ids) for i, (text, ids) in enumerate(encoded)]
        stats = GenerateStats(prompt_tokens=sum(len(ids) for _, ids in encoded))
        compile_before = (self.compile_stats.seconds, self.compile_stats.programs)
        steps_before = self.core.steps
        wall_start = time.perf_counter()
        start = self._clock()
        plan = plan_batch([ids for _, ids in encoded], max_new, self.core.page_size,
                          share_prefixes=self.config.enable_prefix_caching)
        ids = {p.index: f"gen-{p.index}-{id(collected)}" for p in plan}
        held = [p for p in plan if p.leader is not None]
        try:
            for order, p in enumerate(plan):
                if p.leader is None:
                    self._submit(p.index, ids[p.index], encoded, sampling_params, collected,
                                 on_text, order)
            while self.core.has_unfinished() or held:
                held = self._release_followers(held, ids, encoded, sampling_params, collected,
                                               on_text, plan)
                if self.core.has_unfinished():
                    self.core.step()
        finally:
            for request_id in ids.values():  # interrupted: free every page we hold
                self.core.abort(request_id)
        stats.wall_s = time.perf_counter() - wall_start
        stats.compile_s = self.compile_stats.seconds - compile_before[0]
        stats.programs_compiled = self.compile_stats.programs - compile_before[1]
        stats.generated_tokens = sum(len(c.token_ids) for c in collected)
        stats.steps = self.core.steps - steps_before
        self.last_stats = stats
        return [
            RequestOutput(
                index=c.index, prompt=c.prompt, prompt_token_ids=c.prompt_ids,
                text="".join(c.text), token_ids=c.token_ids,
                finish_reason=c.finish_reason or "length",
                ttft_s=(c.first_token_at or start) - start,
                decode_s=c.finished_at - (c.first_token_at or c.finished_at),
                logprobs=c.logprobs, num_cached_tokens=c.num_cached_tokens)
            for c in collected
        ]

    def _submit(self, index: int, request_id: str, encoded: list[tuple[str | None, list[int]]],
                sampling_params: Sequence[SamplingParams], collected: list[_Collected],
                on_text: TextCallback | None, order: int) -> None:
        record = collected[index]

        def on_output(delta: RequestDelta) -> None:
            now = self._clock()
            if delta.token_ids and record.first_token_at is None:
                record.first_token_at = now
            record.token_ids.extend(delta.token_ids)
            if delta.logprobs is not None:
                record.logprobs = (record.logprobs or []) + list(delta.logprobs)
            record.num_cached_tokens = max(record.num_cached_tokens, delta.num_cached_tokens)
            if delta.text:
                record.text.append(delta.text)
                if on_text is not None:
                    on_text(index, delta.text)
            if delta.finished:
                record.finish_reason = delta.finish_reason
                record.finished_at = now

        self.core.add_request(encoded[index][1], sampling_params[index], request_id, on_output,
                              arrival_time=float(order))

    def _release_followers(self, held: list[Any], ids: dict[int, str],
                           encoded: list[tuple[str | None, list[int]]],
                           sampling_params: Sequence[SamplingParams],
                           collected: list[_Collected], on_text: TextCallback | None,
                           plan: list[Any]) -> list[Any]:
        """Submit followers whose leader has computed the shared prefix (BatchLLM)."""
        order = {p.index: i for i, p in enumerate(plan)}
        still = []
        for p in held:
            leader = self.core.request(ids[p.leader])
            if leader is not None and leader.num_computed_tokens < p.shared_tokens:
                still.append(p)
                continue
            self._submit(p.index, ids[p.index], encoded, sampling_params, collected, on_text,
                         order[p.index])
            if leader is not None:
                self.core.scheduler.share_prefix(ids[p.leader], ids[p.index], p.shared_tokens)
        return still


def load(
    model: str | os.PathLike[str] | None = None, *, dtype: str = "float32",
    progress: bool = True, quantize: str | None = None, **llm_options: Any,
) -> LLM:
    """Load a model (GGUF file, HF folder, `checkpoints/` name; None: SmolLM2-135M-Instruct).

    Args:
      model: where the model is.
      dtype: "float32" (fastest on CPU) or "bfloat16".
      progress: show a progress bar while loading.
      quantize: weight-only quantization: "int8", "int4", a scheme with group size and
        kind ("int4-g64-asym"), or "gguf" to keep a GGUF file's quantized tensors as they
        are (docs/quantization.md). None: dense weights.
      **llm_options: `LLM` options (max_model_len, page_size, kv_cache_tokens, ...), and
        `attention_impl`.
    """
    overrides = {k: llm_options.pop(k) for k in ("attention_impl", "matmul_impl")
                 if k in llm_options}
    loaded = load_model(model, dtype=dtype, progress=progress, quantize=quantize, **overrides)
    return LLM(loaded.params, loaded.cfg, loaded.tokenizer, **llm_options)
