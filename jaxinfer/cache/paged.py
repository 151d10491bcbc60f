"""The paged KV cache: explicit device state passed into `forward` and returned (donated).

Layout per layer: k and v pages [NP, C, K, E] (NP pages of C tokens), stacked on a leading
L axis so the layer scan indexes it in place. A contiguous per-sequence layout is the same
structure with C == max sequence length.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer: k, v [L, NP, C, K, E]."""

    k: Any
    v: Any

    @property
    def num_pages(self) -> int:
        return int(self.k.shape[1])

    @property
    def page_size(self) -> int:
        return int(self.k.shape[2])

    @property
    def num_slots(self) -> int:
        """Token slots in the whole pool (NP * C)."""
        return self.num_pages * self.page_size

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes) + int(self.v.nbytes)


def cache_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple[int, ...]:
    return (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)


def init_cache(
    cfg: ModelConfig, num_pages: int, page_size: int, dtype: Any = None,
    sharding: jax.sharding.Sharding | None = None,
) -> KVCache:
    """A zeroed cache of `num_pages` pages of `page_size` tokens (dtype defaults to cfg.dtype)."""
    shape = cache_shape(cfg, num_pages, page_size)
    dtype = jnp.dtype(dtype or cfg.dtype)
    make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return KVCache(k=make(), v=make())


def kv_bytes_per_token(cfg: ModelConfig, dtype: Any = None) -> int:
    """Bytes of K and V one token occupies across all layers."""
    itemsize = jnp.dtype(dtype or cfg.dtype).itemsize
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize
