"""Attention dispatch on `cfg.attention_impl` (never on isinstance)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from jaxinfer import cpu_kernels
from jaxinfer.config import ModelConfig
from jaxinfer.errors import ConfigError
from pallas_kernels.ragged_paged_attention.reference import (
    causal_prefill_attention_reference,
    ragged_paged_attention_reference,
)

if TYPE_CHECKING:
    from jaxinfer.model.transformer import Batch


def default_attention_impl() -> str:
    """The fastest implementation for the default backend (the XLA reference elsewhere)."""
    if jax.default_backend() == "cpu" and cpu_kernels.available():
        return "cpu"
    return "xla"


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
    stacked cache [L, NP, C, K, E] at `layer`; a prefix-free batch needs only the former.
    """
    decode = batch.max_query_len == 1 and q.shape[0] == batch.kv_lens.shape[0]
    # The native kernel reads the pages in place (decode step, batch 32: 354 -> 272 ms; batch
    # 1 with native matmuls: 33.1 -> 30.8 ms; docs/architecture.md).
    if cfg.attention_impl == "cpu" and decode and q.dtype == jnp.float32:
        cpu_kernels.require_cpu_backend("attention_impl")
        return cpu_kernels.paged_decode_attention(
            q, k_cache, v_cache, batch.kv_lens, batch.page_table, layer, sliding_window,
            sm_scale=cfg.attention_scale, soft_cap=cfg.attn_logit_softcap)
    if cfg.attention_impl in ("xla", "cpu"):
        if batch.prefix_free:
            return causal_prefill_attention_reference(
                q, k, v, batch.positions, batch.query_start, sm_scale=cfg.attention_scale,
                sliding_window=sliding_window, soft_cap=cfg.attn_logit_softcap)
        return ragged_paged_attention_reference(
            q, k_cache[layer], v_cache[layer], batch.kv_lens, batch.page_table, batch.query_start,
            max_query_len=batch.max_query_len, sm_scale=cfg.attention_scale,
            sliding_window=sliding_window, soft_cap=cfg.attn_logit_softcap,
        )
    raise ConfigError(
        f"attention_impl {cfg.attention_impl!r} is not built into this version; "
        "use attention_impl='xla' (or 'cpu' on CPU)"
    )
