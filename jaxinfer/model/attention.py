"""Attention dispatch on `cfg.attention_impl` (never on isinstance)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from jaxinfer import cpu_kernels
from jaxinfer.config import ModelConfig
from jaxinfer.errors import ConfigError
from pallas_kernels.flash_attention import flash_attention_gpu, flash_attention_tpu
from pallas_kernels.ragged_paged_attention import (
    causal_prefill_attention_reference,
    paged_decode_attention_reference,
    ragged_paged_attention_gpu,
    ragged_paged_attention_reference,
    ragged_paged_attention_tpu,
)

if TYPE_CHECKING:
    from jaxinfer.model.transformer import Batch


_PALLAS_KERNELS = {"pallas_gpu": ragged_paged_attention_gpu,
                   "pallas_tpu": ragged_paged_attention_tpu}
_FLASH_KERNELS = {"pallas_gpu": flash_attention_gpu, "pallas_tpu": flash_attention_tpu}
_PALLAS_BACKENDS = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}

def default_attention_impl() -> str:
    """The implementation for the default backend: the native kernels on CPU, the Pallas
    kernels on GPU and TPU, the XLA reference otherwise (or when the native build failed)."""
    backend = jax.default_backend()
    if backend == "cpu":
        return "cpu" if cpu_kernels.available() else "xla"
    return {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend, "xla")


def attention(
    cfg: ModelConfig,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array,
    batch: Batch,
    sliding_window: jax.Array | None,
) -> jax.Array:
    """Attention of this step's queries q [T, H, E].

    Keys and values are this step's k, v [T, K, E] (already written to the cache) and the
    stacked cache [L, NP, C, K, E] at `layer`. The decode section (first `num_decode` tokens,
    one per sequence) and the prefill section are computed separately.
    """
    if cfg.attention_impl in _PALLAS_KERNELS:
        return _pallas(cfg, q, k, v, k_cache, v_cache, layer, batch, sliding_window)
    D, T = batch.num_decode, q.shape[0]
    if cfg.attention_impl == "cpu" and q.dtype == jnp.float32 and D < T:
        # Prefill chunks of any length beside decodes: one native call over the whole step
        # reads each sequence's pages in place and computes only the causal keys, where the
        # XLA path gathers pages (or scores the whole flat block) first. A 512-token step of
        # two 256-token prompts: 2.2 ms per layer against 5.5 (docs/architecture.md).
        cpu_kernels.require_cpu_backend("attention_impl")
        return cpu_kernels.ragged_paged_attention(
            q, k_cache, v_cache, batch.kv_lens, batch.page_table, batch.query_start, layer,
            sliding_window, sm_scale=cfg.attention_scale, soft_cap=cfg.attn_logit_softcap)
    parts = []
    if D:
        parts.append(_decode(cfg, q[:D], k_cache, v_cache, layer, batch.kv_lens[:D],
                             batch.page_table[:D], sliding_window))
    if D < T:
        parts.append(_prefill(cfg, q[D:], k[D:], v[D:], k_cache, v_cache, layer, batch,
                              sliding_window))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


def _decode(cfg: ModelConfig, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
            layer: jax.Array, kv_lens: jax.Array, page_table: jax.Array,
            window: jax.Array | None) -> jax.Array:
    """One query per sequence (token s is sequence s)."""
    if cfg.attention_impl == "cpu" and q.dtype == jnp.float32:
        # The native kernel reads the pages in place (decode step, batch 32: 354 -> 272 ms;
        # batch 1 with native matmuls: 33.1 -> 30.8 ms; docs/architecture.md).
        cpu_kernels.require_cpu_backend("attention_impl")
        return cpu_kernels.paged_decode_attention(
            q, k_cache, v_cache, kv_lens, page_table, layer, window,
            sm_scale=cfg.attention_scale, soft_cap=cfg.attn_logit_softcap)
    return paged_decode_attention_reference(
        q, k_cache[layer], v_cache[layer], kv_lens, page_table, sm_scale=cfg.attention_scale,
        sliding_window=window, soft_cap=cfg.attn_logit_softcap)


def _prefill(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array,
             v_cache: jax.Array, layer: jax.Array, batch: Batch,
             window: jax.Array | None) -> jax.Array:
    """The prefill section: its own tokens, sequences from `num_decode` on."""
    D = batch.num_decode
    query_start = batch.query_start[D:] - D
    if batch.flat_prefill:
        history = {}
        if batch.hist_slots is not None:
            C = k_cache.shape[2]
            page, offset = batch.hist_slots // C, batch.hist_slots % C
            history = dict(k_hist=k_cache[layer, page, offset], v_hist=v_cache[layer, page, offset],
                           hist_seq=batch.hist_seq, hist_pos=batch.hist_pos)
        return causal_prefill_attention_reference(
            q, k, v, batch.positions[D:], query_start, sm_scale=cfg.attention_scale,
            sliding_window=window, soft_cap=cfg.attn_logit_softcap, **history)
    return ragged_paged_attention_reference(
        q, k_cache[layer], v_cache[layer], batch.kv_lens[D:], batch.page_table[D:], query_start,
        max_query_len=batch.max_query_len, sm_scale=cfg.attention_scale,
        sliding_window=window, soft_cap=cfg.attn_logit_softcap)


def _pallas(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array,
            v_cache: jax.Array, layer: jax.Array, batch: Batch,
            window: jax.Array | None) -> jax.Array:
    """The Pallas kernels: the whole step (decode section and prefill chunks) in one ragged
    paged attention call over the stacked cache. On a CPU backend they run in the Pallas
    interpreter (how the tests compare them with the XLA path)."""
    impl = cfg.attention_impl
    backend = jax.default_backend()
    interpret = backend == "cpu"
    if not interpret and backend != _PALLAS_BACKENDS[impl] and not (
            impl == "pallas_gpu" and backend == "cuda"):
        raise ConfigError(f"attention_impl={impl!r} cannot run on the {backend!r} backend; "
                          f"use attention_impl='xla' or {default_attention_impl()!r}")
    kernel = _PALLAS_KERNELS[impl]
    common = dict(sm_scale=cfg.attention_scale, sliding_window=window,
                  soft_cap=cfg.attn_logit_softcap, interpret=interpret)
    D, T = batch.num_decode, q.shape[0]
    if not (batch.flat_prefill and batch.hist_slots is None and D < T):
        return kernel(q, k_cache, v_cache, batch.kv_lens, batch.page_table, batch.query_start,
                      layer=layer, max_query_len=max(batch.max_query_len, 1), **common)
    # Prompts starting at position 0 (no cached history): flash attention over this step's
    # own keys, one segment per prompt; the decode section (if any) reads its pages.
    parts = []
    if D:
        parts.append(kernel(q[:D], k_cache, v_cache, batch.kv_lens[:D], batch.page_table[:D],
                            batch.query_start[:D + 1], layer=layer, max_query_len=1, **common))
    starts = batch.query_start[D:] - D
    index = jnp.arange(T - D, dtype=jnp.int32)
    segment = jnp.sum(index[:, None] >= starts[None, 1:].astype(jnp.int32), axis=1)
    segment = jnp.where(index < starts[-1], segment, -1).astype(jnp.int32)
    parts.append(_FLASH_KERNELS[impl](q[D:], k[D:], v[D:], segment_ids=segment,
                                      positions=batch.positions[D:], causal=True, **common))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
