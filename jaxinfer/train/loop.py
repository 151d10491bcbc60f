"""The `jaxinfer train` driver: config, model and data set-up, the step loop, evaluation.

`run_training(TrainConfig(...))` prints its config as JSON, trains with a progress bar,
evaluates held-out loss every `eval_every` steps, and returns a `TrainSummary` holding the
final state and the trained weights (LoRA adapters merged). A checkpointer (see
`Checkpointer`) makes a run resumable: it restores the latest state at start and saves as the
run goes, and is always waited for and closed before returning.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxinfer.config import ModelConfig
from jaxinfer.errors import ConfigError
from jaxinfer.model.params import Params, init_params
from jaxinfer.parallel.sharding import make_mesh
from jaxinfer.train.data import ByteTokenizer, TextTokenizer, TrainData, load_train_data
from jaxinfer.train.lora import LORA_TARGETS, LoraConfig, count_params, init_lora
from jaxinfer.train.step import (
    OptimizerConfig,
    TrainState,
    abstract_train_state,
    final_params,
    init_train_state,
    make_eval_step,
    make_optimizer,
    make_train_step,
    train_state_shardings,
)

# Random-initialised model shapes for smoke runs and tests (vocab: the tokenizer's).
TINY_MODELS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16),
    "small": dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
                  num_kv_heads=4, head_dim=32),
}
TOKENIZERS = ("model", "bytes")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run is a function of.

    Attributes:
      model: GGUF file / Hugging Face folder / checkpoints name (None: SmolLM2-135M); with
        `tiny`, only its tokenizer is used.
      tiny: name of a `TINY_MODELS` shape to initialise at random instead of loading weights.
      data: "bible" (the King James Bible, one document per chapter) or a text file
        (documents: paragraphs separated by blank lines).
      tokenizer: "model" (the model's own) or "bytes" (UTF-8 bytes; tiny models only).
      max_documents: read only the first N documents (None: all).
      seq_len: tokens per packed row (inputs; targets are shifted by one).
      batch_size: rows per step.
      steps: optimizer steps of the whole run (a resumed run continues up to it).
      lr, warmup_steps, final_lr_ratio: linear warmup to lr, cosine decay to lr * ratio.
      decay_steps: where the cosine decay ends (None: at `steps`; larger: a run that stops
        early on a longer schedule).
      weight_decay: AdamW decay of matrices (not norms or biases).
      clip_norm: gradient clipping by global norm.
      adam_b1, adam_b2: Adam's moment decay rates.
      lora_rank: 0 trains every weight; r > 0 trains rank-r adapters, base frozen.
      lora_alpha: adapter scale numerator (updates scale by alpha / rank).
      lora_targets: projections that get adapters.
      eval_every: held-out loss every N steps and at the end (0: never).
      eval_batches: batches per evaluation.
      eval_fraction: share of documents held out for evaluation.
      seed: data order, held-out split, initialisation.
      dtype: weights and activations ("float32" or "bfloat16").
      output_dir: write the trained model (LoRA merged) here in our Orbax format
        (`jaxinfer.weights.orbax_io`; `jaxinfer generate --model DIR` runs it).
      export_hf: also write it as a Hugging Face folder (safetensors + config.json).
      checkpoint_dir, save_every, keep: resumable checkpoints (jaxinfer.train.checkpoint).
      progress: show the progress bar.
    """

    model: str | None = None
    tiny: str | None = None
    data: str = "bible"
    tokenizer: str = "model"
    max_documents: int | None = None
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 100
    lr: float = 3e-4
    warmup_steps: int = 10
    decay_steps: int | None = None
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    eval_every: int = 50
    eval_batches: int = 4
    eval_fraction: float = 0.02
    seed: int = 0
    dtype: str = "float32"
    output_dir: str | None = None
    export_hf: str | None = None
    checkpoint_dir: str | None = None
    save_every: int = 100
    keep: int = 3
    progress: bool = True

    def __post_init__(self) -> None:
        positive = ("seq_len", "batch_size", "steps", "eval_batches", "save_every", "keep")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        nonnegative = ("warmup_steps", "weight_decay", "lora_rank", "eval_every", "decay_steps")
        for name in nonnegative:
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or not self.clip_norm > 0:
            raise ConfigError(f"lr and clip_norm must be positive, got {self.lr}, "
                              f"{self.clip_norm}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.tiny is not None and self.tiny not in TINY_MODELS:
            raise ConfigError(f"unknown tiny model {self.tiny!r}; choose from {list(TINY_MODELS)}")
        if self.tokenizer not in TOKENIZERS:
            raise ConfigError(f"tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")
        if self.tokenizer == "bytes" and self.tiny is None:
            raise ConfigError("the bytes tokenizer only fits a random --tiny model (a loaded "
                              "model needs its own tokenizer)")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        self.lora_config()  # validates rank and targets

    def optimizer_config(self) -> OptimizerConfig:
        """The optimizer's part of this config."""
        return OptimizerConfig(
            lr=self.lr, warmup_steps=self.warmup_steps,
            decay_steps=self.steps if self.decay_steps is None else self.decay_steps,
            final_lr_ratio=self.final_lr_ratio, weight_decay=self.weight_decay,
            clip_norm=self.clip_norm, adam_b1=self.adam_b1, adam_b2=self.adam_b2)

    def lora_config(self) -> LoraConfig | None:
        """The adapter config (None: full fine-tuning)."""
        if self.lora_rank == 0:
            return None
        return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, targets=self.lora_targets)


class Checkpointer(Protocol):
    """What `run_training` needs of a checkpoint manager (`jaxinfer.train.checkpoint`).

    `maybe_save` must have read the state's arrays (copied them off the device) before it
    returns: the next step donates those buffers.
    """

    def restore_latest(self, abstract_state: TrainState) -> TrainState | None:
        """The newest saved state, placed as `abstract_state`'s shardings say; None when
        nothing has been saved."""

    def maybe_save(self, step: int, state: TrainState, force: bool = False) -> None:
        """Save `state` (after `step` steps) if the policy says so, or `force`."""

    def wait(self) -> None:
        """Block until every pending save is on disk."""

    def close(self) -> None:
        """Release resources (after `wait`)."""


@dataclasses.dataclass(frozen=True)
class TrainSummary:
    """What a run did and produced.

    Attributes:
      start_step: the step it started (or resumed) at; steps: the step it ended at.
      losses: training loss of each step run; eval_losses: (step, held-out loss) pairs.
      tokens: next-token targets trained on; seconds: wall time of the step loop;
      first_step_seconds: of its first step (which includes compiling the step).
      trainable_params: scalars updated by the optimizer.
      state: the final `TrainState`; params: the trained weights (LoRA merged).
      model_config: the model's config; lora_config: the adapters' (None: full).
    """

    start_step: int
    steps: int
    losses: list[float]
    eval_losses: list[tuple[int, float]]
    tokens: int
    seconds: float
    first_step_seconds: float
    trainable_params: int
    state: TrainState
    params: Params
    model_config: ModelConfig
    lora_config: LoraConfig | None

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    @property
    def final_eval_loss(self) -> float | None:
        return self.eval_losses[-1][1] if self.eval_losses else None


# ------------------------------------------------------------------------------- set-up


@functools.lru_cache(maxsize=4)
def load_tokenizer(model: str | None) -> TextTokenizer:
    """Only the tokenizer of a model (GGUF metadata or tokenizer.json; no weights)."""
    from jaxinfer.tokenizer import Tokenizer
    from jaxinfer.weights.gguf_io import GGUFFile
    from jaxinfer.weights.loader import is_gguf, resolve_model_path

    path = resolve_model_path(model)
    if is_gguf(path):
        return Tokenizer.from_gguf_metadata(GGUFFile(path).metadata)
    return Tokenizer.from_hf_dir(path)


def tiny_model_config(name: str, vocab_size: int, *, seq_len: int = 2048,
                      dtype: str = "float32") -> ModelConfig:
    """A `TINY_MODELS` shape as a Llama-style config for a `vocab_size` tokenizer."""
    return ModelConfig(family="llama", vocab_size=vocab_size,
                       max_position_embeddings=max(2048, seq_len), tie_word_embeddings=True,
                       dtype=dtype, **TINY_MODELS[name])


def setup_model(config: TrainConfig) -> tuple[ModelConfig, Params, TextTokenizer]:
    """The model to train (loaded, or random for `tiny`) and its tokenizer."""
    if config.tiny is not None:
        tokenizer = ByteTokenizer() if config.tokenizer == "bytes" else load_tokenizer(
            config.model)
        cfg = tiny_model_config(config.tiny, tokenizer.vocab_size, seq_len=config.seq_len,
                                dtype=config.dtype)
        return cfg, init_params(cfg, seed=config.seed), tokenizer
    from jaxinfer.weights.loader import load_model

    loaded = load_model(config.model, dtype=config.dtype, progress=config.progress)
    return loaded.cfg, loaded.params, loaded.tokenizer


def open_checkpointer(config: TrainConfig) -> Checkpointer:
    """The Orbax checkpoint manager for `config.checkpoint_dir`."""
    from jaxinfer.train.checkpoint import TrainCheckpointer

    return TrainCheckpointer(config.checkpoint_dir, save_every=config.save_every,
                             keep=config.keep)


def evaluate(eval_step: Callable[..., tuple[jax.Array, jax.Array]], state: TrainState,
             data: TrainData, config: TrainConfig) -> float | None:
    """Mean held-out loss over the first `eval_batches` evaluation batches (None: no
    held-out data)."""
    if data.eval is None:
        return None
    total, count = 0.0, 0
    for i in range(config.eval_batches):
        loss_sum, n = jax.device_get(eval_step(state, data.eval.batch_at(i, config.batch_size)))
        total, count = total + float(loss_sum), count + int(n)
    return total / max(count, 1)


def _print_json(record: dict[str, Any]) -> None:
    tqdm.write(json.dumps(record), file=sys.stdout)
    sys.stdout.flush()


# --------------------------------------------------------------------------------- run


def run_training(
    config: TrainConfig, *, checkpointer: Checkpointer | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainSummary:
    """Train as `config` says.

    Args:
      config: the run.
      checkpointer: resume from and save to it (default: one opened on
        `config.checkpoint_dir`, if set). Always waited for and closed before returning.
      on_step: called after every step with the step number reached and its metrics
        (loss, grad_norm, learning_rate, tokens; eval_loss on evaluation steps).

    Returns:
      The `TrainSummary`, holding the final state and weights.
    """
    _print_json({"train_config": dataclasses.asdict(config)})
    for target in (config.output_dir, config.export_hf):
        if target is not None and Path(target).exists():
            raise ConfigError(f"output folder {target} exists; choose a new folder (training "
                              "never overwrites a model)")
    if checkpointer is None and config.checkpoint_dir is not None:
        checkpointer = open_checkpointer(config)
    try:
        return _run(config, checkpointer, on_step)
    finally:
        if checkpointer is not None:
            checkpointer.wait()
            checkpointer.close()


def _run(config: TrainConfig, checkpointer: Checkpointer | None,
         on_step: Callable[[int, dict[str, float]], None] | None) -> TrainSummary:
    cfg, params, tokenizer = setup_model(config)
    data = load_train_data(config.data, tokenizer, seq_len=config.seq_len, seed=config.seed,
                           eval_fraction=config.eval_fraction,
                           max_documents=config.max_documents)
    lora_cfg = config.lora_config()
    optimizer = make_optimizer(config)
    if lora_cfg is None:
        state = init_train_state(params, optimizer, seed=config.seed)
    else:
        state = init_train_state(init_lora(cfg, lora_cfg, seed=config.seed), optimizer,
                                 frozen=params, seed=config.seed)
    del params
    if checkpointer is not None:
        mesh = make_mesh(devices=jax.devices()[:1])
        shardings = train_state_shardings(cfg, optimizer, mesh, lora_cfg)
        restored = checkpointer.restore_latest(
            abstract_train_state(cfg, optimizer, lora_cfg, shardings))
        if restored is not None:
            state = restored
    start = int(state.step)
    position = int(state.data_position)
    trainable = count_params(state.params)
    _print_json({"model": {"family": cfg.family, "layers": cfg.num_layers,
                           "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
                           "params": cfg.num_params(), "dtype": cfg.dtype},
                 "data": data.describe(), "trainable_params": trainable,
                 "mode": "full" if lora_cfg is None else f"lora rank {lora_cfg.rank}",
                 "start_step": start, "data_position": position})

    step_fn = make_train_step(cfg, config, lora_cfg)
    eval_fn = make_eval_step(cfg, lora_cfg)
    losses: list[float] = []
    eval_losses: list[tuple[int, float]] = []
    tokens = 0
    began = time.perf_counter()
    first_step_seconds, first_step_tokens = 0.0, 0
    with tqdm(total=config.steps, initial=start, desc="train", unit="step",
              disable=not config.progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for step in range(start + 1, config.steps + 1):
            batch = data.train.batch_at(position, config.batch_size)
            position += 1
            state, device_metrics = step_fn(state, batch)
            metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
            losses.append(metrics["loss"])
            tokens += int(metrics["tokens"])
            if step == start + 1:
                first_step_seconds, first_step_tokens = time.perf_counter() - began, tokens
            if checkpointer is not None:
                checkpointer.maybe_save(step, state, force=step == config.steps)
            if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
                eval_loss = evaluate(eval_fn, state, data, config)
                if eval_loss is not None:
                    eval_losses.append((step, eval_loss))
                    metrics["eval_loss"] = eval_loss
                    _print_json({"step": step, "eval_loss": round(eval_loss, 5)})
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}")
            bar.update(1)
            if on_step is not None:
                on_step(step, metrics)
    seconds = time.perf_counter() - began
    steady_seconds = seconds - first_step_seconds
    summary = TrainSummary(
        start_step=start, steps=int(state.step), losses=losses, eval_losses=eval_losses,
        tokens=tokens, seconds=seconds, first_step_seconds=first_step_seconds,
        trainable_params=trainable, state=state,
        params=final_params(state, lora_cfg), model_config=cfg, lora_config=lora_cfg)
    _print_json({"steps": summary.steps, "final_loss": summary.final_loss,
                 "final_eval_loss": summary.final_eval_loss, "tokens": tokens,
                 "seconds": round(seconds, 3),
                 "first_step_seconds": round(first_step_seconds, 3),
                 # after the first step (which compiles); evaluations included
                 "tokens_per_second": round((tokens - first_step_tokens) / steady_seconds, 1)
                 if len(losses) > 1 and steady_seconds > 0 else None,
                 "mean_loss_last_10": float(np.mean(losses[-10:])) if losses else None})
    export_trained(config, summary, tokenizer)
    return summary


def export_trained(config: TrainConfig, summary: TrainSummary, tokenizer: Any) -> None:
    """Write the trained weights (LoRA merged) where `config` asks: our Orbax format and/or
    a Hugging Face folder. Byte-level tokenizers (tiny runs) have no files to write."""
    from jaxinfer.tokenizer import Tokenizer
    from jaxinfer.weights.hf_export import export_hf
    from jaxinfer.weights.orbax_io import save_model_dir

    tok = tokenizer if isinstance(tokenizer, Tokenizer) else None
    source = f"jaxinfer train ({summary.steps} steps, " + (
        "full" if summary.lora_config is None else f"LoRA rank {summary.lora_config.rank}") + ")"
    if config.output_dir is not None:
        path = save_model_dir(config.output_dir, summary.params, summary.model_config,
                              tokenizer_source=tok, source=source, progress=config.progress)
        _print_json({"saved": str(path), "format": "jaxinfer-orbax"})
    if config.export_hf is not None:
        path = export_hf(config.export_hf, summary.params, summary.model_config,
                         tokenizer_source=tok, progress=config.progress)
        _print_json({"saved": str(path), "format": "huggingface"})
