"""Shardings of quantized weights: each packed array (q, scale, offset) takes its weight's
logical axes, so tensor parallelism splits the output rows (wqkv, w_gate_up) or the input
groups (wo, w_down) exactly as it splits the dense weight. A split must keep whole groups.

Dimension legend: L layers, N output features, K input features, G groups per row.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding

from jaxinfer.config import ModelConfig
from jaxinfer.errors import ConfigError
from jaxinfer.quant.format import QuantizedWeight, is_quantized


def check_group_sharding(sharding: Any, shape: tuple[int, ...], name: str) -> None:
    """Raise ConfigError when `sharding` would split a packed array [..., N, G or K] of
    `name` unevenly (a device holding part of a quantization group)."""
    if not isinstance(sharding, NamedSharding):
        return
    for axis, (dim, mesh_axes) in enumerate(zip(shape, tuple(sharding.spec) + (None,) * len(
            shape), strict=False)):
        if mesh_axes is None:
            continue
        names = mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)
        ways = math.prod(sharding.mesh.shape[n] for n in names)
        if dim % ways:
            raise ConfigError(
                f"sharding {name} (shape {tuple(shape)}) {ways} ways along axis {axis} would "
                f"split a quantization group; use a tensor degree that divides {dim}, or a "
                "smaller group size (more groups per row)")


def param_shardings(params: Any, cfg: ModelConfig, mesh: Mesh, rules: Any = None) -> Any:
    """A tree of `NamedSharding`s matching `params` leaf for leaf, quantized ones included
    (`ShardingRules.param_shardings` describes the dense tree only)."""
    from jaxinfer.parallel.sharding import ShardingRules

    rules = rules or ShardingRules()
    dense = rules.param_shardings(cfg, mesh)

    def place(sharding: NamedSharding, value: Any) -> Any:
        if not is_quantized(value):
            return sharding
        out = {}
        for part in ("q", "scale", "offset"):
            leaf = getattr(value, part)
            if leaf is not None:
                check_group_sharding(sharding, tuple(leaf.shape), f"{part} of a quantized weight")
            out[part] = None if leaf is None else sharding
        return QuantizedWeight(q=out["q"], scale=out["scale"], offset=out["offset"],
                               bits=value.bits, group_size=value.group_size)

    return jax.tree.map(place, dense, params, is_leaf=lambda x: isinstance(x, NamedSharding))


def shard_quantized_params(params: Any, cfg: ModelConfig, mesh: Mesh, rules: Any = None) -> Any:
    """`jax.device_put` of `params` (dense or quantized) with `param_shardings`."""
    return jax.device_put(params, param_shardings(params, cfg, mesh, rules))
