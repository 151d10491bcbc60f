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


# Queries at the end of each prompt whose attention scores tokens (Scissorhands' history,
# D2O's merge weights, SnapKV's short window); one value so that one captured prefill
# serves every policy.
OBS_WINDOW = 32
# SnapKV's longer observation window (`PrefillStats.col_obs_long`). On Gemma 3's global
# layers, whose attention is diffuse, 128 queries predict what the next 256 read better
# than 32 (docs/kv_compression.md, "Eviction on Gemma 3").
LONG_OBS_WINDOW = 128


class PrefillStats(NamedTuple):
    """Per-key attention statistics of a prefill, each [S, K, T] summed over query groups.

    col_all: attention received from every valid query (H2O's accumulated attention).
    col_obs: attention received from each sequence's last `obs_window` queries (D2O's
      merge weights, SnapKV's short window).
    col_hits: how many of those queries gave the key more than a uniform share 1/(t+1)
      (Scissorhands' persistence of importance).
    col_obs_long: attention received from the last `obs_long` queries (SnapKV's selection);
      None when the prefill was not asked for it.
    """

    col_all: jax.Array
    col_obs: jax.Array
    col_hits: jax.Array
    col_obs_long: jax.Array | None = None


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
    *, scale: float, soft_cap: float | None, obs_window: int, col_all: bool = True,
    obs_long: int = 0, block: int = 128,
) -> tuple[jax.Array, PrefillStats]:
    """Causal self-attention of a padded prefill, with the statistics eviction needs.

    q [S, T, K, G, E], k, v [S, T, K, E]; sequence s owns tokens [0, lengths[s]). Queries
    are processed in blocks of `block`, each against the keys up to its own last position
    only (the causal triangle, never the whole square), so the probabilities never exist
    whole. Scores are laid out [S, K, t, G, n], q's own order, so the dots need no
    transpose. At 4096 tokens on 2 CPU cores this costs 0.33-0.40 s per layer, about the same
    with `col_all` since its column sums became a matmul (0.53 s before; the dense
    1024-query blocks this replaced: 3.1 s; docs/kv_compression.md).

    Args:
      col_all: compute H2O's accumulated attention (a reduction over every query's
        probabilities, +30% of the attention); False leaves zeros, for policies that do not
        read it (`SlotPolicy.needs_col_all`).
      obs_long: also sum the attention of the last `obs_long` (>= obs_window) queries
        (`PrefillStats.col_obs_long`); 0 leaves it None.

    Returns:
      (out [S, T, K, G, E], `PrefillStats`).
    """
    S, T, K, G, E = q.shape
    qf, kf, vf = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
    outs, col = [], jnp.zeros((S, K, T), jnp.float32)
    for start in range(0, T, block):
        stop = min(T, start + block)
        qp, kp = jnp.arange(start, stop), jnp.arange(stop)
        mask = ((kp[None, None, :] <= qp[None, :, None])
                & (kp[None, None, :] < lengths[:, None, None])
                & (qp[None, :, None] < lengths[:, None, None]))  # [S, t, n]
        if window is not None:
            mask = mask & (qp[:, None] - kp[None, :] < window)[None]
        mask = mask[:, None, :, None]  # [S, 1, t, 1, n]
        s = jnp.einsum("stkge,snke->sktgn", qf[:, start:stop], kf[:, :stop]) * scale
        s = jnp.where(mask, softcap(s, soft_cap), NEG_INF)
        p = jnp.where(mask, jax.nn.softmax(s, axis=-1), 0.0)
        outs.append(jnp.einsum("sktgn,snke->sktge", p, vf[:, :stop]))
        if col_all:
            # Column sums as a matmul with ones: XLA:CPU then keeps p materialized for both
            # dots instead of re-running the softmax inside a separate reduction (one layer
            # at 4096 tokens: +0.02-0.03 s instead of +0.07-0.1 s; end to end in
            # docs/kv_compression.md). HIGHEST keeps f32 sums where TF32 is the default.
            t = stop - start
            ones = jnp.ones((S * K, 1, t * G), jnp.float32)
            sums = jax.lax.batch_matmul(ones, p.reshape(S * K, t * G, stop),
                                        precision=jax.lax.Precision.HIGHEST)
            col = col.at[:, :, :stop].add(sums.reshape(S, K, stop))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
    out = jnp.transpose(out, (0, 2, 1, 3, 4)).astype(q.dtype)
    key_pos = jnp.arange(T)
    key_ok = key_pos[None, :] < lengths[:, None]  # [S, N]
    # The observation window's statistics come from its own few queries (gathered per
    # sequence), not from a masked pass over every query's probabilities.
    # One pass over the longer window's queries serves both windows.
    if obs_long and obs_long < obs_window:
        raise ValueError(f"obs_long {obs_long} must be 0 or at least obs_window {obs_window}")
    W = min(max(obs_window, obs_long), T)
    qpos = jnp.maximum(lengths[:, None] - W, 0) + jnp.arange(W)[None, :]  # [S, W]
    q_ok = qpos < lengths[:, None]
    q_obs = jnp.take_along_axis(q, qpos[:, :, None, None, None], axis=1)  # [S, W, K, G, E]
    mask = (key_pos[None, None, :] <= qpos[:, :, None]) & key_ok[:, None, :] & q_ok[:, :, None]
    if window is not None:
        mask = mask & (qpos[:, :, None] - key_pos[None, None, :] < window)
    _, p = attend(q_obs, k, v, mask[:, None], scale=scale, soft_cap=soft_cap)  # [S,K,G,W,N]
    col_long = p.sum(axis=(2, 3)) if obs_long else None
    short = (qpos >= lengths[:, None] - obs_window)[:, None, None, :, None]  # [S,1,1,W,1]
    p = jnp.where(short, p, 0.0)
    col_obs = p.sum(axis=(2, 3))
    share = 1.0 / (qpos.astype(jnp.float32) + 1.0)  # [S, W]
    col_hits = (p > share[:, None, None, :, None]).astype(jnp.float32).sum(axis=(2, 3))
    return out, PrefillStats(col, col_obs, col_hits, col_long)
