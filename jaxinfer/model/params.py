"""Parameter pytrees and their abstract description (shape + logical axes per leaf).

Projection weights use the (out, in) layout of PyTorch checkpoints, 2-D per layer: XLA:CPU
streams a row-major (out, in) matrix through a vector-matrix product about 2x faster than
the transposed layout, and a 3-D slice reshaped inside the layer scan cost ~15% of decode
(docs/architecture.md). Every per-layer leaf is stacked on a leading `layers` axis.

Two fusions cut the number of matrix-vector products per layer from 7 to 4 (decode is
dominated by per-op cost on CPU, 8% faster measured):
  * `wqkv` [L, K*(G+2)*E, D]: for each KV head k, its G query heads, then its key head, then
    its value head. Query head h = k*G + g, as transformers' GQA expects. Sharding the
    leading axis over `tensor` splits whole KV groups.
  * `w_gate_up` [L, 2F, D]: gate and up rows interleaved (row 2f = gate f, 2f+1 = up f), so
    sharding the `mlp` axis keeps each unit's gate and up together.
`jaxinfer.weights.names` converts to and from the checkpoint layouts.

Weight-only quantization (`jaxinfer.quant`) replaces the projection weights, `embed` and
`lm_head` by `QuantizedWeight` pytrees with the same leading axes (packed q, scale, offset):
`param_specs` still describes the logical (dequantized) shapes and axes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Abstract description of one parameter: shape, logical axis names, init scale."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str = "normal"  # "normal" | "zeros" | "norm"


@flax.struct.dataclass
class LayerParams:
    """Weights of all decoder layers, stacked on a leading L axis."""

    attn_norm: Any  # [L, D]
    wqkv: Any  # [L, K*(G+2)*E, D], grouped per KV head
    wo: Any  # [L, D, H*E]
    mlp_norm: Any  # [L, D]
    w_gate_up: Any  # [L, 2F, D], gate/up rows interleaved
    w_down: Any  # [L, D, F]
    bqkv: Any = None  # [L, K*(G+2)*E]
    bo: Any = None  # [L, D]
    q_norm: Any = None  # [L, E]
    k_norm: Any = None  # [L, E]
    post_attn_norm: Any = None  # [L, D]
    post_mlp_norm: Any = None  # [L, D]


@flax.struct.dataclass
class Params:
    """All model weights. `lm_head` is None when tied to `embed`."""

    embed: Any  # [V, D]
    layers: LayerParams
    final_norm: Any  # [D]
    lm_head: Any = None  # [V, D]


def param_specs(cfg: ModelConfig) -> Params:
    """The abstract parameter tree of `cfg`: a `Params` whose leaves are `ParamSpec`s."""
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    H, K, E, V = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    spec = ParamSpec
    norm = lambda shape, axes: spec(shape, axes, "norm")
    QKV = (H + 2 * K) * E
    layers = LayerParams(
        attn_norm=norm((L, D), ("layers", "embed")),
        wqkv=spec((L, QKV, D), ("layers", "kv_heads", "embed")),
        wo=spec((L, D, H * E), ("layers", "embed", "heads")),
        mlp_norm=norm((L, D), ("layers", "embed")),
        w_gate_up=spec((L, 2 * F, D), ("layers", "mlp", "embed")),
        w_down=spec((L, D, F), ("layers", "embed", "mlp")),
        bqkv=spec((L, QKV), ("layers", "kv_heads"), "zeros") if cfg.qkv_bias else None,
        bo=spec((L, D), ("layers", "embed"), "zeros") if cfg.o_bias else None,
        q_norm=norm((L, E), ("layers", "head_dim")) if cfg.qk_norm else None,
        k_norm=norm((L, E), ("layers", "head_dim")) if cfg.qk_norm else None,
        post_attn_norm=norm((L, D), ("layers", "embed")) if cfg.sandwich_norms else None,
        post_mlp_norm=norm((L, D), ("layers", "embed")) if cfg.sandwich_norms else None,
    )
    return Params(
        embed=spec((V, D), ("vocab", "embed")),
        layers=layers,
        final_norm=norm((D,), ("embed",)),
        lm_head=None if cfg.tie_word_embeddings else spec((V, D), ("vocab", "embed")),
    )


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def logical_axes(cfg: ModelConfig) -> Params:
    """Logical axis names of every parameter (for sharding rules)."""
    return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def abstract_params(cfg: ModelConfig) -> Params:
    """`jax.ShapeDtypeStruct` leaves in `cfg.dtype`: shapes without memory."""
    dtype = jnp.dtype(cfg.dtype)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_specs(cfg),
                        is_leaf=_is_spec)


def init_params(cfg: ModelConfig, seed: int = 0, scale: float = 0.02) -> Params:
    """Random parameters (normal, std `scale`) for benchmarks and tests with no checkpoint.

    Norm weights are 1 (0 under Gemma's 1+w convention) so activations stay well scaled.
    """
    specs, treedef = jax.tree.flatten(param_specs(cfg), is_leaf=_is_spec)
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(cfg.dtype)
    leaves = []
    for s in specs:
        if s.init == "normal":
            value = rng.standard_normal(s.shape, dtype=np.float32) * scale
        elif s.init == "norm":
            value = np.full(s.shape, 1.0 - cfg.norm_weight_offset, np.float32)
        else:
            value = np.zeros(s.shape, np.float32)
        leaves.append(jnp.asarray(value, dtype))
    return jax.tree.unflatten(treedef, leaves)


def init_params_on_device(cfg: ModelConfig, seed: int = 0, scale: float = 0.02) -> Params:
    """Like `init_params`, drawn on the default device with `jax.random` (no host copy):
    for benchmark-sized models (an 8B model in seconds on a GPU). Values differ from
    `init_params`'s for the same seed."""
    specs, treedef = jax.tree.flatten(param_specs(cfg), is_leaf=_is_spec)
    dtype = jnp.dtype(cfg.dtype)
    keys = jax.random.split(jax.random.key(seed), len(specs))
    leaves = []
    for key, s in zip(keys, specs, strict=True):
        if s.init == "normal":
            make = jax.jit(lambda k, shape=s.shape: (
                jax.random.normal(k, shape, jnp.float32) * scale).astype(dtype))
            leaves.append(make(key))
        else:
            fill = 1.0 - cfg.norm_weight_offset if s.init == "norm" else 0.0
            leaves.append(jnp.full(s.shape, fill, dtype))
    return jax.tree.unflatten(treedef, leaves)


def param_bytes(params: Params) -> int:
    """Total bytes of all parameter leaves."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(params))
