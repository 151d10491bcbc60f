"""Pure-jnp ragged paged attention: the oracle for the Pallas kernels and the XLA path.

Inputs follow the ragged batch description: the flat query stream q [T, H, E] holds the new
tokens of S sequences back to back (`query_start` [S+1] offsets); sequence s has `kv_lens[s]`
tokens in the cache (its new tokens included, written before attention) on the pages
`page_table[s]`. Token i of sequence s sits at position kv_lens[s] - q_len[s] + i, which gives
the causal and sliding-window masks. Queries of a KV head's group are contiguous heads (GQA).
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

    scores = jnp.einsum("sqkge,snke->skgqn", qs, k, preferred_element_type=jnp.float32)
    scores = scores * sm_scale
    if soft_cap is not None:
        scores = jnp.tanh(scores / soft_cap) * soft_cap
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask[:, None, None], probs, 0.0)  # rows with no valid key -> 0
    out = jnp.einsum("skgqn,snke->sqkge", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    out = out.reshape(S * Qm, H, E).astype(q.dtype)
    return jnp.zeros((T, H, E), q.dtype).at[q_index.reshape(-1)].set(out, mode="drop")
