"""Small pure building blocks: RMSNorm, rotary embeddings, dense layers, activations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig, RopeConfig


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, weight_offset: float = 0.0) -> jax.Array:
    """RMSNorm over the last axis, computed in float32 as transformers does.

    Llama-style (offset 0) casts back before scaling by `weight`; Gemma-style (offset 1)
    scales by `1 + weight` in float32, then casts.
    """
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    weight = weight.reshape((1,) * (x.ndim - weight.ndim) + weight.shape)
    if weight_offset:
        return (y * (weight_offset + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * y.astype(x.dtype)


def rope_tables(
    rope: RopeConfig, cfg: ModelConfig, positions: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """cos and sin [T, E/2] in float32 for integer `positions` [T]."""
    inv_freq = jnp.asarray(rope.inv_freq(cfg.head_dim, cfg.max_position_embeddings))
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    scale = np.float32(rope.attention_scaling)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (Hugging Face convention) on x [T, N, E] with cos/sin [T, E/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos = cos[:, None, :].astype(x.dtype)
    sin = sin[:, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def linear(x: jax.Array, w: jax.Array, preferred_element_type: jnp.dtype | None = None
           ) -> jax.Array:
    """x [T, in] times weights [out, in] (PyTorch layout) -> [T, out].

    The contraction is written two ways on purpose: XLA:CPU runs a single row (decode) about
    2x faster as `x @ w.T` (a gemv over rows) and many rows about 2x faster as a dot_general
    contracting both minor axes (measured in docs/architecture.md). Both are one dot to GPU
    and TPU compilers.
    """
    if x.shape[0] == 1:
        return jnp.matmul(x, w.T, preferred_element_type=preferred_element_type)
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                               preferred_element_type=preferred_element_type)


def activation(name: str, x: jax.Array) -> jax.Array:
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unknown activation {name!r}")
