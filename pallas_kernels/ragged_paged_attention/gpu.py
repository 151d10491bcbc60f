"""Ragged paged attention for GPUs: a Pallas kernel lowered to Triton.

One program per (sequence, KV head, block of the sequence's new tokens). Its rows are the
block's tokens times the G query heads of that KV head (padded to a power of two), so the
keys and values of a KV head are read once for its whole query group: a decode step reads
each cached token once per KV head, the bandwidth bound. The program walks the key blocks
its queries may see (causal and sliding-window bounds), page by page through the page
table, with an online softmax in float32. Decode tokens, prefill chunks and mixed batches
are the same kernel: a decode token is a sequence with one new token.

A small decode batch has few (sequence, KV head) programs (8 for one Llama-3-8B sequence on
132 SMs), so the key range is also split over `kv_splits` programs (flash-decoding); each
writes its unnormalised output with its running max and sum, merged by log-sum-exp after the
kernel. By default decode batches split until the grid has ~2 programs per SM.

The stacked cache [L, NP, C, K, E] is indexed by the layer inside the kernel, so `lax.scan`
over layers never copies a layer's pool.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.ragged_paged_attention import common
from pallas_kernels.ragged_paged_attention.tuning import gpu_tuning

# Triton's dot needs every operand dimension >= 16.
_MIN_DOT = 16
# Decode grids split the key range until they have this many programs (2 per H100 SM).
_TARGET_PROGRAMS = 264
_MAX_SPLITS = 32


def ragged_paged_attention_gpu(
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
    num_warps: int | None = None,
    num_stages: int | None = None,
    kv_splits: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Attention of ragged queries over paged keys/values (Triton lowering).

    Same contract as `ragged_paged_attention_reference`, plus:

    Args:
      k_cache, v_cache: one layer's pool [NP, C, K, E] or the stacked pools [L, NP, C, K, E]
        with `layer` (a traced int32 scalar is fine). C must be a power of two >= 16.
      block_q: new tokens per program (rows are block_q x padded group size); default from
        `tuning.py`.
      block_k: keys per inner step (<= C; pages larger than it are walked in blocks).
      num_warps, num_stages: Triton launch parameters; default from `tuning.py`.
      kv_splits: programs sharing one query block's key range (merged by log-sum-exp);
        default: 1 for prefill, for decode enough to give the grid ~2 programs per SM.
      interpret: run the kernel in the Pallas interpreter (any backend; how CPU tests run).

    Returns:
      [T, H, E] in q's dtype; rows of padding tokens (past query_start[-1]) are zero.
    """
    k_cache, v_cache, layer = common.check_inputs(q, k_cache, v_cache, kv_lens, page_table,
                                                  query_start, layer)
    T, H, E = q.shape
    _, _, C, K, _ = k_cache.shape
    S = kv_lens.shape[0]
    G = H // K
    if C < _MIN_DOT or C & (C - 1):
        raise ValueError(f"the Triton kernel needs a power-of-two page size >= {_MIN_DOT}, "
                         f"got {C}; use attention_impl='xla' or page_size=16")
    if E < _MIN_DOT or E & (E - 1):
        raise ValueError(f"the Triton kernel needs a power-of-two head dim >= {_MIN_DOT}, got {E}")
    tune = gpu_tuning(head_dim=E, dtype=q.dtype, decode=max_query_len == 1)
    Gp = common.next_power_of_2(G)
    BQ = common.next_power_of_2(block_q or tune["block_q"])
    BQ = max(BQ, _MIN_DOT // Gp, 1)
    BQ = min(BQ, max(common.next_power_of_2(max_query_len), _MIN_DOT // Gp, 1))
    BK = min(block_k or tune["block_k"], C)
    if BK < _MIN_DOT or BK & (BK - 1):
        raise ValueError(f"block_k must be a power of two >= {_MIN_DOT}, got {BK}")
    n_qblocks = -(-max_query_len // BQ)
    if kv_splits is None:
        kv_splits = 1
        if max_query_len == 1:
            while S * K * kv_splits < _TARGET_PROGRAMS and kv_splits < _MAX_SPLITS:
                kv_splits *= 2
    if kv_splits < 1:
        raise ValueError(f"kv_splits must be >= 1, got {kv_splits}")

    # Rows token * Gp + g per KV head, padded by one block so every block load is in bounds.
    qg = q.reshape(T, K, G, E)
    qg = jnp.pad(qg, ((0, BQ), (0, 0), (0, Gp - G), (0, 0)))
    qg = qg.transpose(1, 0, 2, 3).reshape(K, (T + BQ) * Gp, E)

    kernel = functools.partial(
        _kernel, block_q=BQ, group=G, group_padded=Gp, block_k=BK, page_size=C,
        sm_scale=float(sm_scale), soft_cap=soft_cap, has_window=sliding_window is not None,
        kv_splits=kv_splits)
    rows = qg.shape[1]
    if kv_splits == 1:
        out_shape: object = jax.ShapeDtypeStruct(qg.shape, q.dtype)
    else:  # per split: unnormalised output, running max, running sum (float32)
        out_shape = (jax.ShapeDtypeStruct((kv_splits, K, rows, E), jnp.float32),
                     jax.ShapeDtypeStruct((kv_splits, K, rows), jnp.float32),
                     jax.ShapeDtypeStruct((kv_splits, K, rows), jnp.float32))
    res = pl.pallas_call(
        kernel,
        grid=(S, K, n_qblocks, kv_splits),
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(
            num_warps=num_warps or tune["num_warps"], num_stages=num_stages or tune["num_stages"]),
        interpret=interpret,
        name="ragged_paged_attention_gpu",
    )(query_start.astype(jnp.int32), kv_lens.astype(jnp.int32), page_table.astype(jnp.int32),
      jnp.reshape(layer, (1,)), common.window_array(sliding_window), qg, k_cache, v_cache)
    if kv_splits == 1:
        out = res
    else:
        acc, m, l = res
        m_all = jnp.max(m, axis=0)
        w = jnp.exp(m - m_all[None])  # splits that saw no key: m = MASK_VALUE, l = 0
        total = jnp.sum(w * l, axis=0)
        merged = jnp.sum(w[..., None] * acc, axis=0)
        out = (merged / jnp.where(total > 0, total, 1.0)[..., None]).astype(q.dtype)

    out = out.reshape(K, T + BQ, Gp, E)[:, :T, :G].transpose(1, 0, 2, 3).reshape(T, H, E)
    real = jnp.arange(T, dtype=jnp.int32) < query_start[-1].astype(jnp.int32)
    return jnp.where(real[:, None, None], out, jnp.zeros((), out.dtype))


def _kernel(qs_ref, kv_lens_ref, pt_ref, layer_ref, window_ref, q_ref, k_ref, v_ref, *o_refs,
            block_q: int, group: int, group_padded: int, block_k: int, page_size: int,
            sm_scale: float, soft_cap: float | None, has_window: bool, kv_splits: int) -> None:
    s, kh, qb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    split = pl.program_id(3)
    q_start = qs_ref[s]
    q_len = qs_ref[s + 1] - q_start
    kv_len = kv_lens_ref[s]
    tok0 = qb * block_q

    @pl.when(tok0 < q_len)
    def _():
        R = block_q * group_padded
        rows = jnp.arange(R, dtype=jnp.int32)
        tok = tok0 + rows // group_padded
        q_pos = kv_len - q_len + tok  # [R]
        row0 = (q_start + tok0) * group_padded
        q = q_ref[kh, pl.ds(row0, R), :]  # [R, E]
        window = window_ref[0]
        first = kv_len - q_len + tok0
        last = kv_len - q_len + jnp.minimum(q_len, tok0 + block_q) - 1
        lo, hi = common.key_block_range(first, last, kv_len, window, block_k)
        if kv_splits > 1:  # this program's share of the key blocks
            per = jax.lax.div(hi - lo + kv_splits - 1, kv_splits)
            lo = jnp.minimum(lo + split * per, hi)
            hi = jnp.minimum(lo + per, hi)
        layer = layer_ref[0]
        # f32 inputs: full-precision dots (Triton's default for f32 is TF32).
        precision = (jax.lax.Precision.HIGHEST if q.dtype == jnp.float32
                     else jax.lax.Precision.DEFAULT)

        def body(i, carry):
            acc, m, l = carry
            key0 = i * block_k
            page = pt_ref[s, key0 // page_size]
            offset = key0 % page_size
            k = k_ref[layer, page, pl.ds(offset, block_k), kh, :]  # [BK, E]
            v = v_ref[layer, page, pl.ds(offset, block_k), kh, :]
            scores = jnp.dot(q, k.T, precision=precision,
                             preferred_element_type=jnp.float32) * sm_scale
            scores = common.softcap(scores, soft_cap)
            k_pos = key0 + jnp.arange(block_k, dtype=jnp.int32)
            mask = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < kv_len)
            if has_window:
                mask &= (q_pos[:, None] - k_pos[None, :]) < window
            scores = jnp.where(mask, scores, common.MASK_VALUE)
            m_new = jnp.maximum(m, jnp.max(scores, axis=1))
            alpha = jnp.exp(m - m_new)
            p = jnp.where(mask, jnp.exp(scores - m_new[:, None]), 0.0)
            l = l * alpha + jnp.sum(p, axis=1)
            acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, precision=precision,
                                                  preferred_element_type=jnp.float32)
            return acc, m_new, l

        E = q.shape[1]
        init = (jnp.zeros((R, E), jnp.float32), jnp.full((R,), common.MASK_VALUE, jnp.float32),
                jnp.zeros((R,), jnp.float32))
        acc, m, l = jax.lax.fori_loop(lo, hi, body, init)
        valid = tok < q_len
        if kv_splits == 1:
            (o_ref,) = o_refs
            out = acc / jnp.where(l > 0, l, 1.0)[:, None]
            pltriton.store(o_ref.at[kh, pl.ds(row0, R), :], out.astype(o_ref.dtype),
                           mask=valid[:, None])
        else:
            acc_ref, m_ref, l_ref = o_refs
            pltriton.store(acc_ref.at[split, kh, pl.ds(row0, R), :], acc, mask=valid[:, None])
            pltriton.store(m_ref.at[split, kh, pl.ds(row0, R)], m, mask=valid)
            pltriton.store(l_ref.at[split, kh, pl.ds(row0, R)], l, mask=valid)
