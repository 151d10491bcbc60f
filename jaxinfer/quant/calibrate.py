"""Activation statistics for the activation-aware quantizer (calibration, host side).

`activation_stats` runs the dense model over calibration token windows and returns, per
projection field, the mean squared input of every input feature and layer, E[x_k^2] [L, K].
`quantize_params(..., importance=stats)` then weighs each weight's squared quantization
error by its input feature's E[x_k^2] (the diagonal of the layer's input second moment, so
the error minimised approximates the layer's output error rather than the weight error).
`activation_grams` returns the whole second moment, E[x x^T] [L, K, K], for GPTQ
(`jaxinfer.quant.gptq`, `quantize_params(..., grams=...)`); its diagonal is
`activation_stats`.

The model code is not changed for this: each projection weight is wrapped in an
`ActivationProbe`, which `dense` dispatches to `quant_dense` like a quantized weight; the
probe multiplies by its dense weight and reports its input rows to the host.

Dimension legend: L layers, N output features, K input features, T tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.errors import ConfigError
from jaxinfer.model.layers import linear
from jaxinfer.model.params import Params
from jaxinfer.quant.format import QuantizedWeight, is_quantized

PROBED_FIELDS = ("wqkv", "wo", "w_gate_up", "w_down")


class _Sink:
    """Host accumulator of sum(x^2) (or, with `grams`, sum(x x^T)) per (field, layer);
    hashed by identity (a static field)."""

    def __init__(self, grams: bool = False) -> None:
        self.rows = 0  # how many leading rows of each batch are real tokens (not padding)
        self.grams = grams
        self.sums: dict[str, dict[int, np.ndarray]] = {}
        self.counts: dict[str, dict[int, int]] = {}

    def add(self, name: str, layer: Any, x: Any) -> None:
        x = np.asarray(x, np.float32)[:self.rows]
        index = int(layer)
        sums = self.sums.setdefault(name, {})
        # One window's products in float32 (twice float64's speed), summed over windows in
        # float64.
        part = x.T @ x if self.grams else np.square(x).sum(0)
        sums[index] = sums.get(index, 0.0) + part.astype(np.float64)
        counts = self.counts.setdefault(name, {})
        counts[index] = counts.get(index, 0) + x.shape[0]


@flax.struct.dataclass
class ActivationProbe(QuantizedWeight):
    """A dense stacked weight [L, N, K] (held in `q`, bits 8 so `shape` is q's shape) whose
    matmul also sends its input rows to a host `_Sink` under `name`. Calibration only."""

    name: str = flax.struct.field(pytree_node=False, default="")
    sink: Any = flax.struct.field(pytree_node=False, default=None)

    def apply(self, x: jax.Array, layer: jax.Array | int) -> jax.Array:
        jax.debug.callback(functools.partial(self.sink.add, self.name), layer,
                           x.astype(jnp.float32))
        return linear(x, self.q[layer].astype(x.dtype))


def activation_stats(params: Params, cfg: ModelConfig, windows: Sequence[Sequence[int]],
                     page_size: int = 16) -> dict[str, np.ndarray]:
    """{field: E[x_k^2] float32 [L, K]} of each projection's input over the tokens of
    `windows` (each one prefilled alone, from position 0), from the dense `params`.

    Raises:
      ConfigError: a projection of `params` is already quantized, or no windows are given.
    """
    return _calibrate(params, cfg, windows, page_size, grams=False)


def activation_grams(params: Params, cfg: ModelConfig, windows: Sequence[Sequence[int]],
                     page_size: int = 16) -> dict[str, np.ndarray]:
    """{field: E[x x^T] float32 [L, K, K]} of each projection's input over the tokens of
    `windows` (each one prefilled alone, from position 0), from the dense `params`: the
    Hessian of the layer's squared output error that GPTQ needs (up to a factor 2).
    Each window's products in float32, summed over windows in float64; SmolLM2-135M's four
    fields take ~0.4 GB as float32.

    Raises:
      ConfigError: a projection of `params` is already quantized, or no windows are given.
    """
    return _calibrate(params, cfg, windows, page_size, grams=True)


def _calibrate(params: Params, cfg: ModelConfig, windows: Sequence[Sequence[int]],
               page_size: int, *, grams: bool) -> dict[str, np.ndarray]:
    from jaxinfer.batch import SequenceChunk, build_step_batch
    from jaxinfer.cache import init_cache
    from jaxinfer.model.transformer import Batch, forward

    if not windows:
        raise ConfigError("calibration needs at least one token window")
    sink = _Sink(grams=grams)
    probes = {}
    for name in PROBED_FIELDS:
        value = getattr(params.layers, name)
        if is_quantized(value):
            raise ConfigError(f"calibration needs dense weights; layers.{name} is quantized")
        probes[name] = ActivationProbe(q=value, scale=None, bits=8, name=name, sink=sink)
    probed = params.replace(layers=params.layers.replace(**probes))
    run = jax.jit(forward, static_argnums=1)
    for tokens in windows:
        tokens = [int(t) for t in tokens]
        pages = len(tokens) // page_size + 1
        cache = init_cache(cfg, pages, page_size)
        step = build_step_batch([SequenceChunk(tokens, 0, list(range(pages)))],
                                page_size=page_size, num_slots=cache.num_slots)
        sink.rows = len(tokens)
        logits, _ = run(probed, cfg, Batch.from_step(step), cache)
        jax.block_until_ready(logits)
        jax.effects_barrier()
    out = {}
    for name in PROBED_FIELDS:
        sums, counts = sink.sums[name], sink.counts[name]
        out[name] = np.stack([(sums[i] / counts[i]).astype(np.float32)
                              for i in range(cfg.num_layers)])
    return out
