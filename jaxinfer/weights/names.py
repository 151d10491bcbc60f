"""One declarative name map per family: our parameter fields <-> HF and GGUF tensor names.

Each entry also names the per-tensor transforms a format needs (reshape is implied by the
target shape; GGUF adds llama.cpp's q/k row permutation and Gemma's norm offset).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxinfer.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One parameter field and where it lives in each format.

    Attributes:
      field: dotted path in `Params` ("embed", "layers.wq", ...).
      hf: Hugging Face tensor name; "{i}" stands for the layer index.
      gguf: GGUF tensor name; "{i}" stands for the layer index.
      per_layer: stacked over layers (field of `LayerParams`).
      rope_permuted: llama.cpp permuted its rows for interleaved RoPE ("q" or "k").
      norm: a norm weight (Gemma's GGUF stores 1 + w).
    """

    field: str
    hf: str
    gguf: str
    per_layer: bool = True
    rope_permuted: str | None = None
    norm: bool = False


def tensor_entries(cfg: ModelConfig) -> list[TensorEntry]:
    """The tensors a model of `cfg` consists of, in load order."""
    e = TensorEntry
    hl, gl = "model.layers.{i}.", "blk.{i}."
    entries = [
        e("embed", "model.embed_tokens.weight", "token_embd.weight", per_layer=False),
        e("layers.attn_norm", hl + "input_layernorm.weight", gl + "attn_norm.weight", norm=True),
        e("layers.wq", hl + "self_attn.q_proj.weight", gl + "attn_q.weight", rope_permuted="q"),
        e("layers.wk", hl + "self_attn.k_proj.weight", gl + "attn_k.weight", rope_permuted="k"),
        e("layers.wv", hl + "self_attn.v_proj.weight", gl + "attn_v.weight"),
        e("layers.wo", hl + "self_attn.o_proj.weight", gl + "attn_output.weight"),
    ]
    if cfg.qkv_bias:
        entries += [
            e("layers.bq", hl + "self_attn.q_proj.bias", gl + "attn_q.bias", rope_permuted="q"),
            e("layers.bk", hl + "self_attn.k_proj.bias", gl + "attn_k.bias", rope_permuted="k"),
            e("layers.bv", hl + "self_attn.v_proj.bias", gl + "attn_v.bias"),
        ]
    if cfg.o_bias:
        entries.append(e("layers.bo", hl + "self_attn.o_proj.bias", gl + "attn_output.bias"))
    if cfg.qk_norm:
        entries += [
            e("layers.q_norm", hl + "self_attn.q_norm.weight", gl + "attn_q_norm.weight",
              norm=True),
            e("layers.k_norm", hl + "self_attn.k_norm.weight", gl + "attn_k_norm.weight",
              norm=True),
        ]
    if cfg.sandwich_norms:
        entries += [
            e("layers.post_attn_norm", hl + "post_attention_layernorm.weight",
              gl + "post_attention_norm.weight", norm=True),
            e("layers.mlp_norm", hl + "pre_feedforward_layernorm.weight",
              gl + "ffn_norm.weight", norm=True),
            e("layers.post_mlp_norm", hl + "post_feedforward_layernorm.weight",
              gl + "post_ffw_norm.weight", norm=True),
        ]
    else:
        entries.append(e("layers.mlp_norm", hl + "post_attention_layernorm.weight",
                         gl + "ffn_norm.weight", norm=True))
    entries += [
        e("layers.w_gate", hl + "mlp.gate_proj.weight", gl + "ffn_gate.weight"),
        e("layers.w_up", hl + "mlp.up_proj.weight", gl + "ffn_up.weight"),
        e("layers.w_down", hl + "mlp.down_proj.weight", gl + "ffn_down.weight"),
        e("final_norm", "model.norm.weight", "output_norm.weight", per_layer=False, norm=True),
    ]
    if not cfg.tie_word_embeddings:
        entries.append(e("lm_head", "lm_head.weight", "output.weight", per_layer=False))
    return entries


# Tensors a checkpoint may carry that the model does not need (rotary caches etc.).
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
GGUF_IGNORED = ("rope_freqs.weight",)

# llama.cpp permutes q/k rows to interleaved-pair RoPE only for these GGUF architectures.
GGUF_PERMUTED_ARCHS = ("llama", "mistral")


def undo_rope_permutation(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k row permutation (interleaved pairs -> rotate-half halves).

    llama.cpp stores the rows of each head in order (0, E/2, 1, E/2+1, ...); Hugging Face
    expects the two halves contiguous. Works for weights [N*E, D] and biases [N*E].
    """
    rows = w.shape[0]
    half = rows // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def apply_rope_permutation(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's permutation (the inverse of `undo_rope_permutation`), for exporters."""
    rows = w.shape[0]
    half = rows // num_heads // 2
    return w.reshape(num_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
