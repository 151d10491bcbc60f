"""Tensor (and data) parallelism through sharding annotations on 8 fake CPU devices.

Logits on meshes 1x8, 2x4 and 4x2 (data x tensor) equal one device's within f32 tolerance,
for a ragged prefill and the decode step after it, for models with fewer, as many and more
KV heads than the tensor degree; the serving engine generates the same greedy tokens.
"""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest

import jaxinfer
from jaxinfer.batch import SequenceChunk, build_step_batch
from jaxinfer.cache import init_cache
from jaxinfer.cache.paged import cache_shape
from jaxinfer.config import ModelConfig
from jaxinfer.errors import ConfigError
from jaxinfer.model.params import init_params
from jaxinfer.model.transformer import Batch, forward
from jaxinfer.parallel.sharding import (
    ShardingRules,
    make_mesh,
    replicate_kv_heads,
    shard_params,
)
from jaxinfer.sampling import SamplingParams
from tests.models import CharTokenizer as _Tokenizer

TOL = 5e-5
MESHES = [(1, 8), (2, 4), (4, 2)]
CONFIGS = {
    # 2 KV heads: fewer than the tensor degree on 1x8 and 2x4 (replicated), equal on 4x2.
    "llama": ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16,
                         max_position_embeddings=256),
    # 4 KV heads with biases and q/k norms: more KV heads than the degree on 4x2.
    "qwen3": ModelConfig(family="qwen3", vocab_size=128, hidden_size=64, intermediate_size=96,
                         num_layers=2, num_heads=8, num_kv_heads=4, head_dim=16,
                         max_position_embeddings=256, qkv_bias=True, qk_norm=True),
}
PAGE = 16
_forward = jax.jit(forward, static_argnums=1)


def _prompts(cfg: ModelConfig) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, cfg.vocab_size, n).tolist() for n in (13, 5, 30)]


def _two_steps(params, cfg: ModelConfig, cache) -> list[np.ndarray]:
    """A ragged prefill of three prompts, then one decode token each."""
    prompts, pages = _prompts(cfg), [[0, 1], [2], [3, 4]]
    chunks = [SequenceChunk(p[:-1], 0, pg) for p, pg in zip(prompts, pages, strict=True)]
    out = []
    for _ in range(2):
        step = build_step_batch(chunks, page_size=PAGE, num_slots=cache.num_slots)
        logits, cache = _forward(params, cfg, Batch.from_step(step), cache)
        out.append(np.asarray(logits))
        chunks = [SequenceChunk([p[-1]], len(p) - 1, pg)
                  for p, pg in zip(prompts, pages, strict=True)]
    return out


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    cfg = CONFIGS[request.param]
    params = init_params(cfg, seed=1, scale=0.3)
    return params, cfg, _two_steps(params, cfg, init_cache(cfg, 8, PAGE))


@pytest.mark.parametrize("data,tensor", MESHES)
def test_logits_equal_one_device(model, data: int, tensor: int) -> None:
    params, cfg, reference = model
    mesh, rules = make_mesh(data, tensor), ShardingRules()
    sharded, tp_cfg = shard_params(params, cfg, mesh, rules)
    assert tp_cfg.num_kv_heads == max(cfg.num_kv_heads, tensor)
    cache = init_cache(tp_cfg, 8, PAGE,
                       sharding=rules.cache_sharding(mesh, cache_shape(tp_cfg, 8, PAGE)))
    for step, (got, want) in enumerate(zip(_two_steps(sharded, tp_cfg, cache), reference,
                                           strict=True)):
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0, err_msg=f"step {step}")


def test_weights_and_cache_are_split(model) -> None:
    params, cfg, _ = model
    mesh, rules = make_mesh(2, 4), ShardingRules()
    sharded, tp_cfg = shard_params(params, cfg, mesh, rules)
    L, D = cfg.num_layers, cfg.hidden_size
    wqkv = sharded.layers.wqkv
    assert wqkv.sharding.spec[1] == "tensor"
    # Each device holds a quarter of the fused QKV rows and of the MLP.
    chex.assert_shape([s.data for s in wqkv.addressable_shards], (L, wqkv.shape[1] // 4, D))
    gate_up = sharded.layers.w_gate_up
    chex.assert_shape([s.data for s in gate_up.addressable_shards],
                      (L, 2 * cfg.intermediate_size // 4, D))
    cache = init_cache(tp_cfg, 8, PAGE,
                       sharding=rules.cache_sharding(mesh, cache_shape(tp_cfg, 8, PAGE)))
    chex.assert_shape([s.data for s in cache.k.addressable_shards],
                      (L, 8, PAGE, tp_cfg.num_kv_heads // 4, cfg.head_dim))


def test_replicated_kv_heads_are_the_same_model() -> None:
    cfg = CONFIGS["llama"]
    params = init_params(cfg, seed=2, scale=0.3)
    rep_params, rep_cfg = replicate_kv_heads(params, cfg, 8)
    assert rep_cfg.num_kv_heads == 8 and rep_cfg.num_heads == 8
    want = _two_steps(params, cfg, init_cache(cfg, 8, PAGE))
    got = _two_steps(rep_params, rep_cfg, init_cache(rep_cfg, 8, PAGE))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_bad_degrees_are_named() -> None:
    cfg = CONFIGS["qwen3"]
    params = init_params(cfg, seed=2, scale=0.3)
    with pytest.raises(ConfigError, match=r"tensor parallel degree 3 .* use one of \[1, 2, 4"):
        replicate_kv_heads(params, cfg, 3)
    with pytest.raises(ConfigError, match="needs 6 devices, 8 are available"):
        make_mesh(2, 3)
    with pytest.raises(ConfigError, match="unknown logical axes"):
        ShardingRules().replace(hidden="tensor")


def test_engine_generates_the_same_tokens_on_a_mesh() -> None:
    cfg = CONFIGS["llama"]
    params = init_params(cfg, seed=3, scale=0.5)
    prompts = _prompts(cfg)
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    options = dict(page_size=PAGE, kv_cache_tokens=256, max_num_batched_tokens=32)
    single = jaxinfer.LLM(params, cfg, _Tokenizer(), **options).generate(prompts, greedy)
    mesh = make_mesh(2, 4)
    llm = jaxinfer.LLM(params, cfg, _Tokenizer(), mesh=mesh, **options)
    sharded = llm.generate(prompts, greedy)
    assert [o.token_ids for o in sharded] == [o.token_ids for o in single]
    assert llm.core.runner.cache.k.sharding.spec[3] == "tensor"
