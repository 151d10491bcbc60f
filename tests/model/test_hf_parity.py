"""Logit parity with Hugging Face transformers on small random models of every family.

Each model is built with its transformers config class, given well-scaled random weights,
saved with `save_pretrained` (safetensors) and loaded by jaxinfer from that folder. Prefill
logits and each of 16 incremental decode steps must agree within 1e-4 (float32).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxinfer.batch import SequenceChunk, build_step_batch
from jaxinfer.cache import init_cache
from jaxinfer.model.transformer import Batch, forward
from jaxinfer.weights.loader import load_config, load_params

TOL = 1e-4
PROMPT_LEN = 12
DECODE_STEPS = 16
PAGE = 4

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(head_dim=16)),
    "llama3_rope": (transformers.LlamaConfig, dict(
        head_dim=16, max_position_embeddings=512,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama_bias": (transformers.LlamaConfig, dict(attention_bias=True)),
    "smollm2": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=1,
                                               tie_word_embeddings=True, rope_theta=100000.0)),
    "qwen2": (transformers.Qwen2Config, dict()),
    "qwen2_yarn": (transformers.Qwen2Config, dict(
        rope_scaling={"rope_type": "yarn", "factor": 4.0,
                      "original_max_position_embeddings": 64})),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16)),
    "mistral": (transformers.MistralConfig, dict(head_dim=16, sliding_window=8)),
    "gemma3": (transformers.Gemma3TextConfig, dict(
        head_dim=16, sliding_window=8, num_hidden_layers=4, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention",
                     "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1000000.0}})),
}


def _randomize(model: torch.nn.Module, norm_center: float) -> None:
    """Weights large enough that logits spread over several units (not near-uniform)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(norm_center + 0.1 * noise)
            elif "embed" in name:
                p.copy_(noise)
            else:
                p.copy_(noise * 0.15)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request, tmp_path_factory):
    name = request.param
    config_cls, extra = FAMILIES[name]
    config = config_cls(**{**BASE, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, norm_center=0.0 if name == "gemma3" else 1.0)
    model.eval()
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path, safe_serialization=True)
    return name, model, path


def _hf_logits(model, prompt: list[int]) -> tuple[list[np.ndarray], list[int]]:
    """Prefill logits then DECODE_STEPS greedy incremental steps with the KV cache."""
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        logits = [out.logits[0, -1].numpy()]
        past = out.past_key_values
        tokens = []
        for _ in range(DECODE_STEPS):
            token = int(np.argmax(logits[-1]))
            tokens.append(token)
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits.append(out.logits[0, -1].numpy())
    return logits, tokens


def test_logits_match_transformers(family_model):
    name, model, path = family_model
    cfg = load_config(path)
    params = load_params(path, cfg, progress=False)
    prompt = np.random.default_rng(1).integers(0, BASE["vocab_size"], PROMPT_LEN).tolist()
    expected, tokens = _hf_logits(model, prompt)

    cache = init_cache(cfg, num_pages=16, page_size=PAGE)
    pages = list(range(3, 3 + 10))  # deliberately not starting at page 0
    step_fn = jax.jit(forward, static_argnums=1, donate_argnums=3)
    chunks = [SequenceChunk(prompt, 0, pages)] + [
        SequenceChunk([t], PROMPT_LEN + i, pages) for i, t in enumerate(tokens)]
    for i, chunk in enumerate(chunks):
        step = build_step_batch([chunk], page_size=PAGE, num_slots=cache.num_slots)
        logits, cache = step_fn(params, cfg, Batch.from_step(step), cache)
        err = float(np.max(np.abs(np.asarray(logits[0]) - expected[i])))
        assert err < TOL, f"{name}: step {i} max |logit diff| {err:.2e} >= {TOL}"
    # Sanity: the reference logits are not degenerate (so the tolerance means something).
    assert np.std(expected[0]) > 0.5, f"{name}: reference logits nearly uniform"
