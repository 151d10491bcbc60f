"""The decoder over a compressed KV cache: `prefill` then `decode_step`, both pure.

The cache is whatever the policy keeps (a pytree with a leading L axis) plus `seen`, the
tokens each sequence has consumed. Prefill runs full causal attention over each padded
prompt, collects the statistics the policy needs and compresses each layer's keys and
values before the next layer runs, so the full cache never exists for all layers at once.
Decode runs one token per sequence. The transformer blocks are the model's own
(`jaxinfer.model.transformer`); only the attention and the cache differ.
Legend: S sequences, T tokens, D width, H query heads, K KV heads, G group, E head dim.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.kvcompress.attend import LONG_OBS_WINDOW, OBS_WINDOW, causal_prefill
from jaxinfer.kvcompress.policies import DecodeContext, PrefillContext
from jaxinfer.model.layers import rms_norm
from jaxinfer.model.params import Params
from jaxinfer.model.transformer import (
    attention_out_and_mlp,
    compute_logits,
    embed_tokens,
    layer_rope,
    layer_window,
    qkv_heads,
)


@flax.struct.dataclass
class KVState:
    """A compressed cache: the policy's per-layer state and tokens seen per sequence."""

    cache: Any  # policy state, arrays with a leading L axis
    seen: Any  # [S] int32: tokens consumed, i.e. the next token's position




def _prefill_layers(params: Params, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array,
                    per_layer: Callable[[PrefillContext], Any], obs_window: int,
                    all_logits: bool, col_all: bool = True, obs_long: int = 0
                    ) -> tuple[jax.Array, Any]:
    S, T = tokens.shape
    K, G, E = cfg.num_kv_heads, cfg.num_query_groups, cfg.head_dim
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (S, T)).reshape(-1)
    x = embed_tokens(params, cfg, tokens.reshape(-1))
    rope = layer_rope(cfg, positions)
    layers = params.layers

    def body(x: jax.Array, xs: tuple) -> tuple[jax.Array, Any]:
        layer, is_sliding = xs
        lp = jax.tree.map(lambda a: a[layer], layers)
        q, k, v = qkv_heads(cfg, layers, lp, layer, x, rope, is_sliding)
        q = q.reshape(S, T, K, G, E)
        k, v = k.reshape(S, T, K, E), v.reshape(S, T, K, E)
        window = layer_window(cfg, is_sliding)
        o, stats = causal_prefill(q, k, v, lengths, window,
                                  scale=cfg.attention_scale, soft_cap=cfg.attn_logit_softcap,
                                  obs_window=obs_window, col_all=col_all, obs_long=obs_long)
        out = per_layer(PrefillContext(q=q, k=k, v=v, lengths=lengths, stats=stats,
                                       layer=layer, window=window))
        x = attention_out_and_mlp(cfg, layers, lp, layer, x, o.reshape(S * T, K * G, E))
        return x, out

    xs = (jnp.arange(cfg.num_layers, dtype=jnp.int32), jnp.asarray(cfg.sliding_layer_mask))
    x, ys = jax.lax.scan(body, x, xs)
    x = rms_norm(x, params.final_norm, cfg.rms_norm_eps, cfg.norm_weight_offset)
    x = x.reshape(S, T, -1)
    if not all_logits:
        x = jnp.take_along_axis(x, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    logits = compute_logits(params, cfg, x.reshape(-1, x.shape[-1]))
    return logits.reshape(*x.shape[:-1], -1), ys


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "all_logits"))
def prefill(params: Params, cfg: ModelConfig, policy: Any, tokens: jax.Array,
            lengths: jax.Array, *, all_logits: bool = False) -> tuple[jax.Array, KVState]:
    """Run padded prompts tokens [S, T] (sequence s owns its first lengths[s]) from an
    empty cache and compress each layer with `policy` before the next layer runs.

    Returns:
      (float32 logits: [S, T, V] with `all_logits`, else [S, V] of each prompt's last
      token; the compressed `KVState`).
    """
    logits, cache = _prefill_layers(params, cfg, tokens, lengths, policy.prefill,
                                    OBS_WINDOW, all_logits,
                                    col_all=getattr(policy, "needs_col_all", True),
                                    obs_long=LONG_OBS_WINDOW
                                    if getattr(policy, "needs_col_obs_long", False) else 0)
    return logits, KVState(cache=cache, seen=lengths.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("cfg",))
def capture_prefill(params: Params, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array
                    ) -> tuple[jax.Array, tuple]:
    """A prefill that keeps every layer's queries, keys, values and attention statistics
    (stacked on L) instead of compressing, so that many policies can be compared on one
    prefill (`compress`). Logits as `prefill` without `all_logits`."""
    def keep(ctx: PrefillContext) -> tuple:
        return ctx.q, ctx.k, ctx.v, ctx.stats, ctx.window
    return _prefill_layers(params, cfg, tokens, lengths, keep, OBS_WINDOW, False,
                           obs_long=LONG_OBS_WINDOW)


@functools.partial(jax.jit, static_argnames=("policy",))
def compress(policy: Any, captured: tuple, lengths: jax.Array) -> KVState:
    """The `KVState` that `prefill` with `policy` would have produced, from a capture."""
    def one(xs: tuple) -> Any:
        layer, (q, k, v, stats, window) = xs
        return policy.prefill(PrefillContext(q=q, k=k, v=v, lengths=lengths, stats=stats,
                                             window=window,
                                             layer=layer))
    layers = jnp.arange(captured[1].shape[0], dtype=jnp.int32)
    return KVState(cache=jax.lax.map(one, (layers, captured)), seen=lengths.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "use_native"),
                   donate_argnames=("state",))
def decode_step(params: Params, cfg: ModelConfig, policy: Any, tokens: jax.Array,
                state: KVState, *, use_native: bool = False) -> tuple[jax.Array, KVState]:
    """Feed one token per sequence (tokens [S], at positions `state.seen`).

    Returns (float32 logits [S, V] for the next token, the updated state; donated).
    `use_native` lets policies that need no attention probabilities read their slots with
    the native CPU kernel (float32, no sliding window).
    """
    S = tokens.shape[0]
    K, G, E = cfg.num_kv_heads, cfg.num_query_groups, cfg.head_dim
    x = embed_tokens(params, cfg, tokens)
    rope = layer_rope(cfg, state.seen)
    layers = params.layers

    def layer_step(x: jax.Array, cache: Any, layer: jax.Array, cache_layer: jax.Array,
                   is_sliding: jax.Array) -> tuple[jax.Array, Any]:
        lp = jax.tree.map(lambda a: a[layer], layers)
        q, k, v = qkv_heads(cfg, layers, lp, layer, x, rope, is_sliding)
        ctx = DecodeContext(q=q.reshape(S, K, G, E), k=k, v=v, seen=state.seen,
                            window=layer_window(cfg, is_sliding), scale=cfg.attention_scale,
                            soft_cap=cfg.attn_logit_softcap, use_native=use_native,
                            model_layer=layer)
        o, cache = policy.decode(cache, cache_layer, ctx)
        return attention_out_and_mlp(cfg, layers, lp, layer, x, o.reshape(S, K * G, E)), cache

    xs = (jnp.arange(cfg.num_layers, dtype=jnp.int32), jnp.asarray(cfg.sliding_layer_mask))
    if policy.needs_probs or not getattr(policy, "writes_in_place", True):
        # These policies read the slots, then write where the attention says. Carrying the
        # stacked cache, XLA:CPU cannot order the value read before the in-place write and
        # copies the whole stack every layer; scanning over per-layer slices costs one read
        # and one write of the cache per step instead.
        def body(x: jax.Array, xs: tuple) -> tuple[jax.Array, Any]:
            layer, is_sliding, cache_l = xs
            x, cache_l = layer_step(x, jax.tree.map(lambda a: a[None], cache_l), layer,
                                    jnp.int32(0), is_sliding)
            return x, jax.tree.map(lambda a: a[0], cache_l)

        x, cache = jax.lax.scan(body, x, (*xs, state.cache))
    else:
        # Write-then-read policies update the carried stack in place (no copy).
        def body(carry: tuple, xs: tuple) -> tuple[tuple, None]:
            x, cache = carry
            layer, is_sliding = xs
            x, cache = layer_step(x, cache, layer, layer, is_sliding)
            return (x, cache), None

        (x, cache), _ = jax.lax.scan(body, (x, state.cache), xs)
    x = rms_norm(x, params.final_norm, cfg.rms_norm_eps, cfg.norm_weight_offset)
    return compute_logits(params, cfg, x), KVState(cache=cache, seen=state.seen + 1)
