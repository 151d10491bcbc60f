"""Batched token sampling on device: greedy, temperature, top-k, top-p, min-p, per-row seeds."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(
    logits: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
    seed: jax.Array,
    step: jax.Array,
    *,
    all_greedy: bool,
) -> jax.Array:
    """Choose one token per row.

    Args:
      logits: [S, V] float32.
      temperature: [S]; 0 selects greedy for that row.
      top_k: [S] int32; 0 disables.
      top_p: [S] float32 in (0, 1].
      min_p: [S] float32 in [0, 1].
      seed, step: [S]; row s draws with key fold_in(PRNGKey(seed[s]), step[s]), so a seeded
        request gives the same tokens whatever else is in the batch.
      all_greedy: static; skips the sort when no row samples.

    Returns:
      [S] int32 token ids.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if all_greedy:
        return greedy
    V = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    # Sort once, descending; every filter is a prefix of this order.
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    rank = jnp.arange(V, dtype=jnp.int32)[None, :]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
    keep &= before < top_p[:, None]
    keep &= probs >= min_p[:, None] * probs[:, :1]
    keep = keep.at[:, 0].set(True)  # the most likely token always survives
    masked = jnp.where(keep, sorted_logits, -jnp.inf)

    def draw(row_logits: jax.Array, row_seed: jax.Array, row_step: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.PRNGKey(row_seed), row_step)
        return jax.random.categorical(key, row_logits)

    choice = jax.vmap(draw)(masked, seed, step)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)
