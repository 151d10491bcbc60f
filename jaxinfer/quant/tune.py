"""End-to-end tuning of quantization grids by distillation (host loop, jitted steps).

GPTQ (`jaxinfer.quant.gptq`) fixes each projection's integer codes and grids one layer at a
time, against that layer's own output error. `tune_grids` then keeps every code fixed and
trains only the grids (each group's scale and offset) of the layer projections, end to end,
so that the quantized model's next-token distribution matches the dense model's: the loss
is the mean KL divergence KL(p_dense || p_quantized) over calibration tokens (distillation
from the model being quantized, never the text's own tokens, so the tuned model cannot
learn the text beyond what the dense model knows). This is the "train the quantization
parameters end to end" step of EfficientQAT (Chen et al. 2024, E2E-QP), on our group-wise
format; the result is a model of the same format and size.

Parameterisation: scale' = scale * exp(a), offset' = offset + b * scale, a and b per group
starting at 0 (b only for asymmetric grids), trained with Adam. Each step runs the dense
teacher (no gradient) and the quantized student over `batch_windows` calibration windows
through the training forward (`jaxinfer.train.step.packed_logits`).

Dimension legend: B windows per step, T tokens per window, V vocabulary.
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
import optax
from tqdm.auto import tqdm

from jaxinfer.config import ModelConfig
from jaxinfer.errors import ConfigError
from jaxinfer.model.params import Params
from jaxinfer.quant.format import is_quantized
from jaxinfer.quant.quantize import QUANTIZED_LAYER_FIELDS

log = logging.getLogger(__name__)


def grid_deltas(params: Params) -> dict[str, dict[str, jax.Array]]:
    """Zero deltas {field: {"a": [L, N, G], "b": [L, N, G] (asymmetric only)}} of the layer
    projections' grids: the trainable tree `apply_grid_deltas` reads."""
    deltas = {}
    for name in QUANTIZED_LAYER_FIELDS:
        w = getattr(params.layers, name)
        if not is_quantized(w):
            raise ConfigError(f"grid tuning needs quantized projections; layers.{name} is "
                              "dense (quantize first)")
        def zeros(shape: tuple[int, ...] = w.scale.shape) -> jax.Array:
            return jnp.zeros(shape, jnp.float32)  # a buffer of its own (donated)
        deltas[name] = {"a": zeros()} if w.offset is None else {"a": zeros(), "b": zeros()}
    return deltas


def apply_grid_deltas(params: Params, deltas: dict[str, dict[str, jax.Array]]) -> Params:
    """`params` with each projection's grids moved: scale * exp(a), offset + b * scale (in
    the grids' own dtype)."""
    updates = {}
    for name, d in deltas.items():
        w = getattr(params.layers, name)
        scale = w.scale.astype(jnp.float32)
        new = {"scale": (scale * jnp.exp(d["a"])).astype(w.scale.dtype)}
        if w.offset is not None:
            new["offset"] = (w.offset.astype(jnp.float32) + d["b"] * scale).astype(
                w.offset.dtype)
        updates[name] = w.replace(**new)
    return params.replace(layers=params.layers.replace(**updates))


def distillation_kl(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
    """Mean KL(p_teacher || p_student) over the leading axes of logits [..., V]."""
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


def tune_grids(quantized: Params, dense: Params, cfg: ModelConfig,
               windows: Sequence[Sequence[int]], *, steps: int = 100, batch_windows: int = 2,
               learning_rate: float = 2e-3, seed: int = 0, progress: bool = False
               ) -> tuple[Params, list[float]]:
    """Tune the projections' grids of `quantized` (codes fixed) to match `dense`.

    Args:
      quantized: the quantized model (its layer projections `QuantizedWeight`s).
      dense: the dense model it was quantized from (the teacher).
      cfg: the models' configuration.
      windows: calibration token windows, all of one length; each step draws
        `batch_windows` of them (a shuffled pass over all, then the next).
      steps: optimizer steps.
      learning_rate: Adam's step size for the log-scale and offset deltas (cosine decay).
      seed: the window order.
      progress: show a progress bar (stderr) with the running KL.

    Returns:
      (the tuned `Params`, the KL of each step before its update).

    Raises:
      ConfigError: dense projections in `quantized`, windows of unequal or too short
        length, fewer windows than a batch, or non-positive steps.
    """
    from jaxinfer.train.step import packed_logits

    lengths = {len(w) for w in windows}
    if len(lengths) != 1 or min(lengths) < 2:
        raise ConfigError("grid tuning needs calibration windows of one length (>= 2)")
    if steps < 1 or batch_windows < 1 or len(windows) < batch_windows:
        raise ConfigError(f"grid tuning needs steps >= 1 and at least batch_windows="
                          f"{batch_windows} windows (got steps={steps}, {len(windows)} "
                          "windows)")
    deltas = grid_deltas(quantized)
    schedule = optax.cosine_decay_schedule(learning_rate, steps)
    optimizer = optax.adam(schedule)
    opt_state = optimizer.init(deltas)
    tokens = np.asarray(windows, np.int32)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(deltas: Any, opt_state: Any, batch: jax.Array) -> tuple[Any, Any, jax.Array]:
        seg = jnp.ones_like(batch)
        teacher = jax.lax.stop_gradient(packed_logits(dense, cfg, batch, seg))

        def loss(d: Any) -> jax.Array:
            return distillation_kl(teacher, packed_logits(apply_grid_deltas(quantized, d),
                                                          cfg, batch, seg))

        value, grads = jax.value_and_grad(loss)(deltas)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, deltas)
        return optax.apply_updates(deltas, updates), opt_state, value

    rng = np.random.default_rng(seed)
    order: list[int] = []
    history: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="tuning grids", unit="step", disable=not progress,
               file=sys.stderr)
    for _ in bar:
        if len(order) < batch_windows:
            order += rng.permutation(len(tokens)).tolist()
        picked, order = order[:batch_windows], order[batch_windows:]
        deltas, opt_state, kl = step(deltas, opt_state, jnp.asarray(tokens[picked]))
        history.append(float(kl))
        bar.set_postfix(kl=f"{history[-1]:.4f}")
    log.info("grid tuning: %d steps in %.1f s, KL %.4f -> %.4f", steps,
             time.perf_counter() - start, history[0], history[-1])
    return apply_grid_deltas(quantized, deltas), history
