"""Pure-jnp flash attention oracle: segmented (packed) causal GQA attention over one token stream.

Dimension legend: T tokens, H query heads, K KV heads, G = H // K query heads per KV head,
E head dim. Query head h reads KV head h // G (the heads of a group are contiguous).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30


def attention_mask(
    segment_ids: jax.Array,
    positions: jax.Array,
    *,
    causal: bool,
    sliding_window: int | jax.Array | None,
) -> jax.Array:
    """[T, T] boolean mask: query t (rows) may attend key u (columns).

    Token t attends u iff both belong to the same segment (not -1), and, if `causal`,
    positions[u] <= positions[t], and, with a window, positions[t] - positions[u] < window.
    """
    same_segment = (segment_ids[:, None] == segment_ids[None, :]) & (segment_ids[:, None] >= 0)
    distance = positions[:, None] - positions[None, :]  # [T(query), T(key)]
    mask = same_segment
    if causal:
        mask &= distance >= 0
    if sliding_window is not None:
        mask &= distance < jnp.asarray(sliding_window, jnp.int32)
    return mask


def flash_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    sm_scale: float,
    causal: bool = True,
    sliding_window: int | jax.Array | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """Attention of a packed token stream (several sequences back to back) over itself.

    Args:
      q: [T, H, E] queries.
      k, v: [T, K, E] keys and values of the same tokens.
      segment_ids: [T] int32 sequence id per token, -1 for padding (default: all 0).
      positions: [T] int32 position per token (default: arange(T)).
      sm_scale: softmax scale applied to q.k.
      causal: mask keys at later positions.
      sliding_window: mask keys at distance >= window (None: no window); may be traced.
      soft_cap: optional tanh cap on the scaled logits, cap * tanh(s / cap).

    Returns:
      [T, H, E] in q's dtype; rows with no allowed key (padding) are zero.
    """
    T, H, E = q.shape
    K = k.shape[1]
    G = H // K
    if segment_ids is None:
        segment_ids = jnp.zeros((T,), jnp.int32)
    if positions is None:
        positions = jnp.arange(T, dtype=jnp.int32)
    mask = attention_mask(segment_ids.astype(jnp.int32), positions.astype(jnp.int32),
                          causal=causal, sliding_window=sliding_window)  # [T, T]
    qg = q.reshape(T, K, G, E).astype(jnp.float32)
    scores = jnp.einsum("tkge,uke->kgtu", qg, k.astype(jnp.float32),
                        preferred_element_type=jnp.float32) * jnp.float32(sm_scale)
    if soft_cap is not None:
        scores = jnp.float32(soft_cap) * jnp.tanh(scores / jnp.float32(soft_cap))
    scores = jnp.where(mask[None, None], scores, jnp.float32(_MASKED))
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.where(mask[None, None], jnp.exp(scores - row_max), jnp.float32(0))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(total > 0, total, jnp.float32(1))
    out = jnp.einsum("kgtu,uke->tkge", probs, v.astype(jnp.float32),
                     preferred_element_type=jnp.float32)
    return out.reshape(T, H, E).astype(q.dtype)
