"""The model runner: host step batch -> one compiled, cache-donating device step -> tokens.

Programs are compiled ahead of time per bucketed shape and kept, so a process compiles a
handful of them; compile time is counted apart from run time.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxinfer.batch import StepBatch
from jaxinfer.cache.paged import KVCache, cache_shape, init_cache
from jaxinfer.config import ModelConfig
from jaxinfer.model.params import Params
from jaxinfer.model.sampler import apply_penalties, sample, token_logprobs
from jaxinfer.model.transformer import Batch, forward
from jaxinfer.parallel.sharding import ShardingRules, shard_params
from jaxinfer.sampling import SamplingArrays


@flax.struct.dataclass
class DeviceSampling:
    """Device copy of `SamplingArrays`."""

    temperature: Any
    top_k: Any
    top_p: Any
    min_p: Any
    seed: Any
    step: Any
    presence: Any = None
    frequency: Any = None
    repetition: Any = None
    penalty_ids: Any = None
    output_counts: Any = None
    in_prompt: Any = None
    all_greedy: bool = flax.struct.field(pytree_node=False, default=True)
    want_logprobs: bool = flax.struct.field(pytree_node=False, default=False)
    num_logprobs: int = flax.struct.field(pytree_node=False, default=0)

    @classmethod
    def from_arrays(cls, a: SamplingArrays) -> DeviceSampling:
        return cls(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                   seed=a.seed, step=a.step, presence=a.presence, frequency=a.frequency,
                   repetition=a.repetition, penalty_ids=a.penalty_ids,
                   output_counts=a.output_counts, in_prompt=a.in_prompt,
                   all_greedy=a.all_greedy, want_logprobs=a.want_logprobs,
                   num_logprobs=a.num_logprobs)

    @property
    def signature(self) -> tuple[Any, ...]:
        """What about the sampling is static (part of the compiled program's key)."""
        width = None if self.penalty_ids is None else self.penalty_ids.shape[1]
        return (self.all_greedy, self.want_logprobs, self.num_logprobs, width)


def generation_step(
    params: Params, cache: KVCache, batch: Batch, sampling: DeviceSampling, *, cfg: ModelConfig,
    cache_sharding: jax.sharding.Sharding | None = None,
) -> tuple[jax.Array, jax.Array | None, KVCache]:
    """Forward one ragged step and sample the next token of every sequence.

    Returns:
      tokens [S] int32 (kept on device: the next decode step's input), the host-bound
      results packed in one float32 array [S, 2 + 2K] (token, its log-probability, then K
      alternative ids and their log-probabilities; ids < 2**24 are exact in float32) or
      None when no sequence asked for log-probabilities, and the cache.
    """
    logits, cache = forward(params, cfg, batch, cache)
    if cache_sharding is not None:  # the next step's program expects the cache laid out so
        cache = jax.lax.with_sharding_constraint(cache, cache_sharding)
    with jax.named_scope("sample"):
        adjusted = logits
        if sampling.penalty_ids is not None:
            adjusted = apply_penalties(logits, sampling.penalty_ids, sampling.output_counts,
                                       sampling.in_prompt, sampling.presence,
                                       sampling.frequency, sampling.repetition)
        tokens = sample(adjusted, sampling.temperature, sampling.top_k, sampling.top_p,
                        sampling.min_p, sampling.seed, sampling.step,
                        all_greedy=sampling.all_greedy and sampling.penalty_ids is None)
        if not sampling.want_logprobs:
            return tokens, None, cache
        chosen, top_ids, top_values = token_logprobs(logits, tokens, sampling.num_logprobs)
        columns = [tokens.astype(jnp.float32)[:, None], chosen[:, None]]
        if top_ids is not None:
            columns += [top_ids.astype(jnp.float32), top_values]
        return tokens, jnp.concatenate(columns, axis=1), cache


@dataclasses.dataclass
class CompileStats:
    """Programs compiled so far and the seconds spent compiling them."""

    programs: int = 0
    seconds: float = 0.0
    shapes: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)


class ModelRunner:
    """Owns the parameters, the KV cache and the compiled step programs."""

    def __init__(self, params: Params, cfg: ModelConfig, *, num_pages: int, page_size: int,
                 mesh: jax.sharding.Mesh | None = None, rules: ShardingRules | None = None):
        """Args:
          params, cfg: the model.
          num_pages, page_size: the KV pool.
          mesh: shard weights and cache over this (data, tensor, sequence) mesh with `rules`
            (tensor parallelism through GSPMD; `cfg` may gain replicated KV heads, see
            `jaxinfer.parallel.replicate_kv_heads`). The native CPU kernels are single-device
            custom calls, so a multi-device mesh runs the XLA implementations.
        """
        cache_sharding = None
        if mesh is not None:
            if mesh.size > 1 and "cpu" in (cfg.attention_impl, cfg.matmul_impl):
                cfg = cfg.replace(
                    attention_impl="xla" if cfg.attention_impl == "cpu" else cfg.attention_impl,
                    matmul_impl="xla")
            rules = rules or ShardingRules()
            params, cfg = shard_params(params, cfg, mesh, rules)
            cache_sharding = rules.cache_sharding(mesh, cache_shape(cfg, num_pages, page_size))
        self.params = params
        self.cfg = cfg
        self.mesh = mesh
        self.page_size = page_size
        self.cache = init_cache(cfg, num_pages, page_size, sharding=cache_sharding)
        self._jitted = jax.jit(
            functools.partial(generation_step, cfg=cfg,
                              cache_sharding=KVCache(cache_sharding, cache_sharding)
                              if cache_sharding is not None else None),
            donate_argnums=(1,))
        self._programs: dict[tuple[Any, ...], Any] = {}
        self.compile_stats = CompileStats()
        self.last_packed: jax.Array | None = None  # log-probabilities of the last step

    @property
    def num_slots(self) -> int:
        return self.cache.num_slots

    def _program(self, batch: Batch, sampling: DeviceSampling, key: tuple[Any, ...]) -> Any:
        program = self._programs.get(key)
        if program is None:
            start = time.perf_counter()
            program = self._jitted.lower(self.params, self.cache, batch, sampling).compile()
            self.compile_stats.seconds += time.perf_counter() - start
            self.compile_stats.programs += 1
            self.compile_stats.shapes.append(key)
            self._programs[key] = program
        return program

    def step(
        self, step: StepBatch, sampling: SamplingArrays, tokens: jax.Array | None = None
    ) -> jax.Array:
        """Dispatch one step; returns the sampled tokens [S] as a device array (not waited).

        Args:
          step: the host batch.
          sampling: per-sequence sampling parameters, padded to the batch's S.
          tokens: optional device array replacing `step.tokens` (the previous decode step's
            output, so decode steps are dispatched without waiting for the host).
        """
        batch = Batch.from_step(step, tokens)
        device_sampling = DeviceSampling.from_arrays(sampling)
        key = (*step.shape_key, *device_sampling.signature)
        program = self._program(batch, device_sampling, key)
        out, packed, self.cache = program(self.params, self.cache, batch, device_sampling)
        self.last_packed = packed
        return out
