"""Weight-only quantized matmul: the format's checks, int4 packing, and the pure-jnp oracle.

Format (fixed; see docs): a linear weight W [N, K] (PyTorch layout, y = x @ W.T), stacked
over layers as [L, N, K], quantized in groups of `group_size` (g) consecutive K entries:
bits=8 stores q int8 [..., N, K]; bits=4 stores q uint8 [..., N, K // 2] whose byte j holds
element 2j in its low nibble and 2j + 1 in its high nibble, nibble u standing for u - 8.
scale and the optional offset are [..., N, K // g] (float32 / float16 / bfloat16), and
W[n, k] = q[n, k] * scale[n, k // g] + offset[n, k // g] (offset 0 when None).
Dimension legend: T tokens, N output features, K input features, K' packed width (K or
K // 2), L layers, g group size.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

BITS = (4, 8)
GROUP_SIZES = (16, 32, 64, 128, 256)
SCALE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
ACTIVATION_DTYPES = SCALE_DTYPES


class QuantShape(NamedTuple):
    """Static facts of a checked quantized matmul."""

    out_features: int  # N
    in_features: int  # K
    num_layers: int | None  # L for stacked weights, None for one layer's [N, K']


def check_weights(q: jax.Array, scale: jax.Array, offset: jax.Array | None, *, bits: int,
                  group_size: int) -> tuple[int, int]:
    """Validate a quantized weight with any leading dims; return (N, K)."""
    if bits not in BITS:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    want = jnp.dtype(jnp.uint8 if bits == 4 else jnp.int8)
    if jnp.dtype(q.dtype) != want:
        fix = "pack int4 values with pack_int4" if bits == 4 else "store q as int8"
        raise ValueError(f"bits={bits} wants q of dtype {want.name}, got {q.dtype} ({fix})")
    if q.ndim < 2:
        raise ValueError(f"q must be [..., N, K'], got shape {q.shape}")
    N = q.shape[-2]
    K = q.shape[-1] * (2 if bits == 4 else 1)
    if K % group_size:
        raise ValueError(f"K={K} (from q's packed width {q.shape[-1]}, bits={bits}) is not a "
                         f"multiple of group_size={group_size}; pick a group size dividing K")
    if scale is None:
        raise ValueError("scale is required (offset may be None for symmetric weights)")
    want_scale = (*q.shape[:-1], K // group_size)
    for name, array in (("scale", scale), ("offset", offset)):
        if array is None:
            continue
        if tuple(array.shape) != want_scale:
            raise ValueError(f"{name} must be [..., N, K // group_size] = {want_scale} for q "
                             f"{q.shape}, bits={bits}, group_size={group_size}; got "
                             f"{tuple(array.shape)}")
        if jnp.dtype(array.dtype) not in SCALE_DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {array.dtype}")
    return N, K


def check_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, offset: jax.Array | None, *,
                 bits: int, group_size: int, layer: jax.Array | int | None) -> QuantShape:
    """Validate x [T, K] against a weight [N, K'] (layer None) or stack [L, N, K'] (layer)."""
    N, K = check_weights(q, scale, offset, bits=bits, group_size=group_size)
    if layer is None and q.ndim != 2:
        raise ValueError(f"q of shape {q.shape} is not one layer's [N, K']: pass `layer` to "
                         "select from stacked [L, N, K'] weights")
    if layer is not None and q.ndim != 3:
        raise ValueError(f"`layer` given but q {q.shape} is not stacked [L, N, K']")
    if x.ndim != 2 or x.shape[1] != K:
        raise ValueError(f"x must be [T, K] with K={K} (from q {q.shape}, bits={bits}), got "
                         f"{x.shape}")
    if jnp.dtype(x.dtype) not in ACTIVATION_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    num_layers = None if layer is None else q.shape[0]
    if isinstance(layer, (int, np.integer)) and not 0 <= layer < q.shape[0]:
        raise ValueError(f"layer {layer} out of range for {q.shape[0]} stacked layers")
    if layer is not None and not isinstance(layer, (int, np.integer)) and (
            jnp.shape(layer) != () or not jnp.issubdtype(jnp.result_type(layer), jnp.integer)):
        raise ValueError(f"layer must be an integer scalar, got {layer!r}")
    return QuantShape(N, K, num_layers)


def as_stacked(q: jax.Array, scale: jax.Array, offset: jax.Array | None,
               layer: jax.Array | int | None
               ) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array]:
    """Give one layer's arrays a leading L=1 axis (free) and return the layer as int32 [1].

    A traced layer is clamped into range, as indexing would, so kernels never read outside
    the stack.
    """
    if layer is None:
        q, scale = q[None], scale[None]
        offset = None if offset is None else offset[None]
        layer = 0
    layer = jnp.clip(jnp.asarray(layer, jnp.int32), 0, q.shape[0] - 1)
    return q, scale, offset, jnp.reshape(layer, (1,))


def unpack_int4(q: jax.Array) -> jax.Array:
    """uint8 [..., N, K // 2] packed nibbles -> int8 [..., N, K] values in [-8, 7]."""
    if jnp.dtype(q.dtype) != jnp.uint8:
        raise ValueError(f"packed int4 weights are uint8, got {q.dtype}")
    low = (q & 0xF).astype(jnp.int8) - 8  # element 2j
    high = (q >> 4).astype(jnp.int8) - 8  # element 2j + 1
    return jnp.stack([low, high], axis=-1).reshape(*q.shape[:-1], 2 * q.shape[-1])


def pack_int4(q_int8: jax.Array) -> jax.Array:
    """int8 [..., N, K] values in [-8, 7] -> uint8 [..., N, K // 2] (low nibble first).

    Concrete inputs are range-checked; traced values outside [-8, 7] wrap modulo 16.
    """
    if not jnp.issubdtype(q_int8.dtype, jnp.integer):
        raise ValueError(f"pack_int4 takes integer values in [-8, 7], got dtype {q_int8.dtype}")
    if q_int8.ndim < 1 or q_int8.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dim (K), got shape {q_int8.shape}")
    if not isinstance(q_int8, jax.core.Tracer):
        values = np.asarray(q_int8)
        if values.size and (values.min() < -8 or values.max() > 7):
            raise ValueError(f"int4 values must lie in [-8, 7], got [{values.min()}, "
                             f"{values.max()}]: clip or requantize first")
    nibbles = (jnp.asarray(q_int8).astype(jnp.int32) + 8).astype(jnp.uint8) & 0xF
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def dequantize(q: jax.Array, scale: jax.Array, offset: jax.Array | None, *, bits: int,
               group_size: int, dtype: DTypeLike = jnp.float32) -> jax.Array:
    """The dense weight W [..., N, K] = q * scale (+ offset), computed in float32.

    Args:
      q: int8 [..., N, K] (bits=8) or packed uint8 [..., N, K // 2] (bits=4).
      scale, offset: [..., N, K // group_size]; offset None means symmetric.
      dtype: result dtype (the product is rounded once, from float32).
    """
    N, K = check_weights(q, scale, offset, bits=bits, group_size=group_size)
    values = unpack_int4(q) if bits == 4 else q
    grouped = values.astype(jnp.float32).reshape(*q.shape[:-2], N, K // group_size, group_size)
    w = grouped * scale.astype(jnp.float32)[..., None]
    if offset is not None:
        w = w + offset.astype(jnp.float32)[..., None]
    return w.reshape(*q.shape[:-2], N, K).astype(dtype)


def quant_matmul_reference(x: jax.Array, q: jax.Array, scale: jax.Array,
                           offset: jax.Array | None, *, bits: int, group_size: int,
                           layer: jax.Array | int | None = None,
                           out_dtype: DTypeLike | None = None) -> jax.Array:
    """x @ W.T with W dequantized in float32 and float32 accumulation (the oracle).

    Args:
      x: [T, K] float32 / bfloat16 / float16.
      q, scale, offset: one layer's weight, or stacked [L, ...] arrays with `layer` (an int or
        a traced int32 scalar) selecting one.
      out_dtype: result dtype, x's by default.

    Returns:
      [T, N] in out_dtype.
    """
    check_matmul(x, q, scale, offset, bits=bits, group_size=group_size, layer=layer)
    if layer is not None:
        q, scale = q[layer], scale[layer]
        offset = None if offset is None else offset[layer]
    w = dequantize(q, scale, offset, bits=bits, group_size=group_size)  # [N, K]
    y = jax.lax.dot_general(x.astype(jnp.float32), w, (((1,), (1,)), ((), ())),
                            precision=jax.lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
    return y.astype(x.dtype if out_dtype is None else out_dtype)
