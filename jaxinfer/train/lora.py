"""LoRA: low-rank adapters on the projection weights, trained while the base stays frozen.

For a target weight W [L, out, in] the adapter is A [L, r, in] and B [L, out, r]; the
effective weight is W + (alpha / r) * B @ A. B starts at zero, so an untrained adapter is
the base model exactly. The effective weights are formed functionally before the forward
(`apply_lora`), so the model code knows nothing of adapters and the gradient reaches only A
and B; `merge_lora` is the same sum, for export.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.errors import ConfigError
from jaxinfer.model.params import Params, ParamSpec, param_specs

LORA_TARGETS = ("wqkv", "wo", "w_gate_up", "w_down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Adapter rank r, scale numerator alpha (the update is scaled by alpha / r), and the
    projections that get adapters (a subset of `LORA_TARGETS`)."""

    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ConfigError(f"LoRA rank must be positive, got {self.rank}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise ConfigError(f"LoRA targets must be a non-empty subset of {LORA_TARGETS}, "
                              f"got {tuple(self.targets)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@flax.struct.dataclass
class LoraWeights:
    """One target's adapter, stacked over layers."""

    a: Any  # [L, r, in]
    b: Any  # [L, out, r]


@flax.struct.dataclass
class LoraParams:
    """Adapters of every target (None: that projection is not adapted)."""

    wqkv: LoraWeights | None = None
    wo: LoraWeights | None = None
    w_gate_up: LoraWeights | None = None
    w_down: LoraWeights | None = None


def lora_specs(cfg: ModelConfig, lora_cfg: LoraConfig) -> LoraParams:
    """The abstract adapter tree: `ParamSpec` leaves whose logical axes follow the base
    weight's (A shards like W's input axis, B like its output axis; the rank axis,
    "lora_rank", is replicated by the default rules)."""
    base = param_specs(cfg).layers
    adapters = {}
    for name in lora_cfg.targets:
        w: ParamSpec = getattr(base, name)
        L, out_dim, in_dim = w.shape
        layers_axis, out_axis, in_axis = w.axes
        adapters[name] = LoraWeights(
            a=ParamSpec((L, lora_cfg.rank, in_dim), (layers_axis, "lora_rank", in_axis)),
            b=ParamSpec((L, out_dim, lora_cfg.rank), (layers_axis, out_axis, "lora_rank"),
                        "zeros"))
    return LoraParams(**adapters)


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def lora_logical_axes(cfg: ModelConfig, lora_cfg: LoraConfig) -> LoraParams:
    return jax.tree.map(lambda s: s.axes, lora_specs(cfg, lora_cfg), is_leaf=_is_spec)


def abstract_lora(cfg: ModelConfig, lora_cfg: LoraConfig) -> LoraParams:
    """`jax.ShapeDtypeStruct` leaves (adapters are float32 whatever the base dtype)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32),
                        lora_specs(cfg, lora_cfg), is_leaf=_is_spec)


def init_lora(cfg: ModelConfig, lora_cfg: LoraConfig, seed: int = 0) -> LoraParams:
    """Fresh adapters: A ~ normal with std 1/sqrt(in) (A x keeps x's scale), B = 0."""
    specs, treedef = jax.tree.flatten(lora_specs(cfg, lora_cfg), is_leaf=_is_spec)
    rng = np.random.default_rng(seed)
    leaves = []
    for s in specs:
        if s.init == "zeros":
            leaves.append(jnp.zeros(s.shape, jnp.float32))
        else:
            std = np.float32(1.0 / np.sqrt(s.shape[-1]))
            leaves.append(jnp.asarray(rng.standard_normal(s.shape, dtype=np.float32) * std))
    return jax.tree.unflatten(treedef, leaves)


def apply_lora(base: Params, lora: LoraParams, lora_cfg: LoraConfig) -> Params:
    """The base weights with every adapted projection replaced by W + (alpha/r) B @ A,
    summed in float32 and cast to W's dtype. Differentiable in `lora` (and `base`)."""
    changes = {}
    for name in lora_cfg.targets:
        adapter: LoraWeights | None = getattr(lora, name)
        if adapter is None:
            raise ConfigError(f"the LoRA adapters have no {name!r} target")
        w = getattr(base.layers, name)
        delta = jnp.einsum("lor,lri->loi", adapter.b, adapter.a,
                           preferred_element_type=jnp.float32)
        scale = np.float32(lora_cfg.scale)
        changes[name] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
    return base.replace(layers=base.layers.replace(**changes))


def merge_lora(base: Params, lora: LoraParams, lora_cfg: LoraConfig) -> Params:
    """Fold trained adapters into plain `Params` (for export or inference): jitted
    `apply_lora`, the result needing no LoRA support anywhere downstream."""
    return _merge(base, lora, lora_cfg)


_merge = jax.jit(apply_lora, static_argnums=2)


def count_params(tree: Any) -> int:
    """Number of scalars in a parameter tree (None leaves count nothing)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
