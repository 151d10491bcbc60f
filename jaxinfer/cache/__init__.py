"""KV memory: the paged device cache (pytree) and, host side, its page allocator."""

from jaxinfer.cache.paged import KVCache, init_cache, kv_bytes_per_token

__all__ = ["KVCache", "init_cache", "kv_bytes_per_token"]
