"""Quantize dense weights (host side) to the group-wise int8 / int4 format.

Two methods (`QuantScheme.method`):
- "rtn", round to nearest on the group's full range. Symmetric: scale = max|w| / qmax with
  qmax = 127 (int8) or 7 (int4), q in [-qmax, qmax], no offset. Asymmetric: scale =
  (max - min) / (2^bits - 1) and an unsigned code u = round((w - min) / scale) stored as
  q = u - 2^(bits-1), with offset = min + 2^(bits-1) * scale so that the one dequantization
  formula q * scale + offset holds for both.
- "mse" (the default for 4 bits): a per-group clipping search for the least squared error of
  the dequantized group, optionally weighted per input feature (`_search`, run by XLA).
Either method can run under GPTQ's error feedback (`jaxinfer.quant.gptq`): `quantize_params(
..., grams=activation_grams(...))` quantizes the projections column by column, choosing each
group's grid with the scheme's method.

Dimension legend: L layers, N output features, K input features, G groups per row.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import ConfigError
from jaxinfer.model.params import Params
from jaxinfer.quant.format import (
    GROUP_SIZES,
    QuantizedWeight,
    QuantScheme,
    dequantize,
    is_quantized,
    pack_int4_np,
    parse_scheme,
)

log = logging.getLogger(__name__)

# The weights that are quantized: the four projections of every layer, the embedding (also
# the tied LM head) and an untied LM head. Norms and biases stay dense.
QUANTIZED_LAYER_FIELDS = ("wqkv", "wo", "w_gate_up", "w_down")
QUANTIZABLE_FIELDS = (*QUANTIZED_LAYER_FIELDS, "embed", "lm_head")


def group_size_for(K: int, group_size: int) -> int:
    """`group_size` if it divides K, else the largest supported group size below it that
    does: a scheme's group size is an upper bound (SmolLM2's K = 576 takes g128 as g64)."""
    for g in sorted((g for g in GROUP_SIZES if g <= group_size), reverse=True):
        if K % g == 0:
            return g
    raise ConfigError(
        f"no supported group size <= {group_size} divides the input width {K}; choose a "
        f"scheme whose group size ({GROUP_SIZES}) divides {K}")


def quantize_array(w: Any, scheme: str | QuantScheme, *, exact_group: bool = False,
                   importance: Any = None) -> QuantizedWeight:
    """Quantize a dense weight [..., N, K] (numpy, float32/bfloat16/float16).

    Args:
      w: the weight; the last axis (K, input features) is grouped.
      scheme: a `QuantScheme` or its name ("int8", "int4-g64-asym", "int4-rtn", ...).
      exact_group: refuse (ConfigError) a group size that does not divide K instead of
        taking the largest smaller one that does.
      importance: optional non-negative weights [K] (or broadcastable to w) of each input
        feature in the squared error the "mse" method minimizes (e.g. the mean squared
        activation of that feature); None weighs each element by w^2 + its group's mean
        w^2 (data-free: large weights kept closer). Ignored by "rtn".

    Returns:
      A `QuantizedWeight` of numpy arrays; scale and offset in float32.
    """
    scheme = parse_scheme(scheme)
    w = np.asarray(w, dtype=np.float32)
    if w.ndim < 2:
        raise ConfigError(f"quantize_array needs a weight [..., N, K], got shape {w.shape}")
    *lead, K = w.shape
    if exact_group and K % scheme.group_size:
        raise ConfigError(f"group size {scheme.group_size} does not divide K={K}")
    g = group_size_for(K, scheme.group_size)
    groups = w.reshape(*lead, K // g, g)
    half = 2 ** (scheme.bits - 1)
    if scheme.method == "mse":
        weights = None
        if importance is not None:
            weights = np.broadcast_to(np.asarray(importance, np.float32), w.shape)
            weights = weights.reshape(groups.shape)
        q, scale, offset = _mse_search(groups, weights, scheme.bits, scheme.symmetric)
    elif scheme.symmetric:
        qmax = half - 1
        scale = np.max(np.abs(groups), axis=-1) / np.float32(qmax)
        inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
        q = np.clip(np.rint(groups * inv[..., None]), -qmax, qmax)
        offset = None
    else:
        low, high = np.min(groups, axis=-1), np.max(groups, axis=-1)
        scale = (high - low) / np.float32(2 * half - 1)
        inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
        u = np.clip(np.rint((groups - low[..., None]) * inv[..., None]), 0, 2 * half - 1)
        q = u - half
        offset = (low + np.float32(half) * scale).astype(np.float32)
    q = q.astype(np.int8).reshape(*lead, K)
    if scheme.bits == 4:
        q = pack_int4_np(q)
    return QuantizedWeight(q=q, scale=scale.astype(np.float32), offset=offset,
                           bits=scheme.bits, group_size=g)


# ----------------------------------------------------------------------------- clipping search
# Shrink factors of the group's range tried by the "mse" method (1.0 is round to nearest).
SHRINK_STEPS = 20
SHRINK_MIN = 0.5
REFINE_STEPS = 2
# Without calibration, weigh each element's error by w^2 + the group's mean w^2 (as
# llama.cpp's data-free 4-bit search does): on SmolLM2 int4 g128 it gave +57% perplexity where
# equal weights gave +93% and round to nearest +84% (docs/quantization.md).
MAGNITUDE_WEIGHTS = True


def _mse_search(groups: np.ndarray, weights: np.ndarray | None, bits: int, symmetric: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(q int8 [..., G, g], scale [..., G], offset [..., G] or None) of the least-squares
    clipping search (`_search`), run in float32 by XLA one array at a time."""
    args = (jnp.asarray(groups),) if weights is None else (jnp.asarray(groups),
                                                           jnp.asarray(weights))
    q, scale, low = _search(*args, bits=bits, symmetric=symmetric)
    q, scale = np.asarray(q), np.asarray(scale)
    if symmetric:
        return q, scale, None
    # Codes u = q + half: w ~ u * scale + low = q * scale + (low + half * scale).
    return q, scale, (np.asarray(low) + np.float32(2 ** (bits - 1)) * scale).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("bits", "symmetric"))
def _search(w: jax.Array, a: jax.Array | None = None, *, bits: int, symmetric: bool
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per group of w [..., G, g] (element weights a, default w^2 + mean(w^2)), the codes
    and (scale, low) minimising sum(a * (scale * u + low - w)^2) over clipping candidates.

    Each candidate rounds the group onto a grid whose range is the group's range shrunk by a
    factor s in [SHRINK_MIN, 1] (centred for asymmetric; for symmetric both the max-|w| sign
    at the top code and at the bottom code, using all 2^bits codes as Q4_0 does), then fits
    scale (and low) to those codes by weighted least squares; the candidate with the least
    fitted error wins. `REFINE_STEPS` rounds of re-rounding to the fitted grid and refitting
    follow (each lowers the error or keeps it). s = 1 is round to nearest, so the result is
    never worse than it. Symmetric returns low = 0 and codes in [-2^(bits-1), 2^(bits-1) - 1];
    asymmetric returns codes u - 2^(bits-1) for u in [0, 2^bits - 1].
    """
    half = 2 ** (bits - 1)
    lo_code, hi_code = (-half, half - 1) if symmetric else (0, 2 * half - 1)
    if a is None:  # data-free: protect the large weights (llama.cpp's w^2 + sigma^2 weights)
        w2 = w * w
        a = w2 + w2.mean(-1, keepdims=True) if MAGNITUDE_WEIGHTS else jnp.ones_like(w)
    s_a = a.sum(-1)
    s_aww = (a * w * w).sum(-1)

    def codes(scale: jax.Array, low: jax.Array) -> jax.Array:
        inv = jnp.where(scale != 0, 1.0 / jnp.where(scale != 0, scale, 1.0), 0.0)
        return jnp.clip(jnp.round((w - low[..., None]) * inv[..., None]), lo_code, hi_code)

    def fit(u: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Least-squares (scale, low) for codes u and the fitted weighted squared error."""
        au = a * u
        s_u, s_uu, s_uw = au.sum(-1), (au * u).sum(-1), (au * w).sum(-1)
        if symmetric:
            new = jnp.where(s_uu > 0, s_uw / jnp.where(s_uu > 0, s_uu, 1.0), 0.0)
            return new, jnp.zeros_like(new), s_aww - new * s_uw
        s_w = (a * w).sum(-1)
        det = s_a * s_uu - s_u * s_u
        ok = det > 1e-6 * jnp.maximum(s_a * s_uu, 1e-30)
        safe = jnp.where(ok, det, 1.0)
        new = jnp.where(ok, (s_a * s_uw - s_u * s_w) / safe, scale)
        low = jnp.where(ok, (s_uu * s_w - s_u * s_uw) / safe,
                        (s_w - scale * s_u) / jnp.where(s_a > 0, s_a, 1.0))
        err = s_aww + new * new * s_uu + low * low * s_a + 2 * new * low * s_u \
            - 2 * new * s_uw - 2 * low * s_w
        return new, low, err

    if symmetric:
        index = jnp.argmax(jnp.abs(w), axis=-1)[..., None]
        peak = jnp.take_along_axis(w, index, axis=-1)[..., 0]  # the max-|w| value, signed
        shrink = jnp.linspace(SHRINK_MIN, 1.0, SHRINK_STEPS, dtype=jnp.float32)
        # peak at the top code (hi_code / s) or at the bottom code (lo_code / s).
        factors = jnp.concatenate([shrink / hi_code, shrink / lo_code])

        def candidate(f: jax.Array) -> tuple[jax.Array, jax.Array]:
            return peak * f, jnp.zeros_like(peak)
        count = 2 * SHRINK_STEPS
    else:
        w_min, w_max = w.min(-1), w.max(-1)
        shrink = jnp.linspace(SHRINK_MIN, 1.0, SHRINK_STEPS, dtype=jnp.float32)
        factors = shrink

        def candidate(f: jax.Array) -> tuple[jax.Array, jax.Array]:
            span = (w_max - w_min) * f
            return span / hi_code, w_min + (w_max - w_min - span) / 2
        count = SHRINK_STEPS

    def body(i: int, best: tuple) -> tuple:
        scale, low = candidate(factors[i])
        new, new_low, err = fit(codes(scale, low), scale)
        take = err < best[2]
        return (jnp.where(take, new, best[0]), jnp.where(take, new_low, best[1]),
                jnp.where(take, err, best[2]))

    first_scale, first_low = candidate(factors[SHRINK_STEPS - 1])  # s = 1
    start = fit(codes(first_scale, first_low), first_scale)
    scale, low, err = jax.lax.fori_loop(0, count, body, start)
    for _ in range(REFINE_STEPS):
        new, new_low, new_err = fit(codes(scale, low), scale)
        take = new_err < err
        scale, low = jnp.where(take, new, scale), jnp.where(take, new_low, low)
        err = jnp.where(take, new_err, err)
    u = codes(scale, low)
    q = (u if symmetric else u - half).astype(jnp.int8)
    return q, scale, low


def _to_device(w: QuantizedWeight) -> QuantizedWeight:
    return jax.tree.map(jnp.asarray, w)


def _quantize_stacked(w: Any, scheme: QuantScheme, importance: Any = None) -> QuantizedWeight:
    """Quantize [L, N, K] one layer at a time (bounds the float32 host copies); importance
    [L, K] or None."""
    parts = [quantize_array(np.asarray(jax.device_get(w[i])), scheme,
                            importance=None if importance is None else importance[i])
             for i in range(w.shape[0])]
    return _to_device(jax.tree.map(lambda *xs: np.stack(xs), *parts))


# Every input feature keeps at least this share of the mean importance (a feature never seen
# active in calibration still counts a little).
IMPORTANCE_FLOOR = 1e-2


def importance_weights(stats: Any) -> np.ndarray:
    """Per-feature error weights from E[x_k^2] [..., K]: normalised to mean 1 along K, with
    `IMPORTANCE_FLOOR` added."""
    stats = np.maximum(np.asarray(stats, np.float64), 0.0)
    mean = stats.mean(-1, keepdims=True)
    stats = np.divide(stats, mean, out=np.ones_like(stats), where=mean > 0)
    return (stats + IMPORTANCE_FLOOR).astype(np.float32)


def quantize_params(params: Params, scheme: str | QuantScheme,
                    importance: dict[str, Any] | None = None,
                    grams: dict[str, Any] | None = None, *, act_order: bool = False,
                    refit: int = 0, damp: float | None = None) -> Params:
    """Quantize the projection weights, the embedding and the LM head of `params` (the
    latter two with `scheme.head`: 8 bits unless the scheme says `-head4`).

    `importance`: optional {field: E[x_k^2] [L, K]} of the projections' inputs
    (`jaxinfer.quant.calibrate.activation_stats`); the "mse" method then weighs each
    weight's error by its input feature's share (activation-aware). `grams`: optional
    {field: E[x x^T] [L, K, K]} (`calibrate.activation_grams`); the fields it names are
    quantized by GPTQ (`jaxinfer.quant.gptq.gptq_quantize`, the scheme's method choosing each
    group's grid, weighted by diag H; `importance` is then not used for them), with GPTQ's
    `act_order`, `refit` and `damp` options (see `gptq_quantize`; damp None: its default).
    Leaves already
    quantized are kept as they are; norms and biases stay dense.
    """
    from jaxinfer.quant.gptq import gptq_quantize

    scheme = parse_scheme(scheme)
    importance = importance or {}
    grams = grams or {}
    unknown = set(grams) - set(QUANTIZED_LAYER_FIELDS)
    if unknown:
        raise ConfigError(f"grams for {sorted(unknown)}: GPTQ quantizes only the layer "
                          f"projections {QUANTIZED_LAYER_FIELDS}")
    damping = {} if damp is None else {"damp": damp}
    layers = params.layers
    updates = {}
    for name in QUANTIZED_LAYER_FIELDS:
        value = getattr(layers, name)
        if is_quantized(value):
            continue
        if name in grams:
            updates[name] = _to_device(gptq_quantize(np.asarray(jax.device_get(value)),
                                                     grams[name], scheme, act_order=act_order,
                                                     refit=refit, **damping))
        else:
            stats = importance.get(name)
            weights = None if stats is None else importance_weights(stats)
            updates[name] = _quantize_stacked(value, scheme, weights)
    layers = layers.replace(**updates)
    embed = params.embed
    if not is_quantized(embed):
        embed = _to_device(quantize_array(np.asarray(jax.device_get(embed)), scheme.head))
    head = params.lm_head
    if head is not None and not is_quantized(head):
        head = _to_device(quantize_array(np.asarray(jax.device_get(head)), scheme.head))
    return params.replace(layers=layers, embed=embed, lm_head=head)


def dequantize_params(params: Params, dtype: Any = jnp.float32) -> Params:
    """The dense model with every quantized weight expanded to `dtype`."""
    return jax.tree.map(lambda x: dequantize(x, dtype) if is_quantized(x) else x, params,
                        is_leaf=is_quantized)


def quantization_summary(params: Params) -> dict[str, dict[str, int]]:
    """{field: {"bits", "group_size", "offset"}} of the quantized weights (for manifests)."""
    out: dict[str, dict[str, int]] = {}
    fields = {"embed": params.embed, "lm_head": params.lm_head,
              **{f"layers.{k}": v for k, v in vars(params.layers).items()}}
    for name, value in fields.items():
        if is_quantized(value):
            out[name] = {"bits": value.bits, "group_size": value.group_size,
                         "offset": int(value.offset is not None)}
    return out
