"""The training step: masked next-token loss through the inference model, AdamW, pure state.

`train_step(state, batch) -> (state, metrics)` is a pure function of plain-array pytrees
(jit it with the state donated: `make_train_step`). The forward is the inference model's own
`hidden_states`: each packed row is a ragged batch whose document segments are sequences
starting at position 0, attended through the flat prefix-free prefill path, and the KV
cache write is a no-op hook. So training and inference compute the same function.

Dimension legend: B rows, T tokens per row (inputs; a data row holds T+1), V vocab, D width.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinfer.cache.paged import KVCache
from jaxinfer.config import ModelConfig
from jaxinfer.model.params import Params, ParamSpec, abstract_params
from jaxinfer.model.transformer import Batch, LayerHooks, compute_logits, hidden_states
from jaxinfer.parallel.sharding import ShardingRules
from jaxinfer.train.lora import LoraConfig, abstract_lora, apply_lora, lora_specs, merge_lora

if TYPE_CHECKING:
    from jaxinfer.train.loop import TrainConfig

# Leaves under these fields are matrices that get weight decay; norms and biases do not.
_DECAYED_FIELDS = frozenset({"embed", "lm_head", "wqkv", "wo", "w_gate_up", "w_down"})


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly: plain arrays only (checkpointable with
    Orbax's StandardSave, placeable with NamedShardings).

    Attributes:
      step: [] int32 optimizer steps taken.
      params: the trainable tree: `Params` (full fine-tuning) or `LoraParams`.
      frozen: the base `Params` under LoRA (never updated); None for full fine-tuning.
      opt_state: the optax state (Adam moments mirror `params`; counts are scalars).
      rng: [2] uint32 key data (`jax.random.key_data`), split once per step.
      data_position: [] int32 index of the next batch of the data stream.
    """

    step: Any
    params: Any
    frozen: Any
    opt_state: Any
    rng: Any
    data_position: Any


# ------------------------------------------------------------------------------ optimizer


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer's hyperparameters (`TrainConfig.optimizer_config()` gives a run's).
    Hashable: compiled steps are cached by it."""

    lr: float = 3e-4
    warmup_steps: int = 10
    decay_steps: int = 100
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    adam_b1: float = 0.9
    adam_b2: float = 0.95


def _optimizer_config(config: OptimizerConfig | TrainConfig) -> OptimizerConfig:
    return config if isinstance(config, OptimizerConfig) else config.optimizer_config()


def make_schedule(config: OptimizerConfig | TrainConfig) -> optax.Schedule:
    """Linear warmup to `lr` over `warmup_steps` (from lr / (warmup + 1), so the first step
    already moves), then cosine decay to lr * final_lr_ratio at step `decay_steps`."""
    config = _optimizer_config(config)
    warmup = max(int(config.warmup_steps), 0)
    return optax.warmup_cosine_decay_schedule(
        init_value=config.lr / (warmup + 1), peak_value=config.lr, warmup_steps=warmup,
        decay_steps=max(int(config.decay_steps), warmup + 1),
        end_value=config.lr * config.final_lr_ratio)


def decay_mask(params: Any) -> Any:
    """True for the leaves that get weight decay: projection and embedding matrices and
    their LoRA adapters; False for norms and biases."""
    def decayed(path: tuple, _: Any) -> bool:
        return any(getattr(key, "name", None) in _DECAYED_FIELDS for key in path)

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(config: OptimizerConfig | TrainConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW on `make_schedule` with decay masked by `decay_mask`."""
    config = _optimizer_config(config)
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(make_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                    weight_decay=config.weight_decay, mask=decay_mask),
    )


# ---------------------------------------------------------------------------------- state


def _key_data(seed: int) -> jax.Array:
    return jax.random.key_data(jax.random.key(seed))


def init_train_state(trainable: Any, optimizer: optax.GradientTransformation, *,
                     frozen: Params | None = None, seed: int = 0) -> TrainState:
    """Step 0 of a run training `trainable` (Params, or LoraParams over `frozen`)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen,
                      opt_state=optimizer.init(trainable), rng=_key_data(seed),
                      data_position=jnp.zeros((), jnp.int32))


def abstract_train_state(cfg: ModelConfig, optimizer: optax.GradientTransformation,
                         lora_cfg: LoraConfig | None = None,
                         shardings: TrainState | None = None) -> TrainState:
    """The state's `jax.ShapeDtypeStruct`s (with `shardings`' leaves attached, if given):
    the target of a checkpoint restore."""
    trainable = abstract_params(cfg) if lora_cfg is None else abstract_lora(cfg, lora_cfg)
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=trainable,
        frozen=None if lora_cfg is None else abstract_params(cfg),
        opt_state=jax.eval_shape(optimizer.init, trainable),
        rng=jax.eval_shape(_key_data, 0), data_position=jax.ShapeDtypeStruct((), jnp.int32))
    if shardings is None:
        return state
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        state, shardings)


def train_state_shardings(cfg: ModelConfig, optimizer: optax.GradientTransformation,
                          mesh: Mesh, lora_cfg: LoraConfig | None = None,
                          rules: ShardingRules | None = None) -> TrainState:
    """NamedShardings of every state leaf: params (and the frozen base) by the rules table,
    optimizer subtrees shaped like the params (Adam's moments) alike, scalars replicated."""
    rules = rules or ShardingRules()
    base = rules.param_shardings(cfg, mesh)
    trainable = base
    if lora_cfg is not None:
        trainable = jax.tree.map(lambda s: rules.sharding(mesh, s.axes, s.shape),
                                 lora_specs(cfg, lora_cfg),
                                 is_leaf=lambda x: isinstance(x, ParamSpec))
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = abstract_train_state(cfg, optimizer, lora_cfg).opt_state
    opt_state = optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract_opt,
                                      trainable, transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=trainable,
                      frozen=None if lora_cfg is None else base, opt_state=opt_state,
                      rng=replicated, data_position=replicated)


def batch_sharding(mesh: Mesh, rules: ShardingRules | None = None) -> NamedSharding:
    """Rows of a data batch [B, T+1] split over the mesh's `data` axis."""
    return (rules or ShardingRules()).sharding(mesh, ("batch", None))


# ------------------------------------------------------------------------------- forward


def training_model_config(cfg: ModelConfig) -> ModelConfig:
    """The config the training forward runs: XLA attention and matmuls (the native CPU and
    Pallas kernels have no gradients)."""
    return cfg.replace(attention_impl="xla", matmul_impl="xla")


def packed_row_batch(tokens: jax.Array, segment_ids: jax.Array) -> Batch:
    """A model `Batch` for one packed row: tokens [T], segment_ids [T] (0: padding, at the
    tail only). Each segment is a sequence starting at position 0, attended by the flat
    prefix-free prefill path (what `build_step_batch` gives chunks starting at 0)."""
    T = tokens.shape[0]
    index = jnp.arange(T, dtype=jnp.int32)
    valid = segment_ids > 0
    previous = jnp.concatenate([jnp.full((1,), -1, segment_ids.dtype), segment_ids[:-1]])
    is_start = valid & (segment_ids != previous)
    segment_start = jax.lax.cummax(jnp.where(is_start, index, 0))
    positions = jnp.where(valid, index - segment_start, 0)
    num_valid = jnp.sum(valid.astype(jnp.int32))
    (starts,) = jnp.nonzero(is_start, size=T, fill_value=num_valid)
    query_start = jnp.concatenate([starts.astype(jnp.int32), num_valid[None]])  # [T+1]
    zeros = jnp.zeros(T, jnp.int32)
    return Batch(tokens=tokens, positions=positions, slot_mapping=zeros,
                 query_start=query_start, kv_lens=zeros, page_table=zeros[:, None],
                 logits_indices=zeros, max_query_len=T, flat_prefill=True, num_decode=0)


# Training keeps no KV cache: the layer's cache write is replaced by nothing.
_NO_CACHE_WRITE = LayerHooks(write_kv=lambda k_cache, v_cache, *_: (k_cache, v_cache))


def packed_hidden_states(params: Params, cfg: ModelConfig, tokens: jax.Array,
                         segment_ids: jax.Array) -> jax.Array:
    """Final-norm hidden states [B, T, D] of packed rows tokens, segment_ids [B, T]."""
    cfg = training_model_config(cfg)
    dtype = jnp.dtype(cfg.dtype)
    # hidden_states threads a cache through its layer scan; one empty slot suffices.
    empty = jnp.zeros((cfg.num_layers, 1, 1, cfg.num_kv_heads, cfg.head_dim), dtype)
    cache = KVCache(k=empty, v=empty)

    def row(tokens_row: jax.Array, segments_row: jax.Array) -> jax.Array:
        batch = packed_row_batch(tokens_row, segments_row)
        return hidden_states(params, cfg, batch, cache, hooks=_NO_CACHE_WRITE)[0]

    return jax.vmap(row)(tokens, segment_ids)


def packed_logits(params: Params, cfg: ModelConfig, tokens: jax.Array,
                  segment_ids: jax.Array) -> jax.Array:
    """Float32 logits [B, T, V] of every token of packed rows [B, T]."""
    x = packed_hidden_states(params, cfg, tokens, segment_ids)
    B, T, D = x.shape
    logits = compute_logits(params, training_model_config(cfg), x.reshape(B * T, D))
    return logits.reshape(B, T, -1)


def masked_next_token_loss(logits: jax.Array, tokens: jax.Array,
                           segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy of next-token predictions and the number of targets.

    Args:
      logits: [B, T, V] for the inputs tokens[:, :T].
      tokens, segment_ids: [B, T+1] data rows.

    Token t predicts t+1 only when both are real and in the same segment: no loss on
    padding or across a document boundary.
    """
    targets = tokens[:, 1:]
    segment_in, segment_out = segment_ids[:, :-1], segment_ids[:, 1:]
    mask = (segment_in > 0) & (segment_in == segment_out)
    logits = logits.astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logits
    return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask.astype(jnp.int32))


def batch_loss(params: Params, cfg: ModelConfig,
               batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(summed loss, target count) of a data batch {"tokens", "segment_ids"} [B, T+1]."""
    tokens, segment_ids = batch["tokens"], batch["segment_ids"]
    logits = packed_logits(params, cfg, tokens[:, :-1], segment_ids[:, :-1])
    return masked_next_token_loss(logits, tokens, segment_ids)


def effective_params(trainable: Any, frozen: Params | None,
                     lora_cfg: LoraConfig | None) -> Params:
    """The weights the model runs: the trainable Params, or the base with adapters applied."""
    return trainable if lora_cfg is None else apply_lora(frozen, trainable, lora_cfg)


# ---------------------------------------------------------------------------------- step


def train_step(state: TrainState, batch: dict[str, jax.Array], *, cfg: ModelConfig,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               lora_cfg: LoraConfig | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a data batch {"tokens", "segment_ids"} [B, T+1].

    Returns:
      The next state, and metrics: loss (mean over targets, before the update), grad_norm
      (before clipping), learning_rate (of this update), tokens (targets counted).
    """
    def loss_of(trainable: Any) -> tuple[jax.Array, jax.Array]:
        params = effective_params(trainable, state.frozen, lora_cfg)
        loss_sum, count = batch_loss(params, cfg, batch)
        return loss_sum / jnp.maximum(count, 1).astype(jnp.float32), count

    (loss, count), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    # optax mixes Python floats with int32 step counts (`b1 ** count`), which strict dtype
    # promotion refuses; the model above stays under whatever promotion the caller set.
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        learning_rate = jnp.asarray(schedule(state.step), jnp.float32)
    params = optax.apply_updates(state.params, updates)
    rng, _ = jax.random.split(jax.random.wrap_key_data(state.rng))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              rng=jax.random.key_data(rng),
                              data_position=state.data_position + 1)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": learning_rate,
               "tokens": count}
    return new_state, metrics


def make_train_step(
    cfg: ModelConfig, config: OptimizerConfig | TrainConfig, lora_cfg: LoraConfig | None = None,
) -> Callable[[TrainState, dict[str, Any]], tuple[TrainState, dict[str, jax.Array]]]:
    """`train_step` jitted for this model and optimizer, the state donated. Cached: runs
    with the same model and optimizer settings share one compiled program per shape."""
    return _jitted_train_step(training_model_config(cfg), _optimizer_config(config),
                              lora_cfg)


@functools.lru_cache(maxsize=8)
def _jitted_train_step(cfg: ModelConfig, config: OptimizerConfig,
                       lora_cfg: LoraConfig | None) -> Callable[..., Any]:
    step = functools.partial(train_step, cfg=cfg, optimizer=make_optimizer(config),
                             schedule=make_schedule(config), lora_cfg=lora_cfg)
    return jax.jit(step, donate_argnums=0)


@functools.lru_cache(maxsize=8)
def make_eval_step(
    cfg: ModelConfig, lora_cfg: LoraConfig | None = None,
) -> Callable[[TrainState, dict[str, Any]], tuple[jax.Array, jax.Array]]:
    """Jitted (state, batch) -> (summed loss, target count), for held-out batches."""
    cfg = training_model_config(cfg)

    def evaluate(state: TrainState, batch: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
        return batch_loss(effective_params(state.params, state.frozen, lora_cfg), cfg, batch)

    return jax.jit(evaluate)


def final_params(state: TrainState, lora_cfg: LoraConfig | None = None) -> Params:
    """The trained model as plain `Params` (adapters merged under LoRA)."""
    if lora_cfg is None:
        return state.params
    return merge_lora(state.frozen, state.params, lora_cfg)

