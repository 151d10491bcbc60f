"""Shared pieces of the ragged paged attention kernels: argument checks and masks.

Both kernels see the ragged batch the reference sees (`reference.py`): a flat query stream
q [T, H, E] whose sequence s owns rows query_start[s]:query_start[s+1], attending to the
kv_lens[s] tokens of its pages (its new tokens included). Token i of sequence s sits at
position kv_lens[s] - q_len[s] + i. The kernels lay the G query heads of one KV head next to
each other as rows of one matrix, so keys and values are read once per KV head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Large finite negative logit: exp() of it underflows to 0 without inf - inf = nan.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# A window no sequence reaches: "no sliding window" for kernels that take it as data.
NO_WINDOW = 1 << 30


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def check_inputs(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, kv_lens: jax.Array,
                 page_table: jax.Array, query_start: jax.Array,
                 layer: jax.Array | int | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Validate shapes; return (k_cache, v_cache, layer) with a leading layer axis.

    The caches may be one layer's pool [NP, C, K, E] or the stacked pools [L, NP, C, K, E]
    with `layer` selecting one (read in the kernel: no copy of the layer).
    """
    if q.ndim != 3:
        raise ValueError(f"q must be [T, H, E], got shape {q.shape}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} differ")
    if k_cache.ndim == 4:
        if layer not in (None, 0):
            raise ValueError("layer given for a single-layer cache [NP, C, K, E]")
        k_cache, v_cache, layer = k_cache[None], v_cache[None], 0
    elif k_cache.ndim != 5:
        raise ValueError(f"cache must be [NP, C, K, E] or [L, NP, C, K, E], got {k_cache.shape}")
    elif layer is None:
        raise ValueError("a stacked cache [L, NP, C, K, E] needs the layer index")
    _, H, E = q.shape
    K = k_cache.shape[3]
    if k_cache.shape[4] != E:
        raise ValueError(f"head dim of q ({E}) and cache ({k_cache.shape[4]}) differ")
    if H % K:
        raise ValueError(f"{H} query heads are not a multiple of {K} KV heads")
    S = kv_lens.shape[0]
    if page_table.ndim != 2 or page_table.shape[0] != S or query_start.shape != (S + 1,):
        raise ValueError(
            f"kv_lens {kv_lens.shape}, page_table {page_table.shape} and query_start "
            f"{query_start.shape} must be [S], [S, P] and [S+1]")
    return k_cache, v_cache, jnp.asarray(layer, jnp.int32)


def window_array(sliding_window: int | jax.Array | None) -> jax.Array:
    """The window as an int32 [1] array (NO_WINDOW when absent): kernels read it as data,
    so a per-layer window traced under `lax.scan` needs no recompilation."""
    if sliding_window is None:
        return jnp.full((1,), NO_WINDOW, jnp.int32)
    return jnp.reshape(jnp.asarray(sliding_window, jnp.int32), (1,))


def key_block_range(q_first: jax.Array, q_last: jax.Array, kv_len: jax.Array,
                    window: jax.Array, block_k: int) -> tuple[jax.Array, jax.Array]:
    """[lo, hi) key blocks that queries at positions q_first..q_last may attend."""
    hi = jnp.minimum(kv_len, q_last + 1)
    lo = jnp.maximum(q_first - window + 1, 0)
    # lax.div: truncating division of non-negative ints (jnp's floor division needs the
    # sign, which Mosaic lowers only with a TPU at hand).
    return jax.lax.div(lo, block_k), jax.lax.div(hi + block_k - 1, block_k)


def softcap(scores: jax.Array, soft_cap: float | None) -> jax.Array:
    """Optional tanh soft cap of scaled logits."""
    if soft_cap is None:
        return scores
    return jnp.tanh(scores / soft_cap) * soft_cap
