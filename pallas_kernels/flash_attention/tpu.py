"""Flash attention for long packed prefill on TPU: a Pallas kernel lowered through Mosaic.

Grid (KV head, query block, key block). The online-softmax state of the G query heads of a
group lives in VMEM scratch across the key axis and is written out at the last key step. Key
block ranges arrive by scalar prefetch: steps outside the range skip their compute under
`pl.when`, and the key index_map clamps into the range so those steps fetch no new block.
Dimension legend: T tokens, H query heads, K KV heads, G = H // K, E head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention.layout import (
    attention_cost,
    block_key_ranges,
    check_inputs,
    round_up,
    token_key_ranges,
    window_scalar,
)
from pallas_kernels.flash_attention.tuning import flash_tuning

_MASKED = -1e30
_LANES = 128
_SUBLANES = 8
_DEFAULT_SCOPED_VMEM = 12 * 2**20  # below Mosaic's default scoped VMEM limit, with margin
# jax 0.10.2 and 0.11.x call it CompilerParams; older releases TPUCompilerParams.
_CompilerParams = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams


def _flash_kernel(
    first_ref,  # SMEM [num_q_blocks] first key block per query block
    last_ref,  # SMEM [num_q_blocks] end (exclusive) key block per query block
    window_ref,  # SMEM [1] sliding window
    q_ref,  # [G, block_q, E]
    q_segment_ref,  # [block_q, 128] replicated over lanes
    q_position_ref,  # [block_q, 128] replicated over lanes
    k_ref,  # [block_k, E]
    v_ref,  # [block_k, E]
    k_segment_ref,  # [8, block_k] replicated over sublanes
    k_position_ref,  # [8, block_k] replicated over sublanes
    o_ref,  # [G, block_q, E]
    max_ref,  # VMEM [G, block_q, 128] running row max, replicated over lanes
    sum_ref,  # VMEM [G, block_q, 128] running softmax denominator, replicated over lanes
    acc_ref,  # VMEM [G, block_q, E] unnormalised output
    *,
    sm_scale: float,
    causal: bool,
    has_window: bool,
    soft_cap: float | None,
):
    block, key_block = pl.program_id(1), pl.program_id(2)
    groups, block_q, _ = q_ref.shape
    block_k = k_ref.shape[0]

    @pl.when(key_block == 0)
    def _init():
        max_ref[...] = jnp.full(max_ref.shape, _MASKED, jnp.float32)
        sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def lanes_to_keys(x: jax.Array) -> jax.Array:
        # [block_q, 128] lane-replicated -> [block_q, block_k] by whole-vreg copies.
        return jnp.tile(x, (1, pl.cdiv(block_k, _LANES)))[:, :block_k]

    def lane_value(x: jax.Array) -> jax.Array:
        # [block_q, 128] with equal lanes -> [block_q, 1] (a lane reduction, no lane slicing).
        return jnp.max(x, axis=1, keepdims=True)

    @pl.when((key_block >= first_ref[block]) & (key_block < last_ref[block]))
    def _visit():
        q_segment = lanes_to_keys(q_segment_ref[...])
        k_segment = k_segment_ref[:1, :]
        mask = (q_segment == k_segment) & (q_segment >= 0)  # [block_q, block_k]
        distance = lanes_to_keys(q_position_ref[...]) - k_position_ref[:1, :]
        if causal:
            mask &= distance >= 0
        if has_window:
            mask &= distance < window_ref[0]
        k = k_ref[...]
        v = v_ref[...]
        for g in range(groups):  # the group's heads share the K/V block already in VMEM
            scores = lax.dot_general(q_ref[g], k, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32) * sm_scale
            if soft_cap is not None:
                scores = soft_cap * jnp.tanh(scores / soft_cap)
            scores = jnp.where(mask, scores, _MASKED)
            prev_max = lane_value(max_ref[g])
            new_max = jnp.maximum(prev_max, jnp.max(scores, axis=1, keepdims=True))
            # Zero masked weights explicitly: a row with no allowed key so far has max == _MASKED.
            weights = jnp.where(mask, jnp.exp(scores - new_max), 0.0)
            rescale = jnp.exp(prev_max - new_max)  # [block_q, 1]
            new_sum = lane_value(sum_ref[g]) * rescale + jnp.sum(weights, axis=1, keepdims=True)
            sum_ref[g] = jnp.broadcast_to(new_sum, (block_q, _LANES))
            max_ref[g] = jnp.broadcast_to(new_max, (block_q, _LANES))
            acc_ref[g] = acc_ref[g] * rescale + jnp.dot(
                weights.astype(v.dtype), v, preferred_element_type=jnp.float32)

    @pl.when(key_block == pl.num_programs(2) - 1)
    def _finish():
        for g in range(groups):
            total = lane_value(sum_ref[g])
            out = acc_ref[g] / jnp.where(total > 0, total, 1.0)
            o_ref[g] = jnp.where(total > 0, out, 0.0).astype(o_ref.dtype)


def tpu_vmem_bytes(groups: int, block_q: int, block_k: int, head_dim: int, itemsize: int) -> int:
    """VMEM one grid step needs: double-buffered blocks, scratch, and f32 score temporaries."""
    lanes = round_up(head_dim, _LANES)  # VMEM pads the minor dim to whole lanes
    blocks = 2 * itemsize * (2 * groups * block_q * lanes + 2 * block_k * lanes)  # q, o, k, v
    blocks += 2 * 4 * (2 * block_q * _LANES + 2 * _SUBLANES * block_k)  # segments, positions
    scratch = 4 * groups * block_q * (2 * _LANES + lanes)
    temporaries = 4 * 4 * block_q * round_up(block_k, _LANES)  # scores, weights, mask, distance
    return blocks + scratch + temporaries


def _vmem_limit(estimate: int) -> int | None:
    # Keep Mosaic's default scoped limit unless the blocks need more; cap at 64 MiB, the VMEM
    # per core of v7x.
    return None if estimate <= _DEFAULT_SCOPED_VMEM else min(2 * estimate, 64 * 2**20)


def flash_attention_tpu(
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
    interpret: bool = False,
) -> jax.Array:
    """Flash attention of a packed token stream, Mosaic kernel.

    Arguments, layout assumptions and result as `flash_attention_gpu`, except the blocks:

    Args:
      block_q: query tokens per block; block_k: keys per block. Defaults come from
        `flash_tuning`, capped for short T. Compiled (not interpreted) kernels need
        block_q a multiple of the sublane tile (8 for 32-bit, 16 for bf16) and block_k a
        multiple of 128 unless one key block covers all tokens.
    """
    segment_ids, positions = check_inputs(q, k, v, segment_ids, positions)
    T, H, E = q.shape
    K = k.shape[1]
    G = H // K
    sublanes = 8 * max(1, 4 // min(q.dtype.itemsize, k.dtype.itemsize))
    tuning = flash_tuning("tpu", E, q.dtype)
    span = round_up(T, sublanes)
    if block_q is None:
        block_q = min(tuning["block_q"], span)
    if block_k is None:
        # One key block covering every token when T is short, else the tuned lane-aligned size.
        block_k = min(tuning["block_k"], round_up(T, block_q))
    padded = round_up(T, math.lcm(block_q, block_k))
    if not interpret and (block_q % sublanes or (block_k % _LANES and block_k != padded)):
        raise ValueError(f"block_q={block_q} must be a multiple of {sublanes} for {q.dtype} "
                         f"and block_k={block_k} a multiple of {_LANES} (or cover all tokens)")
    num_q_blocks, num_k_blocks = padded // block_q, padded // block_k
    pad_tokens = padded - T

    segment_ids = jnp.pad(segment_ids, (0, pad_tokens), constant_values=-1)
    positions = jnp.pad(positions, (0, pad_tokens))
    key_lo, key_hi = token_key_ranges(segment_ids, causal=causal, sliding_window=sliding_window)
    first, last = block_key_ranges(key_lo, key_hi, block_q=block_q, block_k=block_k)

    # Layouts keep every block's last two dims legal (multiples of (8, 128) or full) and
    # every kernel operation lane/sublane aligned: q/out [K, G, T, E] blocks (G, block_q, E);
    # k/v [K, T, E] blocks (block_k, E); query segment/position [T, 128] replicated over
    # lanes, blocks (block_q, 128); key segment/position [8, T] replicated over sublanes.
    qg = jnp.pad(q.reshape(T, K, G, E), ((0, pad_tokens), (0, 0), (0, 0), (0, 0)))
    qg = qg.transpose(1, 2, 0, 3)
    kk = jnp.pad(k, ((0, pad_tokens), (0, 0), (0, 0))).transpose(1, 0, 2)
    vv = jnp.pad(v, ((0, pad_tokens), (0, 0), (0, 0))).transpose(1, 0, 2)
    query_lanes = lambda x: jnp.broadcast_to(x[:, None], (padded, _LANES))
    key_sublanes = lambda x: jnp.broadcast_to(x[None, :], (_SUBLANES, padded))

    def key_index(h, i, j, first_ref, last_ref, window_ref):
        # Outside [first, last) repeat a neighbouring block index: the pipeline skips the copy.
        start = first_ref[i]
        return jnp.minimum(jnp.maximum(j, start), jnp.maximum(last_ref[i] - 1, start))

    query_spec = pl.BlockSpec((None, G, block_q, E), lambda h, i, j, *_: (h, 0, i, 0))
    query_row = pl.BlockSpec((block_q, _LANES), lambda h, i, j, *_: (i, 0))
    key_spec = pl.BlockSpec((None, block_k, E), lambda h, i, j, *r: (h, key_index(h, i, j, *r), 0))
    key_row = pl.BlockSpec((_SUBLANES, block_k), lambda h, i, j, *r: (0, key_index(h, i, j, *r)))
    kernel = functools.partial(
        _flash_kernel, sm_scale=float(sm_scale), causal=causal,
        has_window=sliding_window is not None,
        soft_cap=None if soft_cap is None else float(soft_cap))
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(K, num_q_blocks, num_k_blocks),
            in_specs=[query_spec, query_row, query_row, key_spec, key_spec, key_row,
                      key_row],
            out_specs=query_spec,
            scratch_shapes=[pltpu.VMEM((G, block_q, _LANES), jnp.float32),
                            pltpu.VMEM((G, block_q, _LANES), jnp.float32),
                            pltpu.VMEM((G, block_q, E), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((K, G, padded, E), q.dtype),
        compiler_params=_CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=_vmem_limit(tpu_vmem_bytes(G, block_q, block_k, E, q.dtype.itemsize))),
        cost_estimate=attention_cost(T, H, K, E, q.dtype.itemsize, causal=causal),
        interpret=interpret,
        name="flash_attention_tpu",
    )(first, last, window_scalar(sliding_window), qg, query_lanes(segment_ids),
      query_lanes(positions), kk, vv, key_sublanes(segment_ids), key_sublanes(positions))
    return out.transpose(2, 0, 1, 3)[:T].reshape(T, H, E)
