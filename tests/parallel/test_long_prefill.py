"""Long-prompt prefill with ring attention over the `sequence` axis (8 fake devices).

The ring prefill's logits and cache equal a single-device prefill; decode continues from
the page-sharded cache with the same tokens (sequence-parallel decode attention: no page
leaves its device); the compiled program moves keys/values only by
collective-permute (no all-gather) and each device's memory is a fraction of one device's.
"""

from __future__ import annotations

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfer.batch import SequenceChunk, build_step_batch
from jaxinfer.cache import init_cache
from jaxinfer.cache.paged import KVCache
from jaxinfer.config import ModelConfig
from jaxinfer.errors import CapacityError, InputError
from jaxinfer.model.params import abstract_params, init_params
from jaxinfer.model.transformer import Batch, forward
from jaxinfer.parallel import long_prefill as lp
from jaxinfer.parallel.sharding import make_mesh, shard_params

CFG = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16,
                  max_position_embeddings=512)
PAGE, NP = 16, 32
_forward = jax.jit(forward, static_argnums=1)


def test_ring_pages_put_each_page_on_its_tokens_device() -> None:
    layout = lp.ring_pages(200, 8, PAGE, NP)
    assert layout.padded == 256 and layout.chunk == 16
    per_device = NP // 8
    for i, page in enumerate(layout.pages):
        chunk = i * PAGE // layout.chunk
        device = chunk if chunk < 8 else 15 - chunk
        assert page // per_device == device
    assert len(set(layout.pages)) == len(layout.pages)
    with pytest.raises(CapacityError, match="pages per device"):
        lp.ring_pages(2000, 8, PAGE, NP)
    with pytest.raises(InputError, match="multiple of the 8-device"):
        lp.ring_pages(200, 8, PAGE, 30)


@pytest.mark.parametrize("data,tensor,sequence", [(1, 1, 8), (1, 2, 4)])
def test_ring_prefill_then_decode_equal_one_device(data: int, tensor: int,
                                                   sequence: int) -> None:
    params = init_params(CFG, seed=1, scale=0.3)
    prompt = np.random.default_rng(0).integers(0, CFG.vocab_size, 203).tolist()
    mesh = make_mesh(data, tensor, sequence)
    sharded, cfg = shard_params(params, CFG, mesh)
    logits, cache, layout = lp.ring_prefill(sharded, cfg, init_cache(cfg, NP, PAGE), prompt,
                                            mesh=mesh)
    assert cache.k.sharding.spec[1] == "sequence"

    pages = list(layout.pages)
    ref_cache = init_cache(CFG, NP, PAGE)
    step = build_step_batch([SequenceChunk(prompt, 0, pages)], page_size=PAGE,
                            num_slots=NP * PAGE)
    ref, ref_cache = _forward(params, CFG, Batch.from_step(step), ref_cache)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref[0]), atol=5e-5, rtol=0)
    if cfg.num_kv_heads == CFG.num_kv_heads:  # same cache layout: compare it whole
        chex.assert_trees_all_close(jax.device_get(cache), jax.device_get(ref_cache),
                                    atol=5e-5, rtol=0)

    # Decode continues from the page-sharded cache: each device attends over its own pages.
    hooks = lp.sequence_parallel_decode_hooks(mesh, cache.k.sharding.spec)
    decode = jax.jit(lambda p, b, c: forward(p, cfg, b, c, hooks=hooks))
    tokens, ref_tokens = [int(jnp.argmax(logits))], [int(jnp.argmax(ref[0]))]
    for i in range(3):
        def step_of(tok: int, i: int = i) -> Batch:
            return Batch.from_step(build_step_batch(
                [SequenceChunk([tok], len(prompt) + i, pages)], page_size=PAGE,
                num_slots=NP * PAGE))
        out, cache = decode(sharded, step_of(tokens[-1]), cache)
        ref, ref_cache = _forward(params, CFG, step_of(ref_tokens[-1]), ref_cache)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=5e-5, rtol=0)
        tokens.append(int(jnp.argmax(out[0])))
        ref_tokens.append(int(jnp.argmax(ref[0])))
    assert tokens == ref_tokens
    assert cache.k.sharding.spec[1] == "sequence"
    text = decode.lower(sharded, step_of(tokens[-1]), cache).compile().as_text()
    assert "all-gather" not in text  # no device fetches another's pages


def _compiled_ring_prefill(cfg: ModelConfig, T: int, mesh):
    n = mesh.shape["sequence"]
    num_pages = 2 * T // PAGE + 2 * n
    layout = lp.ring_pages(T, n, PAGE, num_pages)
    shape = (cfg.num_layers, num_pages, PAGE, cfg.num_kv_heads, cfg.head_dim)
    spec = lp.cache_sharding(mesh, shape).spec
    sd = jax.ShapeDtypeStruct
    cs, ts, rep = (NamedSharding(mesh, s) for s in (spec, P("sequence"), P()))
    params = jax.tree.map(lambda a: sd(a.shape, a.dtype, sharding=rep), abstract_params(cfg))
    tokens = sd((layout.padded,), jnp.int32, sharding=ts)
    return lp._ring_prefill_jit.trace(
        params, cfg, KVCache(sd(shape, jnp.float32, sharding=cs), sd(shape, jnp.float32,
                                                                      sharding=cs)),
        tokens, tokens, tokens, T - 1, mesh=mesh, axis_name="sequence",
        cache_spec=spec).lower().compile()


def test_hlo_has_collective_permutes_and_no_all_gather() -> None:
    text = _compiled_ring_prefill(CFG, 512, make_mesh(1, 1, 8)).as_text()
    assert "collective-permute" in text
    assert "all-gather" not in text
    # The only all-reduce is the last token's hidden row (the logits), not the sequence.
    for shape in re.findall(r"= (\S+) all-reduce\(", text):
        assert shape == f"f32[{CFG.hidden_size}]{{0}}", shape


def test_memory_per_device_is_a_share() -> None:
    """4k tokens on 8 devices: temp memory per device is far below one device's."""
    cfg = CFG.replace(max_position_embeddings=4096, hidden_size=128, intermediate_size=256)
    T = 4096
    ring = _compiled_ring_prefill(cfg, T, make_mesh(1, 1, 8)).memory_analysis()
    one = jax.jit(forward, static_argnums=1).trace(
        abstract_params(cfg), cfg,
        Batch.from_step(build_step_batch([SequenceChunk([1] * T, 0, list(range(T // PAGE)))],
                                         page_size=PAGE, num_slots=T)),
        KVCache(*(jax.ShapeDtypeStruct((cfg.num_layers, T // PAGE, PAGE, cfg.num_kv_heads,
                                        cfg.head_dim), jnp.float32),) * 2)).lower().compile()
    single = one.memory_analysis()
    # One device materializes T x T scores per head; each ring device holds its tokens'
    # activations and two K/V blocks.
    assert single.temp_size_in_bytes > T * T * cfg.num_heads * 4
    assert ring.temp_size_in_bytes < single.temp_size_in_bytes / 16, (
        ring.temp_size_in_bytes, single.temp_size_in_bytes)
    # Arguments per device: replicated weights plus 1/8 of the KV pool.
    pool = 2 * cfg.num_layers * (2 * T // PAGE + 16) * PAGE * cfg.num_kv_heads * cfg.head_dim * 4
    weights = sum(int(np.prod(a.shape)) * 4 for a in jax.tree.leaves(abstract_params(cfg)))
    assert ring.argument_size_in_bytes < weights + pool / 8 + 3 * T * 4


def test_adaptive_plan_executes_and_equals_one_device() -> None:
    """A long prompt split over a ring of devices, short ones whole: same logits."""
    from jaxinfer.parallel.adaptive import SPCostModel, plan_adaptive

    params = init_params(CFG, seed=4, scale=0.3)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (300, 12, 12, 12)]
    cost = SPCostModel.from_model_dims(64, 128, 2, 8, 2, 16, device_flops=1e12,
                                       link_bytes_per_s=1e9, device_memory_bytes=1e12,
                                       ring_step_latency_s=1e-4)
    # Memory for ~200 tokens per device: the 300-token prompt must be split.
    cost = dataclasses.replace(cost, device_memory_bytes=200 * cost.memory_bytes(1))
    plan = plan_adaptive([len(p) for p in prompts], 8, cost)
    assert plan.split_indices() == (0,)
    outs = lp.prefill_by_plan(params, CFG, prompts, plan, page_size=PAGE)
    for prompt, out in zip(prompts, outs, strict=True):
        step = build_step_batch([SequenceChunk(prompt, 0, list(range(-(-len(prompt) // PAGE))))],
                                page_size=PAGE, num_slots=NP * PAGE)
        ref, _ = _forward(params, CFG, Batch.from_step(step), init_cache(CFG, NP, PAGE))
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref[0]), atol=5e-5, rtol=0)
