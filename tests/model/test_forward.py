"""Self-consistency of the ragged forward pass on tiny random models.

Step-by-step decode equals one full forward; a ragged batch of several prompts (and a mixed
decode + prefill batch) equals each sequence run alone; chunked prefill equals one-shot
prefill; padding never writes the cache.
"""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest

from jaxinfer.batch import SequenceChunk, build_step_batch
from jaxinfer.cache import init_cache
from jaxinfer.config import ModelConfig, RopeConfig
from jaxinfer.model.params import init_params
from jaxinfer.model.transformer import Batch, forward

PAGE = 4
TOL = 2e-5

CONFIGS = {
    "llama": ModelConfig(family="llama", vocab_size=97, hidden_size=48, intermediate_size=64,
                         num_layers=2, num_heads=6, num_kv_heads=2, head_dim=8,
                         max_position_embeddings=128),
    "gemma3": ModelConfig(family="gemma3", vocab_size=97, hidden_size=32, intermediate_size=48,
                          num_layers=3, num_heads=4, num_kv_heads=1, head_dim=16,
                          max_position_embeddings=128, layer_types=("sliding", "full", "sliding"),
                          sliding_window=5, qk_norm=True, norm_weight_offset=1.0,
                          sandwich_norms=True, hidden_act="gelu_tanh", embed_scale=32**0.5,
                          tie_word_embeddings=True, local_rope=RopeConfig(theta=10000.0),
                          rope=RopeConfig(theta=1e6), query_scale=0.2),
}

_forward = jax.jit(forward, static_argnums=1, static_argnames="all_logits")


def _params(name: str):
    return init_params(CONFIGS[name], seed=3, scale=0.3)


def _run(params, cfg, chunks, cache, all_logits=False):
    step = build_step_batch(chunks, page_size=PAGE, num_slots=cache.num_slots)
    logits, cache = _forward(params, cfg, Batch.from_step(step), cache, all_logits=all_logits)
    return np.asarray(logits), step, cache


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_steps_equal_full_forward(name):
    cfg, params = CONFIGS[name], _params(name)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 19).tolist()
    pages = [7, 2, 9, 0, 4, 11]
    full, _, _ = _run(params, cfg, [SequenceChunk(tokens, 0, pages)],
                      init_cache(cfg, 12, PAGE), all_logits=True)
    cache = init_cache(cfg, 12, PAGE)
    prompt = 6
    logits, _, cache = _run(params, cfg, [SequenceChunk(tokens[:prompt], 0, pages)], cache)
    np.testing.assert_allclose(logits[0], full[prompt - 1], atol=TOL, rtol=0)
    for i in range(prompt, len(tokens)):
        logits, _, cache = _run(params, cfg, [SequenceChunk([tokens[i]], i, pages)], cache)
        np.testing.assert_allclose(logits[0], full[i], atol=TOL, rtol=0,
                                   err_msg=f"decode position {i}")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ragged_batch_equals_each_alone(name):
    cfg, params = CONFIGS[name], _params(name)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (5, 13, 2)]
    page_lists = [[0, 1], [2, 3, 4, 5], [6]]
    alone = [
        _run(params, cfg, [SequenceChunk(p, 0, pg)], init_cache(cfg, 8, PAGE),
             all_logits=True)[0][:len(p)]
        for p, pg in zip(prompts, page_lists, strict=True)
    ]
    together, step, _ = _run(params, cfg, [SequenceChunk(p, 0, pg) for p, pg in
                                           zip(prompts, page_lists, strict=True)],
                             init_cache(cfg, 8, PAGE), all_logits=True)
    offsets = step.query_start
    for s, expected in enumerate(alone):
        got = together[offsets[s]:offsets[s + 1]]
        np.testing.assert_allclose(got, expected, atol=TOL, rtol=0, err_msg=f"sequence {s}")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mixed_decode_and_chunked_prefill(name):
    """One sequence decodes while another prefills in chunks: both equal running alone."""
    cfg, params = CONFIGS[name], _params(name)
    rng = np.random.default_rng(2)
    a = rng.integers(0, cfg.vocab_size, 9).tolist()
    b = rng.integers(0, cfg.vocab_size, 11).tolist()
    pa, pb = [3, 5, 1], [0, 2, 4, 6]
    ref_a, _, _ = _run(params, cfg, [SequenceChunk(a, 0, pa)], init_cache(cfg, 8, PAGE),
                       all_logits=True)
    ref_b, _, _ = _run(params, cfg, [SequenceChunk(b, 0, pb)], init_cache(cfg, 8, PAGE),
                       all_logits=True)
    cache = init_cache(cfg, 8, PAGE)
    _, _, cache = _run(params, cfg, [SequenceChunk(a[:6], 0, pa)], cache)
    # b's prompt in chunks of 4, 4, 3 while a decodes its tokens 6, 7, 8.
    for i, (lo, hi) in enumerate([(0, 4), (4, 8), (8, 11)]):
        logits, _, cache = _run(params, cfg, [SequenceChunk([a[6 + i]], 6 + i, pa),
                                              SequenceChunk(b[lo:hi], lo, pb)], cache)
        np.testing.assert_allclose(logits[0], ref_a[6 + i], atol=TOL, rtol=0)
        np.testing.assert_allclose(logits[1], ref_b[hi - 1], atol=TOL, rtol=0)


def test_padding_writes_nothing():
    cfg, params = CONFIGS["llama"], _params("llama")
    cache = init_cache(cfg, 8, PAGE)
    _, step, cache = _run(params, cfg, [SequenceChunk([1, 2, 3], 0, [5])], cache)
    assert len(step.tokens) == 4 and step.num_tokens == 3  # one padding token
    k = np.asarray(cache.k)
    written = np.zeros(k.shape[1:3], bool)
    written[5, :3] = True
    assert np.all(k[:, ~written] == 0), "a padding token or another page was written"
    assert np.all(np.abs(k[:, written]).sum(axis=(-1, -2)) > 0)


def test_forward_is_pure_and_shapes():
    cfg, params = CONFIGS["llama"], _params("llama")
    cache = init_cache(cfg, 8, PAGE)
    step = build_step_batch([SequenceChunk([1, 2, 3], 0, [0]), SequenceChunk([4], 0, [1])],
                            page_size=PAGE, num_slots=cache.num_slots)
    batch = Batch.from_step(step)
    logits1, cache1 = forward(params, cfg, batch, cache)
    logits2, cache2 = forward(params, cfg, batch, cache)
    chex.assert_shape(logits1, (2, cfg.vocab_size))
    chex.assert_type(logits1, np.float32)
    chex.assert_trees_all_equal(logits1, logits2)
    chex.assert_trees_all_equal(cache1, cache2)
    assert float(np.abs(np.asarray(cache.k)).sum()) == 0.0, "input cache was mutated"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="native kernels are CPU-only")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_native_mixed_step_with_history_matches_xla(name):
    """A stall-free step: two decodes beside a prefill chunk whose sequence already has 20
    cached tokens (longer than gemma3's window of 5), with attention_impl "cpu" (the native
    decode kernel beside the prefill section) against the XLA reference."""
    ref_cfg = CONFIGS[name]
    cpu_cfg = ref_cfg.replace(attention_impl="cpu")
    params = _params(name)
    rng = np.random.default_rng(8)
    p0, p1, p2 = (rng.integers(0, ref_cfg.vocab_size, n).tolist() for n in (12, 30, 6))
    pg0, pg1, pg2 = [0, 1, 2], [3, 4, 5, 6, 7, 8, 9, 10], [11, 12]
    steps = [
        [SequenceChunk(p0[:11], 0, pg0), SequenceChunk(p1[:20], 0, pg1),
         SequenceChunk(p2[:5], 0, pg2)],
        [SequenceChunk([p0[11]], 11, pg0), SequenceChunk([p2[5]], 5, pg2),
         SequenceChunk(p1[20:], 20, pg1)],
    ]
    caches = {c: init_cache(c, 16, PAGE) for c in (ref_cfg, cpu_cfg)}
    for i, chunks in enumerate(steps):
        results = {}
        for c in (ref_cfg, cpu_cfg):
            results[c], step, caches[c] = _run(params, c, chunks, caches[c])
        if i == 1:
            assert step.num_decode == 2 and step.max_query_len >= 10
        np.testing.assert_allclose(results[cpu_cfg], results[ref_cfg], atol=TOL, rtol=0,
                                   err_msg=f"step {i}")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="native kernels are CPU-only")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_native_cpu_kernels_match_xla(name):
    """attention_impl / matmul_impl "cpu" (native kernels) against the XLA reference."""
    from jaxinfer import cpu_kernels

    assert cpu_kernels.available(), "the native CPU kernels failed to build"
    ref_cfg = CONFIGS[name]
    cpu_cfg = ref_cfg.replace(attention_impl="cpu", matmul_impl="cpu")
    params = _params(name)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, ref_cfg.vocab_size, n).tolist() for n in (9, 3, 14)]
    pages = [[0, 1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]
    caches = {c: init_cache(c, 16, PAGE) for c in (ref_cfg, cpu_cfg)}
    chunks = [SequenceChunk(p[:-1], 0, pg) for p, pg in zip(prompts, pages, strict=True)]
    for step in range(2):
        results = {}
        for c in (ref_cfg, cpu_cfg):
            results[c], _, caches[c] = _run(params, c, chunks, caches[c])
        np.testing.assert_allclose(results[cpu_cfg], results[ref_cfg], atol=TOL, rtol=0,
                                   err_msg=f"step {step}")
        # then one decode token per sequence (the native decode attention and matmul path)
        chunks = [SequenceChunk([p[-1]], len(p) - 1, pg)
                  for p, pg in zip(prompts, pages, strict=True)]
