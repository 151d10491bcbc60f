"""Shared wrapper logic of the flash attention kernels: checks, key-block ranges, costs.

The ranges let a query block visit only key blocks that can hold an allowed key. They assume
the packed-stream layout: each segment occupies one contiguous run of tokens and positions
strictly increase (by at least 1 per token) inside a segment. The in-kernel mask is exact;
the ranges only skip blocks that the mask would zero out entirely under that layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


def check_inputs(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None,
    positions: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Validates shapes; returns int32 segment ids and positions with defaults filled in."""
    if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape:
        raise ValueError(f"want q [T, H, E], k and v [T, K, E]; got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    T, H, E = q.shape
    if k.shape[0] != T or k.shape[2] != E or H % k.shape[1]:
        raise ValueError(f"k/v {k.shape} do not match q {q.shape} (H must be a multiple of K)")
    if segment_ids is None:
        segment_ids = jnp.zeros((T,), jnp.int32)
    if positions is None:
        positions = jnp.arange(T, dtype=jnp.int32)
    if segment_ids.shape != (T,) or positions.shape != (T,):
        raise ValueError(f"segment_ids {segment_ids.shape} and positions {positions.shape} "
                         f"must be [{T}]")
    return segment_ids.astype(jnp.int32), positions.astype(jnp.int32)


def window_scalar(sliding_window: int | jax.Array | None) -> jax.Array:
    """The window as a [1] int32 array for the kernels (unused when there is no window)."""
    if sliding_window is None:
        return jnp.zeros((1,), jnp.int32)
    return jnp.reshape(jnp.asarray(sliding_window, jnp.int32), (1,))


def token_key_ranges(
    segment_ids: jax.Array,
    *,
    causal: bool,
    sliding_window: int | jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Per query token, the half-open token range [lo, hi) holding every key it may attend.

    Padding tokens (segment -1) get an empty range (lo = T, hi = 0).
    """
    T = segment_ids.shape[0]
    index = jnp.arange(T, dtype=jnp.int32)
    change = segment_ids[1:] != segment_ids[:-1]  # [T-1]: a new run starts at t+1
    starts = jnp.concatenate([jnp.ones((1,), jnp.bool_), change])
    ends = jnp.concatenate([change, jnp.ones((1,), jnp.bool_)])
    run_start = lax.cummax(jnp.where(starts, index, 0), axis=0)
    run_end = lax.cummin(jnp.where(ends, index + 1, T), axis=0, reverse=True)
    lo = run_start
    if sliding_window is not None:
        # Positions grow by >= 1 per token, so keys more than window-1 tokens back are masked.
        lo = jnp.maximum(lo, index - jnp.asarray(sliding_window, jnp.int32) + 1)
    hi = index + 1 if causal else run_end
    valid = segment_ids >= 0
    return jnp.where(valid, lo, T), jnp.where(valid, hi, 0)


def block_key_ranges(
    key_lo: jax.Array,
    key_hi: jax.Array,
    *,
    block_q: int,
    block_k: int,
) -> tuple[jax.Array, jax.Array]:
    """Per query block, the half-open range of key blocks to visit (both 0 when empty).

    Args:
      key_lo, key_hi: [T] per-token key ranges from `token_key_ranges`, T a multiple of
        block_q and block_k.
    """
    num_q_blocks = key_lo.shape[0] // block_q
    lo = jnp.min(key_lo.reshape(num_q_blocks, block_q), axis=1)
    hi = jnp.max(key_hi.reshape(num_q_blocks, block_q), axis=1)
    empty = hi <= lo
    first = jnp.where(empty, 0, lo // block_k)
    last = jnp.where(empty, 0, (hi + block_k - 1) // block_k)
    return first.astype(jnp.int32), last.astype(jnp.int32)


def attention_cost(
    num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, itemsize: int, *,
    causal: bool,
) -> pl.CostEstimate:
    """Upper-bound cost of one call (segments and windows only lower it), for XLA scheduling."""
    pairs = num_tokens * (num_tokens + 1) // 2 if causal else num_tokens * num_tokens
    return pl.CostEstimate(
        flops=4 * pairs * num_heads * head_dim,
        transcendentals=pairs * num_heads,
        bytes_accessed=itemsize * num_tokens * head_dim * 2 * (num_heads + num_kv_heads),
    )
