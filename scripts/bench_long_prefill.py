#!/usr/bin/env python3
"""Ring-attention prefill of a long prompt over 8 (fake) devices versus one device.

A Llama-shaped model with a 32k context and random weights. For each prompt length, one JSON
line per system with the compiled program's memory per device (XLA's memory analysis: temp,
arguments, outputs), the KV pool bytes each device holds after the prefill, the prompt's
share per device, and the wall time of the step (on fake CPU devices the time says little:
8 "devices" share this machine's cores; the memory is what the benchmark shows). The
single-device program is compiled at every length but only run up to --run-single-max
tokens (its T x T scores do not fit in this machine's memory beyond that).

    python scripts/bench_long_prefill.py                   # 32768 and 4096 tokens
    python scripts/bench_long_prefill.py --tokens 8192
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxinfer.batch import SequenceChunk, build_step_batch  # noqa: E402
from jaxinfer.cache import init_cache  # noqa: E402
from jaxinfer.config import ModelConfig, RopeConfig  # noqa: E402
from jaxinfer.model.params import init_params_on_device, param_bytes  # noqa: E402
from jaxinfer.model.transformer import Batch, forward  # noqa: E402
from jaxinfer.parallel import long_prefill as lp  # noqa: E402
from jaxinfer.parallel.sharding import make_mesh  # noqa: E402

CFG = ModelConfig(family="llama", vocab_size=4096, hidden_size=512, intermediate_size=1536,
                  num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64,
                  max_position_embeddings=32768, rope=RopeConfig(theta=500000.0),
                  rms_norm_eps=1e-5)
PAGE = 16
MiB = 1 << 20


def memory(compiled) -> dict[str, float]:
    m = compiled.memory_analysis()
    return dict(temp_mib=round(m.temp_size_in_bytes / MiB, 1),
                args_mib=round(m.argument_size_in_bytes / MiB, 1),
                out_mib=round(m.output_size_in_bytes / MiB, 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="32768,4096", help="comma list of prompt lengths")
    ap.add_argument("--run-single-max", type=int, default=4096,
                    help="run (not only compile) the single-device prefill up to this length")
    args = ap.parse_args(argv)
    n = 8
    mesh = make_mesh(1, 1, n)
    params = init_params_on_device(CFG, seed=0)
    kv_per_token = 2 * CFG.num_layers * CFG.num_kv_heads * CFG.head_dim * 4
    common = dict(model="llama-shaped-32k", devices=n, layers=CFG.num_layers,
                  hidden=CFG.hidden_size, heads=CFG.num_heads, kv_heads=CFG.num_kv_heads,
                  head_dim=CFG.head_dim, dtype="float32",
                  weights_mib=round(param_bytes(params) / MiB, 1))
    for T in [int(t) for t in args.tokens.split(",")]:
        prompt = np.random.default_rng(T).integers(0, CFG.vocab_size, T).tolist()
        num_pages = 2 * (-(-T // (2 * n * PAGE))) * n
        layout = lp.ring_pages(T, n, PAGE, num_pages)
        cache = init_cache(CFG, num_pages, PAGE)
        # Ring: compile (memory analysis), then run.
        t0 = time.perf_counter()
        logits, cache, _ = lp.ring_prefill(params, CFG, cache, prompt, mesh=mesh)
        jax.block_until_ready(logits)
        first = time.perf_counter() - t0
        cache = init_cache(CFG, num_pages, PAGE)
        t0 = time.perf_counter()
        logits, cache, _ = lp.ring_prefill(params, CFG, cache, prompt, mesh=mesh)
        jax.block_until_ready(logits)
        wall = time.perf_counter() - t0
        shard_bytes = [s.data.nbytes for s in cache.k.addressable_shards]
        share = T / n
        compiled = lp._ring_prefill_jit.lower(
            params, CFG, cache, *(jax.ShapeDtypeStruct((layout.padded,), jnp.int32,
                                                       sharding=jax.sharding.NamedSharding(
                                                           mesh, jax.sharding.PartitionSpec(
                                                               "sequence")))
                                  for _ in range(3)), T - 1, mesh=mesh, axis_name="sequence",
            cache_spec=lp.cache_sharding(mesh, cache.k.shape).spec).compile()
        print(json.dumps(dict(
            workload="long_prefill", system="ring-8", tokens=T, **common, **memory(compiled),
            kv_pool_mib_per_device=round(2 * max(shard_bytes) / MiB, 2),
            prompt_kv_share_mib=round(share * kv_per_token / MiB, 2),
            prompt_kv_total_mib=round(T * kv_per_token / MiB, 2),
            step_s=round(wall, 2), first_call_s=round(first, 2))), flush=True)
        del cache
        # One device: compile always, run when it fits.
        one_cache = init_cache(CFG, num_pages, PAGE)
        step = build_step_batch([SequenceChunk(prompt, 0, list(layout.pages))], page_size=PAGE,
                                num_slots=num_pages * PAGE)
        jitted = jax.jit(forward, static_argnums=1)
        compiled = jitted.lower(params, CFG, Batch.from_step(step), one_cache).compile()
        row = dict(workload="long_prefill", system="single-device", tokens=T, **common,
                   **memory(compiled), prompt_kv_total_mib=round(T * kv_per_token / MiB, 2))
        if args.run_single_max >= T:
            jax.block_until_ready(jitted(params, CFG, Batch.from_step(step), one_cache))
            one_cache = init_cache(CFG, num_pages, PAGE)
            t0 = time.perf_counter()
            out, _ = jitted(params, CFG, Batch.from_step(step), one_cache)
            jax.block_until_ready(out)
            row["step_s"] = round(time.perf_counter() - t0, 2)
            row["max_abs_logit_diff_vs_ring"] = float(jnp.max(jnp.abs(out[0] - logits)))
        else:
            row["step_s"] = None
            row["not_run"] = (f"needs {row['temp_mib'] / 1024:.1f} GiB of temporaries "
                              "(T x T scores); this machine has 24 GB")
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
