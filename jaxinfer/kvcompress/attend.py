"""Dense attention over explicit key/value slots, returning the probabilities policies score.

Legend: S sequences, T query tokens, N key slots, K KV heads, G query heads per KV head
(the query group), E head dim. Scores of a query group are combined per KV head, because
memory is spent per KV head: a token kept for a KV head serves its G query heads.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def softcap(scores: jax.Array, cap: float | None) -> jax.Array:
    return scores if cap is None else jnp.tanh(scores / cap) * cap


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float,
    soft_cap: float | None = None, bias: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Softmax attention of q [S, T, K, G, E] over slots k, v [S, N, K, E].

    Args:
      mask: bool, broadcastable to [S, K, T, N]; True where a query may read a slot.
      bias: optional additive logit bias broadcastable to [S, K, T, N] (merged tokens'
        log-multiplicity, compensation tokens).

    Returns:
      (out [S, T, K, G, E] in q's dtype, probabilities [S, K, G, T, N] float32; rows with
      no readable slot are all zero).
    """
    s = jnp.einsum("stkge,snke->skgtn", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    s = softcap(s, soft_cap)
    if bias is not None:
        s = s + bias[:, :, None]
    m = mask[:, :, None]
    s = jnp.where(m, s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(m, p, 0.0)
    out = jnp.einsum("skgtn,snke->stkge", p, v.astype(jnp.float32))
    return out.astype(q.dtype), p


class PrefillStats(NamedTuple):
    """Per-key attention statistics of a prefill, each [S, K, T] summed over query groups.

    col_all: attention received from every valid query (H2O's accumulated attention).
    col_obs: attention received from each sequence's last `obs_window` queries (SnapKV).
    col_hits: how many of those queries gave the key more than a uniform share 1/(t+1)
      (Scissorhands' persistence of importance).
    """

    col_all: jax.Array
    col_obs: jax.Array
    col_hits: jax.Array


def attend_with_new(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, k_new: jax.Array,
    v_new: jax.Array, *, scale: float, soft_cap: float | None = None,
    bias: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Decode attention of q [S, K, G, E] over cached slots k, v [S, N, K, E] plus this
    step's own key/value k_new, v_new [S, K, E], without writing them into the cache first
    (so the cache is read before it is updated in place, never copied).

    Args:
      mask: [S, K, N] readable slots; bias: optional [S, K, N] logit bias.

    Returns:
      (out [S, K, G, E], slot probabilities [S, K, G, N], the new token's [S, K, G]).
    """
    qf = q.astype(jnp.float32)
    s = softcap(jnp.einsum("skge,snke->skgn", qf, k.astype(jnp.float32)) * scale, soft_cap)
    if bias is not None:
        s = s + bias[:, :, None]
    s = jnp.where(mask[:, :, None], s, NEG_INF)
    s_new = softcap(jnp.einsum("skge,ske->skg", qf, k_new.astype(jnp.float32)) * scale,
                    soft_cap)
    m = jnp.maximum(jnp.max(s, axis=-1), s_new)
    e = jnp.where(mask[:, :, None], jnp.exp(s - m[..., None]), 0.0)
    e_new = jnp.exp(s_new - m)
    denom = e.sum(-1) + e_new
    p, p_new = e / denom[..., None], e_new / denom
    out = (jnp.einsum("skgn,snke->skge", p, v.astype(jnp.float32))
           + p_new[..., None] * v_new.astype(jnp.float32)[:, :, None])
    return out.astype(q.dtype), p, p_new


def causal_prefill(
    q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, window: jax.Array | None,
    *, scale: float, soft_cap: float | None, obs_window: int, block: int = 1024,
) -> tuple[jax.Array, PrefillStats]:
    """Causal self-attention of a padded prefill, with the statistics eviction needs.

    q [S, T, K, G, E], k, v [S, T, K, E]; sequence s owns tokens [0, lengths[s]). Queries
    are processed in blocks of `block` so the probabilities never exist whole.

    Returns:
      (out [S, T, K, G, E], `PrefillStats`).
    """
    T = q.shape[1]
    key_pos = jnp.arange(T)
    key_ok = key_pos[None, :] < lengths[:, None]  # [S, N]
    outs, col_all = [], 0.0
    for start in range(0, T, block):
        stop = min(T, start + block)
        qp = jnp.arange(start, stop)
        mask = (key_pos[None, :] <= qp[:, None])[None] & key_ok[:, None, :]  # [S, t, N]
        if window is not None:
            mask = mask & (qp[:, None] - key_pos[None, :] < window)[None]
        q_ok = qp[None, :] < lengths[:, None]  # [S, t]
        mask = mask & q_ok[:, :, None]
        o, p = attend(q[:, start:stop], k, v, mask[:, None], scale=scale, soft_cap=soft_cap)
        outs.append(o)
        col_all = col_all + p.sum(axis=(2, 3))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    # The observation window's statistics come from its own few queries (gathered per
    # sequence), not from a masked pass over every query's probabilities.
    W = min(obs_window, T)
    qpos = jnp.maximum(lengths[:, None] - W, 0) + jnp.arange(W)[None, :]  # [S, W]
    q_ok = qpos < lengths[:, None]
    q_obs = jnp.take_along_axis(q, qpos[:, :, None, None, None], axis=1)  # [S, W, K, G, E]
    mask = (key_pos[None, None, :] <= qpos[:, :, None]) & key_ok[:, None, :] & q_ok[:, :, None]
    if window is not None:
        mask = mask & (qpos[:, :, None] - key_pos[None, None, :] < window)
    _, p = attend(q_obs, k, v, mask[:, None], scale=scale, soft_cap=soft_cap)  # [S,K,G,W,N]
    col_obs = p.sum(axis=(2, 3))
    share = 1.0 / (qpos.astype(jnp.float32) + 1.0)  # [S, W]
    col_hits = (p > share[:, None, None, :, None]).astype(jnp.float32).sum(axis=(2, 3))
    return out, PrefillStats(col_all, col_obs, col_hits)
