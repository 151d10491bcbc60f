"""Parallelism over mesh axes."""

from jaxinfer.parallel.adaptive import (
    SPCostModel,
    SPPlan,
    plan_adaptive,
    plan_no_split,
    plan_static,
)
from jaxinfer.parallel.ring import (
    block_attention,
    from_zigzag,
    inverse_zigzag_permutation,
    merge_partials,
    ring_attention,
    ring_attention_natural,
    ring_positions,
    to_zigzag,
    zigzag_permutation,
)
from jaxinfer.parallel.sharding import (
    CACHE_AXES,
    DEFAULT_RULES,
    ShardingRules,
    check_tensor_parallel,
    make_mesh,
    mesh_summary,
    replicate_kv_heads,
    shard_params,
)

__all__ = [
    "CACHE_AXES",
    "DEFAULT_RULES",
    "SPCostModel",
    "SPPlan",
    "ShardingRules",
    "check_tensor_parallel",
    "make_mesh",
    "mesh_summary",
    "plan_adaptive",
    "plan_no_split",
    "plan_static",
    "replicate_kv_heads",
    "shard_params",
    "block_attention",
    "from_zigzag",
    "inverse_zigzag_permutation",
    "merge_partials",
    "ring_attention",
    "ring_attention_natural",
    "ring_positions",
    "to_zigzag",
    "zigzag_permutation",
]
