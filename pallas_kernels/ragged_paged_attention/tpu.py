"""Ragged paged attention for TPUs: a Pallas kernel lowered to Mosaic.

Grid (sequence, query block, key block). The page table, sequence lengths, the layer and
the window arrive by scalar prefetch (SMEM), so the key/value BlockSpecs fetch the pages a
sequence owns straight from the paged pool: key block i of sequence s is page
page_table[s, i // blocks_per_page] of layer `layer`, viewed as [C * K, E] rows (token-major,
heads interleaved; head h of the block is the strided rows h, h + K, ...). Key blocks a query
block cannot see (causal, window, past the sequence) are skipped and their index map is
clamped to a block already fetched, so skipping costs no DMA. Online-softmax state lives in
VMEM scratch and the output block is written at the last key step.

Queries are regrouped in the wrapper into [S, K, Qpad * Gp, E] (one row per new token and
query head of a KV head's group; decode batches need only a reshape) and scattered back.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ragged_paged_attention import common
from pallas_kernels.ragged_paged_attention.tuning import tpu_tuning

# Mosaic tiles: second-to-last block dims are multiples of 8 sublanes.
_SUBLANES = 8


def ragged_paged_attention_tpu(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    kv_lens: jax.Array,
    page_table: jax.Array,
    query_start: jax.Array,
    *,
    max_query_len: int,
    sm_scale: float,
    layer: jax.Array | int | None = None,
    sliding_window: int | jax.Array | None = None,
    soft_cap: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | object = False,
) -> jax.Array:
    """Attention of ragged queries over paged keys/values (Mosaic TPU lowering).

    Same contract as `ragged_paged_attention_reference`, plus:

    Args:
      k_cache, v_cache: one layer's pool [NP, C, K, E] or the stacked pools [L, NP, C, K, E]
        with `layer` (a traced int32 scalar is fine).
      block_q: new tokens per grid step (default from `tuning.py`; 1 for decode batches).
      block_k: keys per grid step, a divisor of C (default: one page, at most 512 keys).
      interpret: True (or a `pltpu.InterpretParams`) runs the Pallas interpreter.

    Returns:
      [T, H, E] in q's dtype; rows of padding tokens are zero.
    """
    k_cache, v_cache, layer = common.check_inputs(q, k_cache, v_cache, kv_lens, page_table,
                                                  query_start, layer)
    T, H, E = q.shape
    L, NP, C, K, _ = k_cache.shape
    S, P = page_table.shape
    G = H // K
    decode = max_query_len == 1 and T == S
    tune = tpu_tuning(head_dim=E, dtype=q.dtype, decode=decode)
    Gp = common.next_power_of_2(G)
    if decode:
        BQ = 1
        Gp = max(Gp, _SUBLANES)
    else:
        BQ = common.next_power_of_2(block_q or tune["block_q"])
        BQ = min(BQ, common.next_power_of_2(max_query_len))
        BQ = max(BQ, _SUBLANES // Gp, 1)
    n_qblocks = -(-max_query_len // BQ)
    Qpad = n_qblocks * BQ
    BK = block_k or min(C, 512)
    if C % BK or (BK * K) % _SUBLANES and BK != C:
        raise ValueError(f"block_k {BK} must divide the page size {C}")
    blocks_per_page = C // BK
    R = BQ * Gp

    q_len = (query_start[1:] - query_start[:-1]).astype(jnp.int32)
    if decode:
        qg = jnp.pad(q.reshape(S, K, G, E), ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
        q_index = None
    else:
        offs = jnp.arange(Qpad, dtype=jnp.int32)
        valid = offs[None, :] < q_len[:, None]
        q_index = jnp.where(valid, query_start[:-1, None].astype(jnp.int32) + offs[None, :], T)
        qg = jnp.take(q, jnp.minimum(q_index, T - 1), axis=0).reshape(S, Qpad, K, G, E)
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, 0), (0, Gp - G), (0, 0)))
        qg = qg.transpose(0, 2, 1, 3, 4)
    qg = qg.reshape(S, K, Qpad * Gp, E)

    k_rows = k_cache.reshape(L, NP, C * K, E)
    v_rows = v_cache.reshape(L, NP, C * K, E)
    window = common.window_array(sliding_window)

    def bounds(s, qb, kv_lens_ref, q_lens_ref, window_ref):
        kv_len, n = kv_lens_ref[s], q_lens_ref[s]
        tok0 = qb * BQ
        first = kv_len - n + tok0
        last = kv_len - n + jnp.minimum(n, tok0 + BQ) - 1
        lo, hi = common.key_block_range(first, last, kv_len, window_ref[0], BK)
        return lo, hi, tok0 < n

    def kv_map(s, qb, i, layer_ref, window_ref, kv_lens_ref, q_lens_ref, pt_ref):
        lo, hi, _ = bounds(s, qb, kv_lens_ref, q_lens_ref, window_ref)
        i = jnp.maximum(jnp.minimum(i, hi - 1), lo)
        i = jnp.where(hi > lo, i, 0)
        return (layer_ref[0], pt_ref[s * P + jax.lax.div(i, blocks_per_page)],
                jax.lax.rem(i, blocks_per_page), 0)

    def q_map(s, qb, i, *_):
        return (s, 0, qb, 0)

    kernel = functools.partial(
        _kernel, bounds=bounds, num_kv_heads=K, rows=R, group=G, group_padded=Gp,
        block_q=BQ, block_k=BK, sm_scale=float(sm_scale), soft_cap=soft_cap,
        has_window=sliding_window is not None)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(S, n_qblocks, P * blocks_per_page),
        in_specs=[
            pl.BlockSpec((None, K, R, E), q_map),
            pl.BlockSpec((None, None, BK * K, E), kv_map),
            pl.BlockSpec((None, None, BK * K, E), kv_map),
        ],
        out_specs=pl.BlockSpec((None, K, R, E), q_map),
        scratch_shapes=[pltpu.VMEM((K, R, 1), jnp.float32), pltpu.VMEM((K, R, 1), jnp.float32),
                        pltpu.VMEM((K, R, E), jnp.float32)],
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="ragged_paged_attention_tpu",
    )(jnp.reshape(layer, (1,)), window, kv_lens.astype(jnp.int32), q_len,
      page_table.astype(jnp.int32).reshape(S * P), qg, k_rows, v_rows)

    if decode:
        return out.reshape(S, K, Gp, E)[:, :, :G].reshape(S, H, E)
    out = out.reshape(S, K, Qpad, Gp, E)[:, :, :, :G].transpose(0, 2, 1, 3, 4)
    out = out.reshape(S * Qpad, H, E)
    return jnp.zeros((T, H, E), q.dtype).at[q_index.reshape(-1)].set(out, mode="drop")


def _kernel(layer_ref, window_ref, kv_lens_ref, q_lens_ref, pt_ref, q_ref, k_ref, v_ref, o_ref,
            m_ref, l_ref, acc_ref, *, bounds, num_kv_heads: int, rows: int, group: int,
            group_padded: int, block_q: int, block_k: int, sm_scale: float,
            soft_cap: float | None, has_window: bool) -> None:
    del layer_ref, pt_ref
    s, qb, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    lo, hi, active = bounds(s, qb, kv_lens_ref, q_lens_ref, window_ref)

    @pl.when(i == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, common.MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(active & (i >= lo) & (i < hi))
    def _compute():
        kv_len, n, window = kv_lens_ref[s], q_lens_ref[s], window_ref[0]
        row = jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 0)
        col = jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
        q_pos = kv_len - n + qb * block_q + jax.lax.div(row, group_padded)
        k_pos = i * block_k + col
        mask = (k_pos <= q_pos) & (k_pos < kv_len)
        if has_window:
            mask &= (q_pos - k_pos) < window
        for h in range(num_kv_heads):
            q = q_ref[h]  # [R, E]
            k = k_ref[pl.ds(h, block_k, stride=num_kv_heads), :]  # [BK, E]
            v = v_ref[pl.ds(h, block_k, stride=num_kv_heads), :]
            scores = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32) * sm_scale
            scores = common.softcap(scores, soft_cap)
            scores = jnp.where(mask, scores, common.MASK_VALUE)
            m_prev = m_ref[h]  # [R, 1]
            m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
            alpha = jnp.exp(m_prev - m_new)
            p = jnp.where(mask, jnp.exp(scores - m_new), 0.0)
            l_ref[h] = l_ref[h] * alpha + jnp.sum(p, axis=1, keepdims=True)
            acc_ref[h] = acc_ref[h] * alpha + jnp.dot(p.astype(v.dtype), v,
                                                      preferred_element_type=jnp.float32)
            m_ref[h] = m_new

    @pl.when(i == pl.num_programs(2) - 1)
    def _finish():
        l = l_ref[...]
        o_ref[...] = (acc_ref[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)
