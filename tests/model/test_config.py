"""ModelConfig: built from HF configs and GGUF metadata; refuses what it cannot run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from jaxinfer.config import (
    ModelConfig,
    RopeConfig,
    from_hf_config,
    hf_config_from_gguf_metadata,
)
from jaxinfer.errors import ConfigError

LLAMA = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)


def test_config_is_frozen_and_hashable():
    cfg = from_hf_config(LLAMA)
    assert hash(cfg) == hash(from_hf_config(LLAMA))
    with pytest.raises(AttributeError):
        cfg.hidden_size = 3  # type: ignore[misc]
    assert cfg.replace(dtype="bfloat16").dtype == "bfloat16"


@pytest.mark.parametrize("model_type", ["gpt2", "falcon", None])
def test_unknown_architecture_is_named(model_type):
    with pytest.raises(ConfigError, match=f"unknown architecture.*{model_type}"):
        from_hf_config({**LLAMA, "model_type": model_type})


@pytest.mark.parametrize("extra, pattern", [
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "longrope"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "relu"}, "relu"),
    ({"num_key_value_heads": 3}, "multiple of num_kv_heads"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_unsupported_options_are_refused(extra, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_hf_config({**LLAMA, **extra})


def test_multimodal_gemma3_refused():
    with pytest.raises(ConfigError, match="multimodal"):
        from_hf_config({"model_type": "gemma3", "text_config": {}})


def test_family_switches():
    qwen2 = from_hf_config({**LLAMA, "model_type": "qwen2"})
    assert qwen2.qkv_bias and not qwen2.o_bias
    qwen3 = from_hf_config({**LLAMA, "model_type": "qwen3", "head_dim": 32})
    assert qwen3.qk_norm and qwen3.head_dim == 32
    mistral = from_hf_config({**LLAMA, "model_type": "mistral", "sliding_window": 16})
    assert mistral.layer_types == ("sliding", "sliding") and mistral.sliding_window == 16
    gemma = from_hf_config({**LLAMA, "model_type": "gemma3_text", "num_hidden_layers": 12,
                            "head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 64})
    assert gemma.layer_types.count("full") == 2 and gemma.layer_types[5] == "full"
    assert gemma.norm_weight_offset == 1.0 and gemma.sandwich_norms and gemma.tie_word_embeddings
    assert gemma.attention_scale == pytest.approx(64**-0.5)
    assert gemma.embed_scale == pytest.approx(8.0)


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "default", "rope_theta": 500000.0},
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
     "rope_theta": 10000.0},
])
def test_inv_freq_matches_transformers(rope_parameters):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16,
                                  max_position_embeddings=512, rope_parameters=rope_parameters)
    cfg = from_hf_config(hf.to_dict())
    kind = rope_parameters["rope_type"]
    if kind == "default":
        expected = 1.0 / (rope_parameters["rope_theta"] ** (
            torch.arange(0, 16, 2, dtype=torch.int64).float() / 16))
        scaling = 1.0
    else:
        expected, scaling = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    np.testing.assert_allclose(cfg.rope.inv_freq(16, 512), expected.numpy(), rtol=2e-6)
    assert cfg.rope.attention_scaling == pytest.approx(scaling)


def test_v4_style_rope_scaling_is_read():
    cfg = from_hf_config({**LLAMA, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    assert cfg.rope == RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0,
                                  original_max_position_embeddings=8192)


def test_gguf_metadata_unknown_architecture():
    with pytest.raises(ConfigError, match="unknown GGUF architecture 'falcon'"):
        hf_config_from_gguf_metadata({"general.architecture": "falcon"})


def test_gguf_metadata_missing_keys():
    with pytest.raises(ConfigError, match="llama.block_count"):
        hf_config_from_gguf_metadata({"general.architecture": "llama"})


def test_invalid_dimensions():
    with pytest.raises(ConfigError, match="hidden_size must be positive"):
        ModelConfig(family="llama", vocab_size=10, hidden_size=0, intermediate_size=8,
                    num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
                    max_position_embeddings=16)
    with pytest.raises(ConfigError, match="attention_impl"):
        ModelConfig(family="llama", vocab_size=10, hidden_size=8, intermediate_size=8,
                    num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
                    max_position_embeddings=16, attention_impl="cuda")  # type: ignore[arg-type]
