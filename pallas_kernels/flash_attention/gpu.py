"""Flash attention for long packed prefill on GPU: a Pallas kernel lowered through Triton.

One program per (query block, KV head) computes all G query heads of the group at once, as
block_q * G' score rows (G' = G padded to a power of two), so each K/V tile is read once per
group. A `fori_loop` with dynamic bounds visits only the key blocks a query block can attend.
Dimension legend: T tokens, H query heads, K KV heads, G = H // K, E head dim, R score rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.flash_attention.layout import (
    attention_cost,
    block_key_ranges,
    check_inputs,
    next_power_of_2,
    round_up,
    token_key_ranges,
    window_scalar,
)
from pallas_kernels.flash_attention.tuning import flash_tuning

_MASKED = -1e30
# Triton's tl.dot wants every operand dimension >= 16 and all tile sizes powers of two.
_MIN_DOT = 16


def _flash_kernel(
    first_ref,  # [num_q_blocks] first key block per query block
    last_ref,  # [num_q_blocks] end (exclusive) key block per query block
    window_ref,  # [1] sliding window
    q_ref,  # [R, E] rows (token, head of the group) of one query block
    q_segment_ref,  # [R]
    q_position_ref,  # [R]
    k_ref,  # [T, E] keys of one KV head
    v_ref,  # [T, E]
    k_segment_ref,  # [T]
    k_position_ref,  # [T]
    o_ref,  # [R, E]
    *,
    sm_scale: float,
    causal: bool,
    has_window: bool,
    soft_cap: float | None,
    block_k: int,
):
    block = pl.program_id(0)
    q = q_ref[...]
    q_segment = q_segment_ref[...]
    q_position = q_position_ref[...]
    window = window_ref[0]
    rows, head_dim = q.shape

    def visit(key_block, carry):
        acc, row_max, row_sum = carry
        keys = pl.ds(key_block * block_k, block_k)
        k = k_ref[keys, :]
        scores = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * sm_scale  # [R, block_k]
        if soft_cap is not None:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        k_segment = k_segment_ref[keys]
        k_position = k_position_ref[keys]
        mask = (q_segment[:, None] == k_segment[None, :]) & (q_segment[:, None] >= 0)
        distance = q_position[:, None] - k_position[None, :]
        if causal:
            mask &= distance >= 0
        if has_window:
            mask &= distance < window
        scores = jnp.where(mask, scores, _MASKED)
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=1))
        # Zero masked weights explicitly: a row with no allowed key so far has max == _MASKED.
        weights = jnp.where(mask, jnp.exp(scores - new_max[:, None]), 0.0)
        rescale = jnp.exp(row_max - new_max)
        v = v_ref[keys, :]
        acc = acc * rescale[:, None] + jnp.dot(weights.astype(v.dtype), v,
                                                preferred_element_type=jnp.float32)
        return acc, new_max, row_sum * rescale + jnp.sum(weights, axis=1)

    init = (jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows,), _MASKED, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, _, row_sum = lax.fori_loop(first_ref[block], last_ref[block], visit, init)
    has_keys = row_sum > 0
    out = acc / jnp.where(has_keys, row_sum, 1.0)[:, None]
    o_ref[...] = jnp.where(has_keys[:, None], out, 0.0).astype(o_ref.dtype)


def flash_attention_gpu(
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
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Flash attention of a packed token stream, Triton kernel (see the reference for masks).

    Segments must be contiguous runs and positions strictly increasing inside a segment
    (this is what the block skipping relies on; the mask itself matches the reference).

    Args:
      q: [T, H, E]; k, v: [T, K, E]; segment_ids, positions: [T] int32 (defaults: one
        segment, arange). Padding tokens carry segment -1 and get zero rows.
      sm_scale, causal, sliding_window, soft_cap: as `flash_attention_reference`;
        sliding_window may be a traced int32 scalar.
      block_q: query tokens per program (power of two; default from `flash_tuning`);
        compiled kernels need block_q * G' >= 16 (G' = G rounded up to a power of two).
      block_k: keys per loop step (power of two; >= 16 when compiled).
      num_warps, num_stages: Triton launch settings (default from `flash_tuning`).
      interpret: run the kernel in the Pallas interpreter (any backend).

    Returns:
      [T, H, E] in q's dtype. float32 inputs get the dots' default precision (TF32 on GPU).
    """
    segment_ids, positions = check_inputs(q, k, v, segment_ids, positions)
    T, H, E = q.shape
    K = k.shape[1]
    G = H // K
    group = next_power_of_2(G)  # G': padded heads per program
    head_dim = max(_MIN_DOT, next_power_of_2(E))
    tuning = flash_tuning("gpu", E, q.dtype)
    span = max(_MIN_DOT, next_power_of_2(T))
    if block_q is None:
        block_q = min(max(tuning["block_q"] // group, 1), span)
        block_q = max(block_q, _MIN_DOT // group)
    if block_k is None:
        block_k = min(tuning["block_k"], span)
    if block_q != next_power_of_2(block_q) or block_k != next_power_of_2(block_k):
        raise ValueError(f"block_q={block_q} and block_k={block_k} must be powers of two")
    if not interpret and (block_q * group < _MIN_DOT or block_k < _MIN_DOT):
        raise ValueError(f"need block_q * {group} >= {_MIN_DOT} and block_k >= {_MIN_DOT}")
    rows = block_q * group
    padded = round_up(T, max(block_q, block_k))
    num_q_blocks = padded // block_q
    pad_tokens = padded - T

    segment_ids = jnp.pad(segment_ids, (0, pad_tokens), constant_values=-1)
    positions = jnp.pad(positions, (0, pad_tokens))
    key_lo, key_hi = token_key_ranges(segment_ids, causal=causal, sliding_window=sliding_window)
    first, last = block_key_ranges(key_lo, key_hi, block_q=block_q, block_k=block_k)

    # q [T, H, E] -> [K, T, G', E] -> [K, num_q_blocks, R, E]: row r of a block is
    # token r // G', head r % G' of the group.
    qg = jnp.pad(q.reshape(T, K, G, E), ((0, pad_tokens), (0, 0), (0, group - G),
                                         (0, head_dim - E)))
    qg = qg.transpose(1, 0, 2, 3).reshape(K, num_q_blocks, rows, head_dim)
    kv_pad = ((0, pad_tokens), (0, 0), (0, head_dim - E))
    kk = jnp.pad(k, kv_pad).transpose(1, 0, 2)  # [K, T, E]
    vv = jnp.pad(v, kv_pad).transpose(1, 0, 2)
    q_segment = jnp.repeat(segment_ids, group).reshape(num_q_blocks, rows)
    q_position = jnp.repeat(positions, group).reshape(num_q_blocks, rows)

    kernel = functools.partial(
        _flash_kernel, sm_scale=float(sm_scale), causal=causal,
        has_window=sliding_window is not None,
        soft_cap=None if soft_cap is None else float(soft_cap), block_k=block_k)
    whole = lambda n: pl.BlockSpec((n,), lambda i, h: (0,))
    out = pl.pallas_call(
        kernel,
        grid=(num_q_blocks, K),
        in_specs=[
            whole(num_q_blocks),
            whole(num_q_blocks),
            whole(1),
            pl.BlockSpec((None, None, rows, head_dim), lambda i, h: (h, i, 0, 0)),
            pl.BlockSpec((None, rows), lambda i, h: (i, 0)),
            pl.BlockSpec((None, rows), lambda i, h: (i, 0)),
            pl.BlockSpec((None, padded, head_dim), lambda i, h: (h, 0, 0)),
            pl.BlockSpec((None, padded, head_dim), lambda i, h: (h, 0, 0)),
            whole(padded),
            whole(padded),
        ],
        out_specs=pl.BlockSpec((None, None, rows, head_dim), lambda i, h: (h, i, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((K, num_q_blocks, rows, head_dim), q.dtype),
        compiler_params=pltriton.CompilerParams(
            num_warps=num_warps if num_warps is not None else tuning["num_warps"],
            num_stages=num_stages if num_stages is not None else tuning["num_stages"]),
        cost_estimate=attention_cost(T, H, K, E, q.dtype.itemsize, causal=causal),
        interpret=interpret,
        name="flash_attention_gpu",
    )(first, last, window_scalar(sliding_window), qg, q_segment, q_position, kk, vv,
      segment_ids, positions)
    out = out.reshape(K, padded, group, head_dim).transpose(1, 0, 2, 3)
    return out[:T, :, :G, :E].reshape(T, H, E)
