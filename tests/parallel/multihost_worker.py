"""One process of the multi-host test: join a `jax.distributed` cluster, generate on a mesh.

Run one copy per process (`python -m tests.parallel.multihost_worker --process-id I
--num-processes N --coordinator HOST:PORT --out FILE`); every copy runs the same program on
the same model and prompts, and writes what it saw and generated to its own JSON file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import jaxinfer
from jaxinfer.batch import SequenceChunk, build_step_batch
from jaxinfer.cache import init_cache
from jaxinfer.cache.paged import cache_shape
from jaxinfer.config import ModelConfig
from jaxinfer.model.params import init_params
from jaxinfer.model.transformer import Batch, forward
from jaxinfer.parallel.sharding import (
    ShardingRules,
    make_mesh,
    mesh_summary,
    shard_params,
)
from jaxinfer.sampling import SamplingParams
from tests.parallel.test_tensor_parallel import CONFIGS, PAGE, _prompts, _Tokenizer

LOCAL_DEVICES = 4
PARAMS_SEED = 3
MAX_TOKENS = 6
ENGINE_OPTIONS = dict(page_size=PAGE, kv_cache_tokens=256, max_num_batched_tokens=32)


def model() -> tuple[jaxinfer.Params, ModelConfig]:
    """The tiny random model every process (and the single-process reference) builds."""
    cfg = CONFIGS["llama"]
    return init_params(cfg, seed=PARAMS_SEED, scale=0.5), cfg


def generate(mesh: jax.sharding.Mesh | None) -> list[list[int]]:
    """Greedy tokens for the three seeded prompts, through `jaxinfer.LLM`."""
    params, cfg = model()
    llm = jaxinfer.LLM(params, cfg, _Tokenizer(), mesh=mesh, **ENGINE_OPTIONS)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.token_ids for o in llm.generate(_prompts(cfg), greedy)]


def sample_unseeded(mesh: jax.sharding.Mesh | None) -> list[list[int]]:
    """Sampled tokens (temperature 1, no seed): every process must draw the same ones."""
    params, cfg = model()
    llm = jaxinfer.LLM(params, cfg, _Tokenizer(), mesh=mesh, **ENGINE_OPTIONS)
    sampled = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.token_ids for o in llm.generate(_prompts(cfg), sampled)]


def prefill_logits(mesh: jax.sharding.Mesh | None) -> np.ndarray:
    """Logits [S, V] of one ragged prefill of the prompts through the raw `forward`."""
    params, cfg = model()
    num_pages, sharding, replicated = 8, None, None
    if mesh is not None:
        rules = ShardingRules()
        params, cfg = shard_params(params, cfg, mesh, rules)
        sharding = rules.cache_sharding(mesh, cache_shape(cfg, num_pages, PAGE))
        # Logits come out split over `tensor` (vocab); the host cannot read an array split
        # across processes, so replicate them on every device.
        replicated = NamedSharding(mesh, PartitionSpec())
    cache = init_cache(cfg, num_pages, PAGE, sharding=sharding)
    pages = [[0, 1], [2], [3, 4]]
    chunks = [SequenceChunk(p, 0, pg) for p, pg in zip(_prompts(cfg), pages, strict=True)]
    step = build_step_batch(chunks, page_size=PAGE, num_slots=cache.num_slots)
    run = jax.jit(lambda p, b, c: forward(p, cfg, b, c)[0], out_shardings=replicated)
    return np.asarray(run(params, Batch.from_step(step), cache))[:len(chunks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--coordinator", required=True, help="HOST:PORT of process 0")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mesh", default="2x4", help="DATAxTENSOR[,DATAxTENSOR...]")
    args = parser.parse_args()
    meshes = [tuple(int(n) for n in m.split("x")) for m in args.mesh.split(",")]

    # Before the CPU backend exists (it overrides the XLA_FLAGS device count this process
    # inherits from the test's conftest), and the test suite's strict promotion.
    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
    assert jax.local_device_count() == LOCAL_DEVICES, jax.local_devices()
    assert jax.device_count() == LOCAL_DEVICES * args.num_processes, jax.devices()
    result = dict(
        process_index=jax.process_index(), process_count=jax.process_count(),
        device_count=jax.device_count(), local_device_count=jax.local_device_count(),
        meshes={})
    for data, tensor in meshes:
        mesh = make_mesh(data, tensor)
        result["meshes"][f"{data}x{tensor}"] = dict(
            summary=mesh_summary(mesh), tokens=generate(mesh), sampled=sample_unseeded(mesh),
            logits=prefill_logits(mesh).tolist())
    args.out.write_text(json.dumps(result))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
