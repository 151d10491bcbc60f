"""One declarative name map per family: our parameter fields <-> HF and GGUF tensor names.

An entry lists the checkpoint tensors that make up one field (several for the fused
`wqkv` and `w_gate_up`), how they combine, and the per-tensor transforms a format needs:
llama.cpp's q/k row permutation and Gemma's norm offset (GGUF only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from jaxinfer.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One parameter field and the checkpoint tensors it is made of.

    Attributes:
      field: dotted path in `Params` ("embed", "layers.wqkv", ...).
      hf: Hugging Face tensor names of the parts; "{i}" stands for the layer index.
      gguf: GGUF tensor names of the parts, in the same order.
      combine: how parts join: None (one part), "qkv" or "gate_up" (see `combine_parts`).
      per_layer: stacked over layers (a field of `LayerParams`).
      norm: a norm weight (Gemma's GGUF stores 1 + w).
    """

    field: str
    hf: tuple[str, ...]
    gguf: tuple[str, ...]
    combine: str | None = None
    per_layer: bool = True
    norm: bool = False


def tensor_entries(cfg: ModelConfig) -> list[TensorEntry]:
    """The tensors a model of `cfg` consists of, in load order."""
    e = TensorEntry
    hl, gl = "model.layers.{i}.", "blk.{i}."

    def attn(names: tuple[str, ...], kind: str) -> tuple[str, ...]:
        return tuple(f"{hl}self_attn.{n}_proj.{kind}" for n in names)

    def gattn(names: tuple[str, ...], kind: str) -> tuple[str, ...]:
        return tuple(f"{gl}attn_{n}.{kind}" for n in names)

    entries = [
        e("embed", ("model.embed_tokens.weight",), ("token_embd.weight",), per_layer=False),
        e("layers.attn_norm", (hl + "input_layernorm.weight",), (gl + "attn_norm.weight",),
          norm=True),
        e("layers.wqkv", attn(("q", "k", "v"), "weight"), gattn(("q", "k", "v"), "weight"),
          combine="qkv"),
        e("layers.wo", (hl + "self_attn.o_proj.weight",), (gl + "attn_output.weight",)),
    ]
    if cfg.qkv_bias:
        entries.append(e("layers.bqkv", attn(("q", "k", "v"), "bias"),
                         gattn(("q", "k", "v"), "bias"), combine="qkv"))
    if cfg.o_bias:
        entries.append(e("layers.bo", (hl + "self_attn.o_proj.bias",),
                         (gl + "attn_output.bias",)))
    if cfg.qk_norm:
        entries += [
            e("layers.q_norm", (hl + "self_attn.q_norm.weight",), (gl + "attn_q_norm.weight",),
              norm=True),
            e("layers.k_norm", (hl + "self_attn.k_norm.weight",), (gl + "attn_k_norm.weight",),
              norm=True),
        ]
    if cfg.sandwich_norms:
        entries += [
            e("layers.post_attn_norm", (hl + "post_attention_layernorm.weight",),
              (gl + "post_attention_norm.weight",), norm=True),
            e("layers.mlp_norm", (hl + "pre_feedforward_layernorm.weight",),
              (gl + "ffn_norm.weight",), norm=True),
            e("layers.post_mlp_norm", (hl + "post_feedforward_layernorm.weight",),
              (gl + "post_ffw_norm.weight",), norm=True),
        ]
    else:
        entries.append(e("layers.mlp_norm", (hl + "post_attention_layernorm.weight",),
                         (gl + "ffn_norm.weight",), norm=True))
    entries += [
        e("layers.w_gate_up", (hl + "mlp.gate_proj.weight", hl + "mlp.up_proj.weight"),
          (gl + "ffn_gate.weight", gl + "ffn_up.weight"), combine="gate_up"),
        e("layers.w_down", (hl + "mlp.down_proj.weight",), (gl + "ffn_down.weight",)),
        e("final_norm", ("model.norm.weight",), ("output_norm.weight",), per_layer=False,
          norm=True),
    ]
    if not cfg.tie_word_embeddings:
        entries.append(e("lm_head", ("lm_head.weight",), ("output.weight",), per_layer=False))
    return entries


def part_shapes(entry: TensorEntry, cfg: ModelConfig) -> list[tuple[int, ...]]:
    """Checkpoint shape of each part of `entry` (one layer's slice for per-layer fields)."""
    D, F, E = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    H, K, V = cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size
    name = entry.field.split(".")[-1]
    shapes: dict[str, list[tuple[int, ...]]] = {
        "embed": [(V, D)], "lm_head": [(V, D)], "final_norm": [(D,)],
        "wqkv": [(H * E, D), (K * E, D), (K * E, D)], "bqkv": [(H * E,), (K * E,), (K * E,)],
        "wo": [(D, H * E)], "bo": [(D,)], "q_norm": [(E,)], "k_norm": [(E,)],
        "w_gate_up": [(F, D), (F, D)], "w_down": [(D, F)],
    }
    return shapes.get(name, [(D,)])  # the remaining fields are [D] norms


class CheckpointTensor(NamedTuple):
    """One checkpoint tensor: part `part` of `entry` for layer `layer` (None: not per layer)."""

    entry: TensorEntry
    layer: int | None
    part: int
    name: str
    shape: tuple[int, ...]


def checkpoint_tensors(cfg: ModelConfig, fmt: str = "hf") -> Iterator[CheckpointTensor]:
    """Every checkpoint tensor of a model of `cfg` in `fmt` ("hf" or "gguf"), in load order:
    entry by entry, layer by layer, parts in `split_parts` order. Exporters walk this to
    write exactly what the loader reads."""
    for entry in tensor_entries(cfg):
        shapes = part_shapes(entry, cfg)
        for i in range(cfg.num_layers) if entry.per_layer else [None]:
            for part, (template, shape) in enumerate(zip(getattr(entry, fmt), shapes,
                                                         strict=True)):
                yield CheckpointTensor(entry, i, part, template.format(i=i), shape)


def combine_parts(entry: TensorEntry, parts: list[np.ndarray], cfg: ModelConfig) -> np.ndarray:
    """Join checkpoint parts into our layout (see `jaxinfer.model.params`)."""
    if entry.combine is None:
        return parts[0]
    if entry.combine == "qkv":
        K, G, E = cfg.num_kv_heads, cfg.num_query_groups, cfg.head_dim
        q, k, v = parts
        rest = q.shape[1:]
        grouped = np.concatenate([q.reshape(K, G * E, *rest), k.reshape(K, E, *rest),
                                  v.reshape(K, E, *rest)], axis=1)
        return grouped.reshape(K * (G + 2) * E, *rest)
    if entry.combine == "gate_up":
        gate, up = parts
        return np.stack([gate, up], axis=1).reshape(2 * gate.shape[0], *gate.shape[1:])
    raise ValueError(f"unknown combine rule {entry.combine!r}")


def split_parts(entry: TensorEntry, value: np.ndarray, cfg: ModelConfig) -> list[np.ndarray]:
    """Inverse of `combine_parts`: our layout back to the checkpoint parts (for exporters)."""
    if entry.combine is None:
        return [value]
    if entry.combine == "qkv":
        K, G, E = cfg.num_kv_heads, cfg.num_query_groups, cfg.head_dim
        rest = value.shape[1:]
        grouped = value.reshape(K, G + 2, E, *rest)
        return [grouped[:, :G].reshape(K * G * E, *rest), grouped[:, G].reshape(K * E, *rest),
                grouped[:, G + 1].reshape(K * E, *rest)]
    if entry.combine == "gate_up":
        pairs = value.reshape(-1, 2, *value.shape[1:])
        return [pairs[:, 0], pairs[:, 1]]
    raise ValueError(f"unknown combine rule {entry.combine!r}")


# Tensors a checkpoint may carry that the model does not need (rotary caches etc.).
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
GGUF_IGNORED = ("rope_freqs.weight",)

# llama.cpp permutes q/k rows to interleaved-pair RoPE only for these GGUF architectures.
GGUF_PERMUTED_ARCHS = ("llama", "mistral")


def rope_permuted_heads(name: str, cfg: ModelConfig) -> int | None:
    """Heads of a GGUF q/k tensor llama.cpp permuted (None for every other tensor)."""
    if ".attn_q." in name:
        return cfg.num_heads
    if ".attn_k." in name:
        return cfg.num_kv_heads
    return None


def undo_rope_permutation(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k row permutation (interleaved pairs -> rotate-half halves).

    llama.cpp stores the rows of each head in order (0, E/2, 1, E/2+1, ...); Hugging Face
    expects the two halves contiguous. Works for weights [N*E, D] and biases [N*E].
    """
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def apply_rope_permutation(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's permutation (the inverse of `undo_rope_permutation`), for exporters."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
