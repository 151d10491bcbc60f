"""Training: packed text data, a pure AdamW train step (full fine-tuning or LoRA), the
`jaxinfer train` driver. See docs/training.md."""

from jaxinfer.train.data import PackedDataset, PackedRows, load_train_data, pack_documents
from jaxinfer.train.loop import Checkpointer, TrainConfig, TrainSummary, run_training
from jaxinfer.train.lora import LoraConfig, LoraParams, apply_lora, init_lora, merge_lora
from jaxinfer.train.step import (
    TrainState,
    abstract_train_state,
    init_train_state,
    make_optimizer,
    make_train_step,
    train_state_shardings,
    train_step,
)

__all__ = [
    "Checkpointer", "LoraConfig", "LoraParams", "PackedDataset", "PackedRows", "TrainConfig",
    "TrainState", "TrainSummary", "abstract_train_state", "apply_lora", "init_lora",
    "init_train_state", "load_train_data", "make_optimizer", "make_train_step", "merge_lora",
    "pack_documents", "run_training", "train_state_shardings", "train_step",
]
