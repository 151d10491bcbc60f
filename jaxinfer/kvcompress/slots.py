"""Eviction caches: a fixed number of key/value slots per (layer, sequence, KV head).

Legend: L layers, S sequences, B budget (slots), K KV heads, E head dim, T prefill tokens.
Each slot keeps a token's rotated key and value (RoPE already applied at the token's
original position, so attention needs no re-rotation) plus that position, a policy score
and, when merging, how many tokens the slot stands for. Valid slots are always the
prefix [0, min(seen, B)). A decode step reads the slots, then writes its token with one
scatter into the next free slot or the victim's, so XLA updates the cache in place.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

INF = 3e38


@flax.struct.dataclass
class SlotCache:
    """Kept tokens of one or all layers (a leading L axis when stacked)."""

    k: Any  # [(L,) S, B, K, E]
    v: Any  # [(L,) S, B, K, E]
    pos: Any  # [(L,) S, B, K] int32 original positions, -1 for an empty slot
    score: Any  # [(L,) S, B, K] float32 policy importance (higher is kept)
    mult: Any  # [(L,) S, B, K] float32 tokens merged into the slot (1: itself)

    @property
    def budget(self) -> int:
        return self.k.shape[-3]


def select_prefill(
    k: jax.Array, v: jax.Array, lengths: jax.Array, keep_score: jax.Array, budget: int,
    *, merge: bool = False, merge_threshold: float = 0.0, raw_score: jax.Array | None = None,
    merge_weight: jax.Array | None = None,
) -> SlotCache:
    """Keep the `budget` best tokens of a prefill per (sequence, KV head).

    Args:
      k, v: [S, T, K, E] the prefill's keys (rotated) and values.
      lengths: [S] valid tokens per sequence.
      keep_score: [S, K, T] higher is kept; tokens past a sequence's length never are.
      budget: slots B (static).
      merge: merge each dropped token into its most similar kept key (cosine) when the
        similarity is at least `merge_threshold`, instead of dropping it, weighted by
        importance. Tokens whose keep_score is -INF (hidden by a sliding window) are
        dropped, never merged: no later query of the layer reads them in the full cache.
      raw_score: [S, K, T] the importance to store (keep_score without the protection of
        sink / recent tokens), and to merge by unless `merge_weight` is given; defaults to
        keep_score.
      merge_weight: [S, K, T] the importance merges average values by; defaults to the
        stored importance.

    Returns:
      A `SlotCache` without the L axis; slots [0, min(length, B)) valid, the rest empty.
    """
    S, T, K, E = k.shape
    valid = jnp.arange(T)[None, :] < lengths[:, None]  # [S, T]
    score = jnp.where(valid[:, None, :], keep_score, -INF)
    n = min(budget, T)
    top_score, idx = jax.lax.top_k(score, n)  # [S, K, n], valid tokens first
    kept = top_score > -INF
    idx_t = jnp.swapaxes(idx, 1, 2)  # [S, n, K]
    gather = lambda a: jnp.take_along_axis(a, idx_t[..., None], axis=1)  # noqa: E731
    ks, vs = gather(k), gather(v)
    pos = jnp.where(jnp.swapaxes(kept, 1, 2), idx_t, -1).astype(jnp.int32)
    mult = jnp.swapaxes(kept, 1, 2).astype(jnp.float32)
    raw = keep_score if raw_score is None else raw_score
    sc = jnp.swapaxes(jnp.where(kept, jnp.take_along_axis(raw, idx, axis=-1), 0.0), 1, 2)
    if merge and n < T:
        weight = raw if merge_weight is None else merge_weight
        ks, vs, mult = _merge_dropped(k, v, score > -INF, idx, kept, ks, vs, mult, weight,
                                      merge_threshold)
    pad = budget - n
    padn = lambda a, fill: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2),  # noqa: E731
                                   constant_values=fill)
    return SlotCache(k=padn(ks, 0).astype(k.dtype), v=padn(vs, 0).astype(v.dtype),
                     pos=padn(pos, -1), score=padn(sc, 0.0), mult=padn(mult, 0.0))


def _merge_dropped(k, v, mergeable, idx, kept, ks, vs, mult, weight, threshold):
    """Fold every dropped token's value (of those `mergeable` [S, K, T]) into its most
    similar kept key (cosine, per KV head), weighted by importance; the kept key is
    unchanged and its slot's multiplicity grows by the dropped token's share, so attention
    gives it that token's mass too."""
    S, T, K, E = k.shape
    n = idx.shape[-1]
    is_kept = jnp.zeros((S, K, T), bool).at[
        jnp.arange(S)[:, None, None], jnp.arange(K)[None, :, None], idx].set(kept)
    dropped = mergeable & ~is_kept  # [S, K, T]
    unit = lambda a: a / (jnp.linalg.norm(a, axis=-1, keepdims=True) + 1e-6)  # noqa: E731
    # Only dropped tokens need a match, and a sequence drops at most T - n of them (it keeps
    # min(length, n) of its length tokens): compact them to D = T - n rows per head. Then
    # each one's best kept match, 256 at a time: the [S, K, 256, n] similarities stay in
    # cache between the dot and the two reductions over them, and the first maximum is a
    # float max then a boolean argmax (XLA:CPU's float argmax is a slow variadic reduce).
    # At T=4096, n=1024: 22 ms per layer, against 68 ms for the whole [S, K, T, n] matrix
    # with a float argmax.
    D = T - n
    si, ki = jnp.arange(S)[:, None, None], jnp.arange(K)[None, :, None]
    slot = jnp.where(dropped, jnp.cumsum(dropped, axis=-1) - 1, D)  # [S, K, T]
    order = jnp.zeros((S, K, D), jnp.int32).at[si, ki, slot].set(
        jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (S, K, T)), mode="drop")
    is_drop = jnp.arange(D)[None, None, :] < dropped.sum(-1, keepdims=True)
    kd = jnp.take_along_axis(jnp.swapaxes(k, 1, 2), order[..., None], axis=2)  # [S, K, D, E]
    ku = unit(kd.astype(jnp.float32))
    ku_kept = jnp.swapaxes(unit(ks.astype(jnp.float32)), 1, 2)  # [S, K, n, E]
    C = min(256, D)
    Dp = -(-D // C) * C
    chunks = jnp.pad(ku, [(0, 0), (0, 0), (0, Dp - D), (0, 0)]).reshape(S, K, Dp // C, C, E)

    def match(kc: jax.Array) -> tuple[jax.Array, jax.Array]:  # [S, K, C, E]
        sim = jnp.einsum("skce,skne->skcn", kc, ku_kept)
        sim = jnp.where(kept[:, :, None, :], sim, -INF)
        top = jnp.max(sim, axis=-1, keepdims=True)
        return top[..., 0], jnp.argmax(sim == top, axis=-1)

    top, target = jax.lax.map(match, jnp.moveaxis(chunks, 2, 0))  # [Dp/C, S, K, C]
    best = jnp.moveaxis(top, 0, 2).reshape(S, K, Dp)[..., :D]
    target = jnp.moveaxis(target, 0, 2).reshape(S, K, Dp)[..., :D]
    w_drop = jnp.where(is_drop & (best >= threshold),
                       jnp.take_along_axis(weight, order, axis=-1), 0.0)  # [S, K, D]
    # Scatter-add each dropped token into its target slot (a one-hot [S, K, T, n] matrix
    # and a dot cost 4x as much: 119 -> 30 ms per layer at T=4096, n=1024).
    vd = jnp.take_along_axis(jnp.swapaxes(v, 1, 2), order[..., None], axis=2)
    wv = w_drop[..., None] * vd.astype(jnp.float32)  # [S, K, D, E]
    add_v = jnp.zeros((S, K, n, E), jnp.float32).at[si, ki, target].add(wv)
    add_v = jnp.swapaxes(add_v, 1, 2)  # [S, n, K, E]
    added = jnp.swapaxes(jnp.zeros((S, K, n), jnp.float32).at[si, ki, target].add(w_drop),
                         1, 2)  # [S, n, K] importance folded in
    w_kept = jnp.swapaxes(jnp.take_along_axis(weight, idx, axis=-1), 1, 2)  # [S, n, K]
    w_kept = jnp.maximum(w_kept, 1e-6)
    vs = (vs.astype(jnp.float32) * w_kept[..., None] + add_v) / (w_kept + added)[..., None]
    return ks, vs, mult * (1.0 + added / w_kept)


def write_slot(cache: SlotCache, layer: jax.Array, target: jax.Array, k: jax.Array,
               v: jax.Array, seen: jax.Array, score: jax.Array) -> SlotCache:
    """Write a decode step's token (k, v [S, K, E] at position `seen` [S], initial `score`
    [S, K]) into slot target [S, K] of each KV head (out of range: not kept)."""
    S, K = target.shape
    si, hi = jnp.arange(S)[:, None], jnp.arange(K)[None, :]
    at = lambda a: a.at[layer, si, target, hi]  # noqa: E731
    return cache.replace(
        k=at(cache.k).set(k.astype(cache.k.dtype), mode="drop"),
        v=at(cache.v).set(v.astype(cache.v.dtype), mode="drop"),
        pos=at(cache.pos).set(jnp.broadcast_to(seen[:, None], (S, K)), mode="drop"),
        score=at(cache.score).set(score, mode="drop"),
        mult=at(cache.mult).set(1.0, mode="drop"))


def target_slot(victim_rank: jax.Array, seen: jax.Array) -> jax.Array:
    """Where a decode step's token goes [S, K]: the next free slot while the budget is not
    full (the same for every head), else the slot of lowest `victim_rank` [S, B, K]."""
    B = victim_rank.shape[1]
    victim = jnp.argmin(victim_rank, axis=1).astype(jnp.int32)
    return jnp.where((seen < B)[:, None], seen[:, None].astype(jnp.int32), victim)


def merge_victim(cache: SlotCache, layer: jax.Array, target: jax.Array, seen: jax.Array,
                 threshold: float, window: jax.Array | None = None) -> SlotCache:
    """Before a full cache's victim slot `target` [S, K] is overwritten, fold its value into
    the other valid slot with the most similar key (cosine >= threshold), weighted by their
    scores, and grow that slot's multiplicity. With a sliding `window`, a victim the window
    already hides from the token at `seen` is dropped, not merged (the full cache never
    reads it again), and only slots it still shows receive merges."""
    S, B, K, E = cache.k.shape[1:]
    si, hi = jnp.arange(S)[:, None], jnp.arange(K)[None, :]
    full = (seen >= B)[:, None]
    safe_t = jnp.minimum(target, B - 1)
    k_l = cache.k[layer].astype(jnp.float32)
    unit = lambda a: a / (jnp.linalg.norm(a, axis=-1, keepdims=True) + 1e-6)  # noqa: E731
    sim = jnp.einsum("ske,sbke->skb", unit(k_l[si, safe_t, hi]), unit(k_l))
    ok = (cache.pos[layer] >= 0).transpose(0, 2, 1) & (
        jnp.arange(B)[None, None, :] != safe_t[..., None])
    if window is not None:  # only into slots the window still shows
        ok = ok & slot_mask(cache.pos[layer], seen, window)
    sim = jnp.where(ok, sim, -INF)
    into = jnp.argmax(sim, axis=-1)  # [S, K]
    do = full & (jnp.max(sim, axis=-1) >= threshold)
    if window is not None:
        do = do & (seen[:, None] - cache.pos[layer][si, safe_t, hi] < window)
    safe = jnp.where(do, into, 0)
    score = cache.score[layer]
    w_v = jnp.maximum(score[si, safe_t, hi], 0.0)
    w_i = jnp.maximum(score[si, safe, hi], 1e-6)
    v_l = cache.v[layer]
    new_v = (v_l[si, safe, hi].astype(jnp.float32) * w_i[..., None]
             + v_l[si, safe_t, hi].astype(jnp.float32) * w_v[..., None]) / (w_i + w_v)[..., None]
    new_mult = cache.mult[layer][si, safe, hi] * (1.0 + w_v / w_i)
    into = jnp.where(do, into, B)  # out of range: no merge
    return cache.replace(
        v=cache.v.at[layer, si, into, hi].set(new_v.astype(cache.v.dtype), mode="drop"),
        mult=cache.mult.at[layer, si, into, hi].set(new_mult, mode="drop"),
        score=cache.score.at[layer, si, into, hi].add(w_v, mode="drop"),
    )


def slot_mask(pos_layer: jax.Array, seen: jax.Array, window: jax.Array | None) -> jax.Array:
    """[S, K, B] slots of one layer readable by the token at position `seen` [S]."""
    m = pos_layer >= 0
    if window is not None:
        m = m & (seen[:, None, None] - pos_layer < window)
    return m.transpose(0, 2, 1)


def merge_bias(mult_layer: jax.Array) -> jax.Array:
    """Log-multiplicity logit bias [S, K, B]: a slot that stands for n merged tokens takes
    the softmax mass n near-identical keys would have had."""
    return jnp.log(jnp.maximum(mult_layer, 1.0)).transpose(0, 2, 1)


def nbytes(tree: Any) -> int:
    """Bytes of every array in a pytree."""
    return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree)))
