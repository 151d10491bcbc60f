"""A tiny random Llama saved by transformers, and the same weights written as GGUF."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from jaxinfer.weights.names import apply_rope_permutation
from tests.weights.gguf_writer import write_llama_gguf

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5)


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory):
    """(folder, transformers model) of a tiny random Llama saved as safetensors."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def write_tiny_gguf(path, model, *, nan_in=None) -> None:
    """Write `model` as a llama GGUF (F32), permuting q/k rows the way llama.cpp does."""
    c = model.config
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}

    def tensors():
        for name, tensor in model.state_dict().items():
            array = tensor.numpy().astype(np.float32)
            if name in names:
                out = names[name]
            else:
                _, _, i, *rest = name.split(".")
                key = ".".join(rest[:-1])
                out = f"blk.{i}.{per_layer[key]}.weight"
                if key == "self_attn.q_proj":
                    array = apply_rope_permutation(array, c.num_attention_heads)
                if key == "self_attn.k_proj":
                    array = apply_rope_permutation(array, c.num_key_value_heads)
            if out == nan_in:
                array = array.copy()
                array.flat[3] = np.nan
            yield out, array, None

    write_llama_gguf(path, num_layers=c.num_hidden_layers,
                     context_length=c.max_position_embeddings, hidden_size=c.hidden_size,
                     intermediate_size=c.intermediate_size, num_heads=c.num_attention_heads,
                     num_kv_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps,
                     rope_theta=TINY["rope_theta"], vocab_size=c.vocab_size, tensors=tensors())


@pytest.fixture(scope="session")
def tiny_gguf(tiny_hf_model, tmp_path_factory):
    folder, model = tiny_hf_model
    path = tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf"
    write_tiny_gguf(path, model)
    return path
