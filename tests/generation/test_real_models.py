"""Real weights against transformers loading the same GGUF file (CPU, float32).

SmolLM2-135M-Instruct (Q4_1) and Gemma 3 270M (Q4_K_M): logits of a 64-token prompt within
1e-3, 32 greedy tokens identical, and SmolLM2's chat answer names Paris.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers

import jaxinfer
from jaxinfer.batch import SequenceChunk, build_step_batch
from jaxinfer.cache import init_cache
from jaxinfer.model.transformer import Batch, forward
from jaxinfer.sampling import SamplingParams
from tests.models import bible_text, gemma3_path, smollm2_path

LOGIT_TOL = 1e-3
MODELS = {"smollm2": smollm2_path, "gemma3": gemma3_path}


@pytest.fixture(scope="module", params=sorted(MODELS))
def pair(request):
    """(name, our LLM, transformers model, transformers tokenizer) for one real model."""
    path = MODELS[request.param]()
    ours = jaxinfer.load(path, progress=False, kv_cache_tokens=4096)
    kwargs = dict(gguf_file=path.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, dtype=torch.float32, **kwargs).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
    yield request.param, ours, hf, hf_tok
    del hf


def _prompt_ids(hf_tok, ours) -> list[int]:
    text = bible_text(0, 12)
    ids = hf_tok(text)["input_ids"][:64]
    assert len(ids) == 64
    assert ours.tokenizer.encode(text)[:64] == ids, "tokenizers disagree on the prompt"
    return ids


def test_prompt_logits_match(pair):
    name, ours, hf, hf_tok = pair
    ids = _prompt_ids(hf_tok, ours)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].numpy()
    cfg = ours.cfg
    cache = init_cache(cfg, num_pages=4, page_size=16)
    step = build_step_batch([SequenceChunk(ids, 0, [2, 0, 3, 1])], page_size=16,
                            num_slots=cache.num_slots)
    logits, _ = jax.jit(forward, static_argnums=1, static_argnames="all_logits")(
        ours.params, cfg, Batch.from_step(step), cache, all_logits=True)
    err = float(np.max(np.abs(np.asarray(logits)[:64] - expected)))
    print(f"{name}: max |logit diff| over 64 positions = {err:.2e}")
    assert err < LOGIT_TOL
    assert np.all(np.argmax(np.asarray(logits)[:64], -1) == np.argmax(expected, -1))


def test_greedy_tokens_match(pair):
    name, ours, hf, hf_tok = pair
    ids = _prompt_ids(hf_tok, ours)[:40]
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                          do_sample=False, max_new_tokens=32, min_new_tokens=32)
    expected = out[0, len(ids):].tolist()
    (result,) = ours.generate(ids, SamplingParams(temperature=0.0, max_tokens=32,
                                                  ignore_eos=True))
    assert result.token_ids == expected
    assert result.text == ours.tokenizer.decode(expected)


def test_smollm2_chat_answer():
    llm = jaxinfer.load(smollm2_path(), progress=False, kv_cache_tokens=1024)
    (out,) = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(temperature=0.0, max_tokens=32))
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
