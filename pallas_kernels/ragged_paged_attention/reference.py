"""Pure-jnp ragged paged attention: the oracle for the Pallas kernels and the XLA path.

Inputs follow the ragged batch description: the flat query stream q [T, H, E] holds the new
tokens of S sequences back to back (`query_start` [S+1] offsets); sequence s has `kv_lens[s]`
tokens in the cache (its new tokens included, written before attention) on the pages
`page_table[s]`. Token i of sequence s sits at position kv_lens[s] - q_len[s] + i, which gives
the causal and sliding-window masks. Queries of a KV head's group are contiguous heads (GQA).

Decode batches (max_query_len == 1 and T == S) must place sequence s's token at index s, as
`jaxinfer.batch.build_step_batch` does; they take a path without the query gather and the
output scatter, which XLA:CPU otherwise fuses into the next matmul at a 3x cost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30


def ragged_paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_table: jax.Array,
    query_start: jax.Array,
    *,
    max_query_len: int,
    sm_scale: float,
    sliding_window: int | jax.Array | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """Attention of ragged queries over paged keys/values.

    Args:
      q: [T, H, E] queries of all sequences' new tokens, back to back (padding after the last).
      k_pages, v_pages: [NP, C, K, E] the page pool of one layer.
      kv_lens: [S] tokens in cache per sequence after this step (0 for padding sequences).
      page_table: [S, P] page ids per sequence; entries past a sequence's pages are ignored.
      query_start: [S+1] int32 cumulative query offsets (non-decreasing).
      max_query_len: static upper bound on any sequence's new tokens (a bucket size).
      sm_scale: softmax scale applied to q.k.
      sliding_window: keys at distance >= window from the query are masked (None: no window).
        May be a traced scalar (per-layer windows under `lax.scan`).
      soft_cap: optional tanh soft cap on the scaled logits (Gemma 2 style).

    Returns:
      [T, H, E] outputs in q's dtype; rows of padding tokens are zero.
    """
    T, H, E = q.shape
    _, C, K, _ = k_pages.shape
    S, P = page_table.shape
    G = H // K
    Qm = max_query_len
    kv_lens = kv_lens.astype(jnp.int32)
    query_start = query_start.astype(jnp.int32)

    if Qm == 1 and T == S:
        return paged_decode_attention_reference(
            q, k_pages, v_pages, kv_lens, page_table, sm_scale=sm_scale,
            sliding_window=sliding_window, soft_cap=soft_cap)

    q_len = query_start[1:] - query_start[:-1]  # [S]
    offs = jnp.arange(Qm, dtype=jnp.int32)
    q_valid = offs[None, :] < q_len[:, None]  # [S, Qm]
    q_index = jnp.where(q_valid, query_start[:-1, None] + offs[None, :], T)  # [S, Qm]
    qs = jnp.take(q, jnp.minimum(q_index, T - 1), axis=0)  # [S, Qm, H, E]
    qs = qs.reshape(S, Qm, K, G, E)

    k = k_pages[page_table].reshape(S, P * C, K, E)  # [S, N, K, E]
    v = v_pages[page_table].reshape(S, P * C, K, E)

    q_pos = kv_lens[:, None] - q_len[:, None] + offs[None, :]  # [S, Qm]
    k_pos = jnp.arange(P * C, dtype=jnp.int32)  # [N]
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (
        k_pos[None, None, :] < kv_lens[:, None, None])
    if sliding_window is not None:
        mask &= (q_pos[:, :, None] - k_pos[None, None, :]) < sliding_window
    mask &= q_valid[:, :, None]  # [S, Qm, N]

    # Einsum outputs follow the dots' natural layout (batch, lhs free, rhs free): XLA:CPU
    # otherwise transposes the [.., Qm, N] score tensors, which cost more than the dots.
    scores = jnp.einsum("sqkge,snke->skqgn", qs, k, preferred_element_type=jnp.float32)
    probs = _masked_softmax(scores, mask[:, None, :, None, :], sm_scale, soft_cap)
    out = jnp.einsum("skqgn,snke->skqge", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    out = out.transpose(0, 2, 1, 3, 4).reshape(S * Qm, H, E).astype(q.dtype)
    return jnp.zeros((T, H, E), q.dtype).at[q_index.reshape(-1)].set(out, mode="drop")


def causal_prefill_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    query_start: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | jax.Array | None = None,
    soft_cap: float | None = None,
    k_hist: jax.Array | None = None,
    v_hist: jax.Array | None = None,
    hist_seq: jax.Array | None = None,
    hist_pos: jax.Array | None = None,
) -> jax.Array:
    """Flat causal attention of a ragged batch over its own keys plus gathered history.

    Tokens attend to earlier tokens of the same sequence in the flat stream (block-diagonal
    causal mask) and, when given, to history keys: the cached tokens of sequences that
    started before this step, gathered into one flat list tagged with their sequence. The
    cost is T x (T + history), with no per-sequence padding (the general ragged path costs
    S x max_query_len x pages).

    Args:
      q: [T, H, E]; k, v: [T, K, E]; positions: [T]; query_start: [S+1] as above.
      k_hist, v_hist: [N, K, E] history keys/values (all four history arguments or none).
      hist_seq: [N] sequence index of each history key (-1: padding).
      hist_pos: [N] its position.

    Returns:
      [T, H, E]; rows of padding tokens are zero.
    """
    T, H, E = q.shape
    K = k.shape[1]
    G = H // K
    index = jnp.arange(T, dtype=jnp.int32)
    # Sequence of each token: the last s with query_start[s] <= t (padding: past the end).
    seq = jnp.sum(index[:, None] >= query_start[None, 1:].astype(jnp.int32), axis=1)
    valid = index < query_start[-1]
    key_seq = jnp.where(valid, seq, -1)
    key_pos = positions
    if k_hist is not None:
        k = jnp.concatenate([k, k_hist.astype(k.dtype)], axis=0)
        v = jnp.concatenate([v, v_hist.astype(v.dtype)], axis=0)
        key_seq = jnp.concatenate([key_seq, hist_seq.astype(jnp.int32)])
        key_pos = jnp.concatenate([key_pos, hist_pos.astype(key_pos.dtype)])
    mask = (seq[:, None] == key_seq[None, :]) & (key_pos[None, :] <= positions[:, None])
    mask &= valid[:, None]
    if sliding_window is not None:
        mask &= (positions[:, None] - key_pos[None, :]) < sliding_window
    qs = q.reshape(T, K, G, E)
    scores = jnp.einsum("tkge,ske->ktgs", qs, k, preferred_element_type=jnp.float32)
    probs = _masked_softmax(scores, mask[None, :, None, :], sm_scale, soft_cap)
    out = jnp.einsum("ktgs,ske->ktge", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.transpose(1, 0, 2, 3).reshape(T, H, E).astype(q.dtype)


def _masked_softmax(scores: jax.Array, mask: jax.Array, sm_scale: float,
                    soft_cap: float | None) -> jax.Array:
    """Scaled, optionally soft-capped softmax; fully masked rows give all-zero weights."""
    scores = scores * sm_scale
    if soft_cap is not None:
        scores = jnp.tanh(scores / soft_cap) * soft_cap
    scores = jnp.where(mask, scores, _MASKED)
    return jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)


def paged_decode_attention_reference(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, kv_lens: jax.Array,
    page_table: jax.Array, *, sm_scale: float, sliding_window: int | jax.Array | None,
    soft_cap: float | None,
) -> jax.Array:
    """One query per sequence, token s of sequence s: q [S, H, E] -> [S, H, E].

    The two contractions are written as broadcast-multiply-and-sum: XLA fuses them into
    loops over the gathered pages, where a dot would be a separate library call; on CPU such
    a small dot made the next matmul 4x slower (docs/architecture.md).
    """
    S, H, E = q.shape
    _, C, K, _ = k_pages.shape
    P = page_table.shape[1]
    G = H // K
    qs = q.reshape(S, 1, K, G, E).astype(jnp.float32)
    k = k_pages[page_table].reshape(S, P * C, K, 1, E)
    v = v_pages[page_table].reshape(S, P * C, K, 1, E)
    k_pos = jnp.arange(P * C, dtype=jnp.int32)[None, :]
    mask = k_pos < kv_lens[:, None]  # the query sits at kv_len - 1: causal by construction
    if sliding_window is not None:
        mask &= (kv_lens[:, None] - 1 - k_pos) < sliding_window
    scores = jnp.sum(qs * k.astype(jnp.float32), axis=-1)  # [S, N, K, G]
    scores = jnp.moveaxis(scores, 1, -1)  # [S, K, G, N]
    probs = _masked_softmax(scores, mask[:, None, None, :], sm_scale, soft_cap)
    probs = jnp.moveaxis(probs, -1, 1)[..., None]  # [S, N, K, G, 1]
    out = jnp.sum(probs * v.astype(jnp.float32), axis=1)  # [S, K, G, E]
    return out.reshape(S, H, E).astype(q.dtype)
