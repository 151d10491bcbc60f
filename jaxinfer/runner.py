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

from jaxinfer.batch import StepBatch
from jaxinfer.cache.paged import KVCache, init_cache
from jaxinfer.config import ModelConfig
from jaxinfer.model.params import Params
from jaxinfer.model.sampler import sample
from jaxinfer.model.transformer import Batch, forward
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
    all_greedy: bool = flax.struct.field(pytree_node=False, default=True)

    @classmethod
    def from_arrays(cls, a: SamplingArrays) -> DeviceSampling:
        return cls(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                   seed=a.seed, step=a.step, all_greedy=a.all_greedy)


def generation_step(
    params: Params, cache: KVCache, batch: Batch, sampling: DeviceSampling, *, cfg: ModelConfig
) -> tuple[jax.Array, KVCache]:
    """Forward one ragged step and sample the next token of every sequence: [S] int32."""
    logits, cache = forward(params, cfg, batch, cache)
    with jax.named_scope("sample"):
        tokens = sample(logits, sampling.temperature, sampling.top_k, sampling.top_p,
                        sampling.min_p, sampling.seed, sampling.step,
                        all_greedy=sampling.all_greedy)
    return tokens, cache


@dataclasses.dataclass
class CompileStats:
    """Programs compiled so far and the seconds spent compiling them."""

    programs: int = 0
    seconds: float = 0.0
    shapes: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)


class ModelRunner:
    """Owns the parameters, the KV cache and the compiled step programs."""

    def __init__(self, params: Params, cfg: ModelConfig, *, num_pages: int, page_size: int):
        self.params = params
        self.cfg = cfg
        self.page_size = page_size
        self.cache = init_cache(cfg, num_pages, page_size)
        self._jitted = jax.jit(functools.partial(generation_step, cfg=cfg), donate_argnums=(1,))
        self._programs: dict[tuple[Any, ...], Any] = {}
        self.compile_stats = CompileStats()

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
        key = (*step.shape_key, sampling.all_greedy)
        program = self._program(batch, device_sampling, key)
        out, self.cache = program(self.params, self.cache, batch, device_sampling)
        return out
