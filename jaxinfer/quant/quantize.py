"""Quantize dense weights (host side, numpy) to the group-wise int8 / int4 format.

Round to nearest. Symmetric: scale = max|w| / qmax with qmax = 127 (int8) or 7 (int4), q in
[-qmax, qmax], no offset. Asymmetric: scale = (max - min) / (2^bits - 1) and an unsigned code
u = round((w - min) / scale) stored as q = u - 2^(bits-1), with offset = min + 2^(bits-1) *
scale so that the one dequantization formula q * scale + offset holds for both.

Dimension legend: L layers, N output features, K input features, G groups per row.
"""

from __future__ import annotations

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


def quantize_array(w: Any, scheme: str | QuantScheme, *, exact_group: bool = False
                   ) -> QuantizedWeight:
    """Quantize a dense weight [..., N, K] (numpy, float32/bfloat16/float16).

    Args:
      w: the weight; the last axis (K, input features) is grouped.
      scheme: a `QuantScheme` or its name ("int8", "int4-g64-asym", ...).
      exact_group: refuse (ConfigError) a group size that does not divide K instead of
        taking the largest smaller one that does.

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
    if scheme.symmetric:
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


def _to_device(w: QuantizedWeight) -> QuantizedWeight:
    return jax.tree.map(jnp.asarray, w)


def _quantize_stacked(w: Any, scheme: QuantScheme) -> QuantizedWeight:
    """Quantize [L, N, K] one layer at a time (bounds the float32 host copies)."""
    parts = [quantize_array(np.asarray(jax.device_get(w[i])), scheme) for i in range(w.shape[0])]
    return _to_device(jax.tree.map(lambda *xs: np.stack(xs), *parts))


def quantize_params(params: Params, scheme: str | QuantScheme) -> Params:
    """Quantize the projection weights, the embedding and the LM head of `params` (the
    latter two with `scheme.head`: 8 bits unless the scheme says `-head4`).

    Leaves already quantized are kept as they are; norms and biases stay dense.
    """
    scheme = parse_scheme(scheme)
    layers = params.layers
    updates = {}
    for name in QUANTIZED_LAYER_FIELDS:
        value = getattr(layers, name)
        if not is_quantized(value):
            updates[name] = _quantize_stacked(value, scheme)
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
