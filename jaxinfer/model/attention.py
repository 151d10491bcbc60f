"""Attention dispatch on `cfg.attention_impl` (never on isinstance)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax

from jaxinfer.config import ModelConfig
from jaxinfer.errors import ConfigError
from pallas_kernels.ragged_paged_attention.reference import (
    causal_prefill_attention_reference,
    ragged_paged_attention_reference,
)

if TYPE_CHECKING:
    from jaxinfer.model.transformer import Batch


def attention(
    cfg: ModelConfig,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    batch: Batch,
    sliding_window: jax.Array | None,
) -> jax.Array:
    """Attention of this step's queries q [T, H, E].

    Keys and values are this step's k, v [T, K, E] (already written to the pages) and one
    layer's pages [NP, C, K, E]; a prefix-free batch needs only the former.
    """
    if cfg.attention_impl == "xla":
        if batch.prefix_free:
            return causal_prefill_attention_reference(
                q, k, v, batch.positions, batch.query_start, sm_scale=cfg.attention_scale,
                sliding_window=sliding_window, soft_cap=cfg.attn_logit_softcap)
        return ragged_paged_attention_reference(
            q, k_pages, v_pages, batch.kv_lens, batch.page_table, batch.query_start,
            max_query_len=batch.max_query_len, sm_scale=cfg.attention_scale,
            sliding_window=sliding_window, soft_cap=cfg.attn_logit_softcap,
        )
    raise ConfigError(
        f"attention_impl {cfg.attention_impl!r} is not built into this version; "
        "use attention_impl='xla'"
    )
