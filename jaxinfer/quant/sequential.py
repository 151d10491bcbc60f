"""Sequential GPTQ: each projection calibrated on the inputs the quantized model gives it.

`quantize_params(..., grams=activation_grams(...))` quantizes every projection from the
input second moments of the *dense* model, so each layer's quantization is blind to the
error the layers before it already make. `sequential_gptq` quantizes layer by layer and,
inside a layer, projection by projection (wqkv, wo, w_gate_up, w_down, the order the data
flows), each from the Gram matrix E[x x^T] of its input as the partly quantized model
computes it: the hidden states carried from layer to layer are those of the quantized
layers, and within a layer the projections already quantized are used (GPTQ's "true
sequential" order, Frantar et al. 2022). A layer costs five passes of that one layer over
the calibration windows (four probed, one to carry the hidden states on), about five dense
forwards of the whole model in all, plus the Gram products and the GPTQ sweeps.

Dimension legend: W windows, T tokens of a window, D model width, K input features.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxinfer.config import ModelConfig
from jaxinfer.errors import ConfigError
from jaxinfer.model.params import Params
from jaxinfer.quant.calibrate import ActivationProbe, _Sink
from jaxinfer.quant.format import QuantScheme, is_quantized, parse_scheme
from jaxinfer.quant.gptq import DAMP, gptq_quantize
from jaxinfer.quant.quantize import QUANTIZED_LAYER_FIELDS, quantize_params

log = logging.getLogger(__name__)


def sequential_gptq(params: Params, cfg: ModelConfig, windows: Sequence[Sequence[int]],
                    scheme: str | QuantScheme, *, act_order: bool = False, refit: int = 0,
                    damp: float = DAMP, page_size: int = 16, progress: bool = False) -> Params:
    """Quantize `params` (dense) with GPTQ, calibrating each projection on the inputs of the
    model quantized so far (see the module docstring); the embedding and LM head as
    `quantize_params` does.

    Args:
      params: dense weights.
      cfg: their configuration.
      windows: calibration token windows, each prefilled alone from position 0.
      scheme: the quantization scheme (its method chooses each group's grid).
      act_order, refit, damp: GPTQ's options (`gptq_quantize`).
      page_size: the KV page size of the calibration passes.
      progress: show a progress bar over the layers (on stderr).

    Returns:
      The quantized `Params`.

    Raises:
      ConfigError: no windows, an empty window, or a projection already quantized.
    """
    from jaxinfer.batch import SequenceChunk, build_step_batch
    from jaxinfer.cache import init_cache
    from jaxinfer.model.transformer import Batch, embed_tokens

    scheme = parse_scheme(scheme)
    if not windows or any(len(w) == 0 for w in windows):
        raise ConfigError("sequential GPTQ needs at least one non-empty calibration window")
    for name in QUANTIZED_LAYER_FIELDS:
        if is_quantized(getattr(params.layers, name)):
            raise ConfigError(f"sequential GPTQ needs dense weights; layers.{name} is "
                              "quantized")
    start = time.perf_counter()
    pages = max(len(w) for w in windows) // page_size + 1
    full = init_cache(cfg, pages, page_size)
    cache = type(full)(k=full.k[:1], v=full.v[:1])  # one layer's pages
    batches, rows, hidden = [], [], []
    for tokens in windows:
        tokens = [int(t) for t in tokens]
        step = build_step_batch([SequenceChunk(tokens, 0, list(range(pages)))],
                                page_size=page_size, num_slots=cache.num_slots)
        batch = Batch.from_step(step)
        batches.append(batch)
        rows.append(len(tokens))
        hidden.append(embed_tokens(params, cfg, batch.tokens))
    sliding = np.asarray(cfg.sliding_layer_mask)
    sinks = {name: _Sink(grams=True) for name in QUANTIZED_LAYER_FIELDS}
    done: list[dict[str, Any]] = []
    layers = range(cfg.num_layers)
    for i in tqdm(layers, desc="sequential GPTQ", unit="layer", disable=not progress,
                  file=sys.stderr):
        layer = jax.tree.map(lambda a, i=i: a[i:i + 1], params.layers)  # a one-layer stack
        quantized: dict[str, Any] = {}
        for name in QUANTIZED_LAYER_FIELDS:
            sink = sinks[name]  # one per field: the probe is a static part of the jit key
            sink.sums, sink.counts = {}, {}
            dense = getattr(layer, name)
            probe = ActivationProbe(q=dense, scale=None, bits=8, name=name, sink=sink)
            probed = layer.replace(**quantized, **{name: probe})
            for x, batch, n in zip(hidden, batches, rows, strict=True):
                sink.rows = n
                jax.block_until_ready(_run_layer(cfg, probed, bool(sliding[i]), batch, x, cache))
                jax.effects_barrier()
            gram = sink.sums[name][0] / sink.counts[name][0]
            quantized[name] = jax.tree.map(jnp.asarray, gptq_quantize(
                np.asarray(dense), gram[None], scheme, act_order=act_order, refit=refit,
                damp=damp))
        layer = layer.replace(**quantized)
        hidden = [_run_layer(cfg, layer, bool(sliding[i]), batch, x, cache)
                  for x, batch in zip(hidden, batches, strict=True)]
        done.append({name: jax.tree.map(np.asarray, quantized[name])
                     for name in QUANTIZED_LAYER_FIELDS})
    stacked = {name: jax.tree.map(lambda *xs: jnp.asarray(np.concatenate(xs)),
                                  *[d[name] for d in done])
               for name in QUANTIZED_LAYER_FIELDS}
    log.info("sequential GPTQ of %d layers on %d windows: %.1f s", cfg.num_layers,
             len(windows), time.perf_counter() - start)
    return quantize_params(params.replace(layers=params.layers.replace(**stacked)), scheme)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _run_layer(cfg: ModelConfig, layer: Any, is_sliding: bool, batch: Any, x: jax.Array,
               cache: Any) -> jax.Array:
    """One layer (a one-layer stack `layer`) over hidden states x [T, D] of one window."""
    from jaxinfer.model.transformer import _layer, layer_rope

    rope = layer_rope(cfg, batch.positions)
    (x, _, _), _ = _layer(cfg, batch, rope, layer, (x, cache.k, cache.v),
                          (jnp.int32(0), jnp.asarray(is_sliding)))
    return x
