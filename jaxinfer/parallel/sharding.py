"""One logical-axis rule table for every sharded array, and the mesh helper.

Parameters carry logical axis names (`jaxinfer.model.params.logical_axes`); the KV cache's
are `CACHE_AXES`. `ShardingRules` maps logical axes to mesh axes (`data`, `tensor`,
`sequence`) through flax's logical partitioning, and everything sharded is placed with the
`NamedSharding`s it derives. Model code never names a mesh axis: XLA's GSPMD partitioner
propagates the shardings of the weights and the cache through the step (Megatron-style
tensor parallelism: column-parallel QKV and gate/up projections, row-parallel output and
down projections with one all-reduce each).

Tensor parallelism shards query heads by KV-head group. When a model has fewer KV heads than
the tensor degree, `replicate_kv_heads` rewrites it into the equivalent model with one
(copied) KV head per tensor shard, so every device holds the KV head its query heads use
(vLLM's choice): query heads and the MLP stay sharded, the KV cache holds K copies.
Quantized weights (jaxinfer.quant) are regrouped and placed array by array (q, scale, offset
take their weight's logical axes).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinfer.config import ModelConfig
from jaxinfer.errors import ConfigError
from jaxinfer.quant.format import is_quantized
from jaxinfer.quant.sharding import param_shardings as quantized_param_shardings

MESH_AXES = ("data", "tensor", "sequence")
# Logical axes of the KV cache [L, NP, C, K, E].
CACHE_AXES = ("layers", "cache_pages", "cache_slots", "kv_heads", "head_dim")

DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("embed", None),
    ("head_dim", None),
    ("layers", None),
    ("cache_pages", None),
    ("cache_slots", None),
    ("batch", "data"),
    ("sequence", "sequence"),
)


def make_mesh(data: int = 1, tensor: int = 1, sequence: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, tensor, sequence) mesh with GSPMD ("Auto") axes over the given devices
    (default: all devices, which across hosts means every process's devices)."""
    devices = list(jax.devices() if devices is None else devices)
    size = data * tensor * sequence
    if size != len(devices):
        raise ConfigError(f"a {data} x {tensor} x {sequence} (data x tensor x sequence) mesh "
                          f"needs {size} devices, {len(devices)} are available; choose degrees "
                          f"whose product is {len(devices)}")
    grid = np.asarray(devices, dtype=object).reshape(data, tensor, sequence)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis (None: replicated). The single table for params, caches and
    activations; build variants with `replace`."""

    rules: tuple[tuple[str, str | None], ...] = DEFAULT_RULES

    def replace(self, **mapping: str | None) -> ShardingRules:
        """A copy with some logical axes mapped elsewhere (`rules.replace(vocab=None)`)."""
        known = {name for name, _ in self.rules}
        unknown = set(mapping) - known
        if unknown:
            raise ConfigError(f"unknown logical axes {sorted(unknown)}; known: {sorted(known)}")
        return ShardingRules(tuple((n, mapping.get(n, m)) for n, m in self.rules))

    def spec(self, logical: Sequence[str | None], shape: Sequence[int] | None = None,
             mesh: Mesh | None = None) -> PartitionSpec:
        """The PartitionSpec of an array with these logical axes. With `shape` and `mesh`,
        dims that the mesh axis does not divide, and axes the mesh lacks, stay replicated."""
        rules = self.rules
        if mesh is not None:
            rules = tuple((n, m if m in mesh.axis_names else None) for n, m in rules)
        spec = nn.logical_to_mesh_axes(tuple(logical), rules)
        if shape is not None and mesh is not None:
            spec = PartitionSpec(*(
                axis if axis is None or dim % mesh.shape[axis] == 0 else None
                for axis, dim in zip(spec, shape, strict=True)))
        return spec

    def sharding(self, mesh: Mesh, logical: Sequence[str | None],
                 shape: Sequence[int] | None = None) -> NamedSharding:
        return NamedSharding(mesh, self.spec(logical, shape, mesh))

    def param_shardings(self, cfg: ModelConfig, mesh: Mesh) -> Any:
        """A `Params` tree of `NamedSharding`s for `cfg`'s weights."""
        from jaxinfer.model.params import ParamSpec, param_specs

        return jax.tree.map(lambda s: self.sharding(mesh, s.axes, s.shape), param_specs(cfg),
                            is_leaf=lambda x: isinstance(x, ParamSpec))

    def cache_sharding(self, mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
        """The sharding of a KV cache array [L, NP, C, K, E]."""
        return self.sharding(mesh, CACHE_AXES, shape)


def check_tensor_parallel(cfg: ModelConfig, tensor: int) -> None:
    """Refuse tensor degrees that cannot split this model's heads and MLP evenly."""
    H, K, F = cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    ok = [t for t in range(1, H + 1) if H % t == 0 and F % t == 0 and (K % t == 0 or t % K == 0)]
    if tensor not in ok:
        raise ConfigError(
            f"tensor parallel degree {tensor} does not divide this model ({H} query heads, {K} "
            f"KV heads, MLP width {F}); use one of {ok}")


def replicate_kv_heads(params: Any, cfg: ModelConfig, tensor: int) -> tuple[Any, ModelConfig]:
    """The same model with `tensor` KV heads when it has fewer (each copied tensor / K times).

    Query head h keeps its index; KV head k becomes heads k*r .. k*r + r-1 (r = tensor / K),
    each serving G / r of its former query heads, so the fused QKV weight splits evenly
    into `tensor` groups and the output projection is unchanged. Logits are identical.
    """
    check_tensor_parallel(cfg, tensor)
    K = cfg.num_kv_heads
    if tensor <= K:
        return params, cfg
    r = tensor // K
    G, E = cfg.num_query_groups, cfg.head_dim

    def regroup(w: jax.Array) -> jax.Array:  # [L, K*(G+2)*E, ...] -> [L, K*r*(G/r+2)*E, ...]
        L, rest = w.shape[0], w.shape[2:]
        w = w.reshape(L, K, G + 2, E, *rest)
        q = w[:, :, :G].reshape(L, K, r, G // r, E, *rest)
        kv = jnp.broadcast_to(w[:, :, None, G:], (L, K, r, 2, E, *rest))
        return jnp.concatenate([q, kv], axis=3).reshape(L, K * r * (G // r + 2) * E, *rest)

    # A quantized wqkv (jaxinfer.quant) regroups its q, scale and offset rows alike.
    layers = params.layers.replace(wqkv=jax.tree.map(regroup, params.layers.wqkv))
    if params.layers.bqkv is not None:
        layers = layers.replace(bqkv=regroup(params.layers.bqkv))
    return params.replace(layers=layers), cfg.replace(num_kv_heads=tensor)


def shard_params(params: Any, cfg: ModelConfig, mesh: Mesh,
                 rules: ShardingRules | None = None) -> tuple[Any, ModelConfig]:
    """Place weights on the mesh (replicating KV heads first when the tensor degree needs it).

    Returns the placed params and the config they belong to (its `num_kv_heads` may grow).
    """
    rules = rules or ShardingRules()
    tensor = mesh.shape.get("tensor", 1)
    params, cfg = replicate_kv_heads(params, cfg, tensor)
    if any(is_quantized(x) for x in jax.tree.leaves(params, is_leaf=is_quantized)):
        # Packed q / scale / offset take their weight's axes; raises if a group would split.
        shardings = quantized_param_shardings(params, cfg, mesh, rules)
    else:
        shardings = rules.param_shardings(cfg, mesh)
    return jax.device_put(params, shardings), cfg


def mesh_summary(mesh: Mesh) -> str:
    """"data 2 x tensor 4 x sequence 1 over 8 devices (2 processes)"."""
    procs = len({d.process_index for d in mesh.devices.flat})
    axes = " x ".join(f"{n} {s}" for n, s in mesh.shape.items())
    return f"{axes} over {math.prod(mesh.devices.shape)} devices ({procs} processes)"
