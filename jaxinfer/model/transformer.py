"""The decoder forward pass: `forward(params, cfg, batch, cache) -> (logits, cache)`.

Pure: the KV cache comes in and goes out (donate it under jit). Layers run under
`lax.scan` over the stacked weights; the cache is carried whole and written in place at
each layer's index, so no layer's cache is ever copied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import cpu_kernels
from jaxinfer.batch import StepBatch
from jaxinfer.cache.paged import KVCache
from jaxinfer.config import ModelConfig
from jaxinfer.model.attention import attention
from jaxinfer.model.layers import activation, apply_rope, linear, rms_norm, rope_tables
from jaxinfer.model.params import LayerParams, Params
from jaxinfer.quant.format import QuantizedWeight, dequantize
from jaxinfer.quant.matmul import quant_dense

_NO_WINDOW = np.int32(2**30)


@flax.struct.dataclass
class Batch:
    """Device copy of a `StepBatch` (see jaxinfer.batch for the fields)."""

    tokens: Any  # [T] int32
    positions: Any  # [T] int32
    slot_mapping: Any  # [T] int32
    query_start: Any  # [S+1] int32
    kv_lens: Any  # [S] int32
    page_table: Any  # [S, P] int32
    logits_indices: Any  # [S] int32
    copy_src: Any = None  # [N] int32 pages to copy before the step (copy-on-write)
    copy_dst: Any = None  # [N] int32 (padding: out of range, dropped)
    hist_slots: Any = None  # [N] int32 history keys of a flat prefill section
    hist_seq: Any = None  # [N] int32
    hist_pos: Any = None  # [N] int32
    max_query_len: int = flax.struct.field(pytree_node=False, default=1)
    flat_prefill: bool = flax.struct.field(pytree_node=False, default=False)
    num_decode: int = flax.struct.field(pytree_node=False, default=0)

    @classmethod
    def from_step(cls, step: StepBatch, tokens: Any = None) -> Batch:
        """Wrap a host `StepBatch`; `tokens` may replace its tokens with a device array."""
        return cls(
            tokens=step.tokens if tokens is None else tokens,
            positions=step.positions, slot_mapping=step.slot_mapping,
            query_start=step.query_start, kv_lens=step.kv_lens, page_table=step.page_table,
            logits_indices=step.logits_indices,
            copy_src=step.copy_src if len(step.copy_src) else None,
            copy_dst=step.copy_dst if len(step.copy_dst) else None,
            hist_slots=step.hist_slots if len(step.hist_slots) else None,
            hist_seq=step.hist_seq if len(step.hist_seq) else None,
            hist_pos=step.hist_pos if len(step.hist_pos) else None,
            max_query_len=step.max_query_len, flat_prefill=step.flat_prefill,
            num_decode=step.num_decode,
        )


@dataclasses.dataclass(frozen=True)
class LayerHooks:
    """Replacements for the two places a layer touches the cache (None: the default).

    Used by sequence parallelism (`jaxinfer.parallel.long_prefill`), whose tokens are
    sharded over devices: `write_kv(k_cache, v_cache, layer, k, v, batch) -> (k_cache,
    v_cache)` writes this step's keys/values; `attend(cfg, q, k, v, k_cache, v_cache, layer,
    batch, window) -> out [T, H, E]` replaces the attention dispatch.
    """

    write_kv: Callable[..., tuple[jax.Array, jax.Array]] | None = None
    attend: Callable[..., jax.Array] | None = None


# Row counts up to which the native CPU matmul beats XLA:CPU's dot (docs/architecture.md).
_NATIVE_MATMUL_MAX_ROWS = cpu_kernels.linear_max_rows()


def dense(cfg: ModelConfig, x: jax.Array, w_stacked: Any, layer: jax.Array) -> jax.Array:
    """x [T, in] times layer `layer` of stacked weights [L, out, in] -> [T, out].

    `w_stacked` may be a `QuantizedWeight` (jaxinfer.quant), dispatched to its kernels.
    """
    if isinstance(w_stacked, QuantizedWeight):
        return quant_dense(cfg, x, w_stacked, layer)
    if (cfg.matmul_impl == "cpu" and x.shape[0] <= _NATIVE_MATMUL_MAX_ROWS
            and x.dtype == jnp.float32 and w_stacked.dtype == jnp.float32):
        cpu_kernels.require_cpu_backend("matmul_impl")
        return cpu_kernels.linear(x, w_stacked, layer)
    return linear(x, w_stacked[layer])


def qkv_heads(
    cfg: ModelConfig, layers: LayerParams, lp: LayerParams, layer: jax.Array, x: jax.Array,
    rope: tuple[jax.Array, ...], is_sliding: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Layer `layer`'s rotated queries [T, H, E], keys and values [T, K, E] for x [T, D].

    `layers` is the stacked weights (read in place by `dense`), `lp` the layer's slice.
    """
    eps, offset = cfg.rms_norm_eps, cfg.norm_weight_offset
    h = rms_norm(x, lp.attn_norm, eps, offset)
    T, K, G, E = x.shape[0], cfg.num_kv_heads, cfg.num_query_groups, cfg.head_dim
    qkv = dense(cfg, h, layers.wqkv, layer)
    if lp.bqkv is not None:
        qkv = qkv + lp.bqkv[None]
    qkv = qkv.reshape(T, K, G + 2, E)  # per KV head: G query heads, key, value
    q = qkv[:, :, :G].reshape(T, K * G, E)  # [T, H, E]
    k, v = qkv[:, :, G], qkv[:, :, G + 1]  # [T, K, E]
    if cfg.qk_norm:
        q = rms_norm(q, lp.q_norm, eps, offset)
        k = rms_norm(k, lp.k_norm, eps, offset)
    cos, sin = rope[0], rope[1]
    if len(rope) == 4:  # per-layer choice between global and local RoPE
        cos = jnp.where(is_sliding, rope[2], cos)
        sin = jnp.where(is_sliding, rope[3], sin)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def layer_window(cfg: ModelConfig, is_sliding: jax.Array) -> jax.Array | None:
    """The layer's sliding window (traced per layer), or None for a model without one."""
    if not cfg.has_sliding_layers:
        return None
    return jnp.where(is_sliding, np.int32(cfg.sliding_window), _NO_WINDOW)


def attention_out_and_mlp(
    cfg: ModelConfig, layers: LayerParams, lp: LayerParams, layer: jax.Array, x: jax.Array,
    o: jax.Array,
) -> jax.Array:
    """The rest of a layer after attention: output projection, residual, MLP, residual.

    `o` is the attention output [T, H, E]; returns the layer's output [T, D].
    """
    eps, offset = cfg.rms_norm_eps, cfg.norm_weight_offset
    o = dense(cfg, o.reshape(o.shape[0], -1), layers.wo, layer)
    if lp.bo is not None:
        o = o + lp.bo[None]
    if cfg.sandwich_norms:
        o = rms_norm(o, lp.post_attn_norm, eps, offset)
    x = x + o
    with jax.named_scope("mlp"):
        h = rms_norm(x, lp.mlp_norm, eps, offset)
        gate_up = dense(cfg, h, layers.w_gate_up, layer).reshape(h.shape[0], -1, 2)
        m = dense(cfg, activation(cfg.hidden_act, gate_up[..., 0]) * gate_up[..., 1],
                  layers.w_down, layer)
        if cfg.sandwich_norms:
            m = rms_norm(m, lp.post_mlp_norm, eps, offset)
        return x + m


def _layer(
    cfg: ModelConfig, batch: Batch, rope: tuple[jax.Array, ...], layers: LayerParams,
    carry: tuple, xs: tuple, hooks: LayerHooks | None = None,
) -> tuple[tuple, None]:
    x, k_cache, v_cache = carry
    layer, is_sliding = xs
    # The stacked weights are indexed here rather than sliced by the scan, so that a native
    # matmul can read its layer in place (see `dense`); XLA fuses the slice either way.
    lp: LayerParams = jax.tree.map(lambda a: a[layer], layers)

    with jax.named_scope("attention"):
        q, k, v = qkv_heads(cfg, layers, lp, layer, x, rope, is_sliding)
        # Write this step's keys/values, then attend over the cache (they are included).
        if hooks is not None and hooks.write_kv is not None:
            k_cache, v_cache = hooks.write_kv(k_cache, v_cache, layer, k, v, batch)
        else:
            C = k_cache.shape[2]
            page, slot = batch.slot_mapping // C, batch.slot_mapping % C
            k_cache = k_cache.at[layer, page, slot].set(k.astype(k_cache.dtype), mode="drop")
            v_cache = v_cache.at[layer, page, slot].set(v.astype(v_cache.dtype), mode="drop")
        attend = attention if hooks is None or hooks.attend is None else hooks.attend
        o = attend(cfg, q, k, v, k_cache, v_cache, layer, batch, layer_window(cfg, is_sliding))
    x = attention_out_and_mlp(cfg, layers, lp, layer, x, o)
    return (x, k_cache, v_cache), None


def embed_tokens(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Embeddings [T, D] of tokens [T] (scaled for Gemma)."""
    with jax.named_scope("embed"):
        if isinstance(params.embed, QuantizedWeight):  # gather the rows, then expand them
            rows = jax.tree.map(lambda a: jnp.take(a, tokens, axis=0), params.embed)
            x = dequantize(rows, cfg.dtype)
        else:
            x = jnp.take(params.embed, tokens, axis=0)
        if cfg.embed_scale is not None:
            x = x * jnp.asarray(cfg.embed_scale, x.dtype)
        return x


def layer_rope(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, ...]:
    """RoPE tables for `positions`: (cos, sin), plus the local pair for sliding layers."""
    rope = rope_tables(cfg.rope, cfg, positions)
    if cfg.local_rope is not None and cfg.has_sliding_layers:
        rope = rope + rope_tables(cfg.local_rope, cfg, positions)
    return rope


def hidden_states(
    params: Params, cfg: ModelConfig, batch: Batch, cache: KVCache,
    hooks: LayerHooks | None = None,
) -> tuple[jax.Array, KVCache]:
    """Final-norm hidden states [T, D] of every token, and the updated cache."""
    if batch.copy_src is not None:
        cache = copy_pages(cache, batch.copy_src, batch.copy_dst)
    x = embed_tokens(params, cfg, batch.tokens)
    rope = layer_rope(cfg, batch.positions)
    xs = (jnp.arange(cfg.num_layers, dtype=jnp.int32), jnp.asarray(cfg.sliding_layer_mask))

    def body(carry: tuple, layer_xs: tuple) -> tuple[tuple, None]:
        return _layer(cfg, batch, rope, params.layers, carry, layer_xs, hooks)

    (x, k, v), _ = jax.lax.scan(body, (x, cache.k, cache.v), xs)
    x = rms_norm(x, params.final_norm, cfg.rms_norm_eps, cfg.norm_weight_offset)
    return x, KVCache(k=k, v=v)


def copy_pages(cache: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
    """Copy whole pages (every layer, keys and values) src[i] -> dst[i]; dst out of range
    is dropped (padding)."""
    return KVCache(k=cache.k.at[:, dst].set(cache.k[:, src], mode="drop"),
                   v=cache.v.at[:, dst].set(cache.v[:, src], mode="drop"))


def compute_logits(params: Params, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """Float32 logits [N, V] for hidden states x [N, D]."""
    head = params.embed if params.lm_head is None else params.lm_head
    logits = dense(cfg, x, head[None], jnp.int32(0)).astype(jnp.float32)
    if cfg.final_logit_softcap is not None:
        cap = cfg.final_logit_softcap
        logits = jnp.tanh(logits / cap) * cap
    return logits


def forward(
    params: Params, cfg: ModelConfig, batch: Batch, cache: KVCache, *, all_logits: bool = False,
    hooks: LayerHooks | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run one ragged step.

    Args:
      params: model weights.
      cfg: the model configuration (static).
      batch: device batch (see `Batch.from_step`).
      cache: the KV cache; the new tokens' keys/values are written into it.
      all_logits: return logits for every token [T, V] instead of each sequence's last
        new token [S, V] (the LM head is the costliest matmul of a prefill step).
      hooks: replacements for the cache write / attention (sequence parallelism).

    Returns:
      (float32 logits, updated cache).
    """
    x, cache = hidden_states(params, cfg, batch, cache, hooks)
    if not all_logits:
        x = jnp.take(x, batch.logits_indices, axis=0)
    with jax.named_scope("lm_head"):
        return compute_logits(params, cfg, x), cache
