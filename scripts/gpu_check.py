#!/usr/bin/env python3
"""Measure the Pallas kernels and the model on a lent GPU (run by scripts/gpu_check.sh).

Parts (one JSON object per result line, to stdout and to --out):
  peaks            measured device copy bandwidth and bf16 matmul TFLOP/s (the ceilings)
  decode_attention ragged paged decode attention, Llama-3-8B heads (32 q, 8 kv, dim 128,
                   bf16, pages of 16), context 1k/4k/16k x batch 1/8/64: Pallas vs XLA,
                   bandwidth utilisation against the measured copy bandwidth
  prefill_attention causal attention of one 4k / 16k prompt: Pallas flash vs XLA (and
                   cuDNN through jax.nn.dot_product_attention), TFLOP/s and % of peak
  e2e_decode       decode tokens/s of a Llama-3-8B-shaped model, random bf16 weights,
                   context 1024, batch 1/16/64: jaxinfer XLA path, Pallas path, and
                   Hugging Face transformers (torch) on the same card; the batch-1 figure
                   against the weights-plus-KV bytes roofline
  quant_matmul     W4A16 / W8A16 Pallas matmul (group 128) vs a bf16 dense matmul at
                   Llama-3-8B projection shapes (4096x4096, 14336x4096), batch 1/4/16/64:
                   time, GB/s, speedup_vs_bf16; max abs error vs the reference at one shape
  quant_sweep      W4A16 launch settings (block_n, block_k, split, warps, stages) at batch
                   1 and 16 on the same shapes, each against bf16: the data for tuning.py
  quant_probe      where the W4A16 time goes: explicit K splits (more programs in flight),
                   the "halves" nibble layout (no interleaving shuffle), int8 weights, and
                   XLA's own int4 path (jnp.int4 weights, dequantize-then-dot left to XLA's
                   fusion), each against bf16 on the same shapes

Parts run in the order --parts lists them (peaks always first).

`--smoke` shrinks every shape so the whole script runs on CPU in interpret mode (CI runs it
that way to keep the script working); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the card
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

PARTS = ("peaks", "decode_attention", "prefill_attention", "e2e_decode", "quant_matmul",
         "quant_sweep", "quant_probe")


class Recorder:
    """Prints each result as a JSON line and appends it to the output file."""

    def __init__(self, path: Path | None, device: str, smoke: bool) -> None:
        self.path, self.device, self.smoke = path, device, smoke
        self.rows: list[dict[str, Any]] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, **row: Any) -> dict[str, Any]:
        row = {"device": self.device, "smoke": self.smoke, **row}
        self.rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        return row


def median_time(fn: Callable[[], Any], *, warmup: int = 2, iters: int = 10) -> float:
    """Median wall seconds of fn() (its result blocked on)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def guarded(rec: Recorder, what: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> None:
    """Run one measurement; an error (out of memory, a lowering failure) becomes a row."""
    try:
        rec(**what, **fn())
    except Exception as e:  # noqa: BLE001 - every failure is reported, the script goes on
        rec(**what, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    gc.collect()


# ------------------------------------------------------------------ peaks

def measure_peaks(rec: Recorder, smoke: bool) -> dict[str, float]:
    n = (1 << 20) if smoke else (1 << 30)  # bf16 elements: 2 GiB on the GPU
    x = jnp.ones((n,), jnp.bfloat16)
    add = jax.jit(lambda x: x + jnp.bfloat16(1))
    t = median_time(functools.partial(add, x), iters=20)
    copy_gbs = 2 * n * 2 / t / 1e9
    m = 256 if smoke else 8192
    a = jnp.ones((m, m), jnp.bfloat16)
    mm = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32).astype(a.dtype))
    t = median_time(functools.partial(mm, a), iters=10)
    tflops = 2 * m**3 / t / 1e12
    rec(part="peaks", copy_gbs=round(copy_gbs, 1), bf16_matmul_tflops=round(tflops, 1))
    return {"copy_gbs": copy_gbs, "bf16_tflops": tflops}


# ------------------------------------------------------------------ attention kernels

def decode_attention(rec: Recorder, peaks: dict[str, float], smoke: bool, interpret: bool) -> None:
    from pallas_kernels.ragged_paged_attention import (
        ragged_paged_attention_gpu,
        ragged_paged_attention_reference,
    )

    H, K, E, C = (4, 2, 16, 16) if smoke else (32, 8, 128, 16)
    contexts = (48,) if smoke else (1024, 4096, 16384)
    batches = (2,) if smoke else (1, 8, 64)
    dtype = jnp.bfloat16
    for ctx in contexts:
        for B in batches:
            pages = -(-ctx // C)
            NP = B * pages + 1
            layer_bytes = 2 * NP * C * K * E * 2
            # Several layers per timed program (the model's stacked cache, the layer picked
            # in the kernel), so the host's dispatch of one call (~0.1 ms) is amortised, with
            # >= 200 MB of cache in all so that repeated calls cannot be served from the L2.
            L = 1 if smoke else min(64, max(1, -(-(200 << 20) // layer_bytes),
                                            min(8, (6 << 30) // layer_bytes)))
            key = jax.random.key(ctx * 131 + B)
            k1, k2, k3 = jax.random.split(key, 3)
            q = jax.random.normal(k1, (B, H, E), dtype)
            kc = jax.random.normal(k2, (L, NP, C, K, E), dtype)
            vc = jax.random.normal(k3, (L, NP, C, K, E), dtype)
            table = jnp.asarray(np.random.default_rng(B).permutation(NP)[:B * pages]
                                .reshape(B, pages), jnp.int32)
            kv_lens = jnp.full((B,), ctx, jnp.int32)
            qs = jnp.arange(B + 1, dtype=jnp.int32)
            scale = E ** -0.5
            bytes_moved = B * ctx * K * E * 2 * 2 + 2 * q.size * 2
            args = (q, kc, vc, kv_lens, table, qs)

            def layers(f: Callable[..., jax.Array], stacked: bool, q, kc, vc, *rest,
                       L=L) -> list[jax.Array]:
                if stacked:
                    return [f(q, kc, vc, *rest, layer=jnp.int32(i)) for i in range(L)]
                return [f(q, kc[i], vc[i], *rest) for i in range(L)]

            systems = {
                "pallas": jax.jit(functools.partial(layers, functools.partial(
                    ragged_paged_attention_gpu, max_query_len=1, sm_scale=scale,
                    interpret=interpret), True)),
                # one program per (sequence, KV head): the kernel before the key-range split
                "pallas-nosplit": jax.jit(functools.partial(layers, functools.partial(
                    ragged_paged_attention_gpu, max_query_len=1, sm_scale=scale,
                    kv_splits=1, interpret=interpret), True)),
                "xla": jax.jit(functools.partial(layers, functools.partial(
                    ragged_paged_attention_reference, max_query_len=1, sm_scale=scale), False)),
            }
            outs: dict[str, jax.Array] = {}
            for name, f in systems.items():
                guarded(rec, dict(part="decode_attention", system=name, context=ctx, batch=B,
                                  heads=H, kv_heads=K, head_dim=E, page_size=C, layers=L,
                                  bytes=bytes_moved),
                        functools.partial(_time_decode, f, args, outs, name, bytes_moved,
                                          peaks["copy_gbs"], 3 if interpret else 20, L))
            del kc, vc
            if "pallas" in outs and "xla" in outs:
                err = float(jnp.max(jnp.abs(outs["pallas"].astype(jnp.float32)
                                            - outs["xla"].astype(jnp.float32))))
                rec(part="decode_attention_check", context=ctx, batch=B, max_abs_err=err)


def _time_decode(f: Callable[..., list[jax.Array]], args: tuple, outs: dict[str, jax.Array],
                 name: str, bytes_moved: int, copy_gbs: float, iters: int,
                 layers: int) -> dict[str, Any]:
    """Per-layer time of f (which runs `layers` layers); keeps the last layer's output."""
    outs[name] = f(*args)[-1]
    t = median_time(functools.partial(f, *args), iters=iters) / layers
    gbs = bytes_moved / t / 1e9
    return dict(time_us=round(t * 1e6, 1), gbs=round(gbs, 1), bw_util=round(gbs / copy_gbs, 3))


def prefill_attention(rec: Recorder, peaks: dict[str, float], smoke: bool,
                      interpret: bool) -> None:
    from pallas_kernels.flash_attention import flash_attention_gpu
    from pallas_kernels.ragged_paged_attention import causal_prefill_attention_reference

    H, K, E = (4, 2, 16) if smoke else (32, 8, 128)
    lengths = (64,) if smoke else (4096, 16384)
    dtype = jnp.bfloat16
    for T in lengths:
        k1, k2, k3 = jax.random.split(jax.random.key(T), 3)
        q = jax.random.normal(k1, (T, H, E), dtype)
        k = jax.random.normal(k2, (T, K, E), dtype)
        v = jax.random.normal(k3, (T, K, E), dtype)
        pos = jnp.arange(T, dtype=jnp.int32)
        starts = jnp.asarray([0, T], jnp.int32)
        scale = E ** -0.5
        flops = 2.0 * T * T * H * E  # causal: half of 4 T^2 H E
        systems: dict[str, Callable[..., jax.Array]] = {
            "pallas": jax.jit(functools.partial(flash_attention_gpu, sm_scale=scale,
                                                causal=True, interpret=interpret)),
        }
        if T <= 4096:  # the reference materialises T x T x H scores (32 GB at 16k)
            systems["xla"] = jax.jit(lambda q, k, v, pos=pos, starts=starts, scale=scale:
                                     causal_prefill_attention_reference(q, k, v, pos, starts,
                                                                        sm_scale=scale))
        if not interpret:
            systems["cudnn"] = jax.jit(functools.partial(_cudnn_attention, groups=H // K,
                                                         scale=scale))
        for name, f in systems.items():
            guarded(rec, dict(part="prefill_attention", system=name, tokens=T, heads=H,
                              kv_heads=K, head_dim=E, flops=flops),
                    functools.partial(_time_prefill, f, (q, k, v), flops, peaks["bf16_tflops"],
                                      2 if interpret else 10))


def _cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, groups: int,
                     scale: float) -> jax.Array:
    """cuDNN's fused attention through jax.nn.dot_product_attention (a peer)."""
    k, v = jnp.repeat(k, groups, axis=1), jnp.repeat(v, groups, axis=1)
    return jax.nn.dot_product_attention(q[None], k[None], v[None], scale=scale, is_causal=True,
                                        implementation="cudnn")[0]


def _time_prefill(f: Callable[..., jax.Array], args: tuple, flops: float, peak: float,
                  iters: int) -> dict[str, Any]:
    t = median_time(functools.partial(f, *args), warmup=1, iters=iters)
    tf = flops / t / 1e12
    return dict(time_ms=round(t * 1e3, 3), tflops=round(tf, 1), peak_frac=round(tf / peak, 3))


# ------------------------------------------------------------------ end to end

def llama_8b_config(smoke: bool):
    from jaxinfer.config import ModelConfig, RopeConfig
    from jaxinfer.roofline import MODEL_SHAPES

    if smoke:
        return ModelConfig(family="llama", vocab_size=256, hidden_size=64,
                           intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                           head_dim=16, max_position_embeddings=512, dtype="bfloat16",
                           rope=RopeConfig(theta=500000.0))
    return MODEL_SHAPES["llama-3-8b"].replace(dtype="bfloat16", rope=RopeConfig(theta=500000.0),
                                              rms_norm_eps=1e-5)


def e2e_decode(rec: Recorder, peaks: dict[str, float], smoke: bool, with_hf: bool) -> None:
    from jaxinfer.batch import SequenceChunk, build_step_batch
    from jaxinfer.model.params import init_params_on_device, param_bytes
    from jaxinfer.model.transformer import Batch, forward

    cfg = llama_8b_config(smoke)
    ctx = 32 if smoke else 1024
    batches = (1,) if smoke else (1, 16, 64)
    C = 16
    params = init_params_on_device(cfg, seed=0)
    # Bytes a decode step must read: every weight but the embedding table (a gather).
    weight_bytes = param_bytes(params) - (0 if cfg.tie_word_embeddings
                                          else cfg.vocab_size * cfg.hidden_size * 2)
    kv_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
    step_fn = jax.jit(forward, static_argnums=1, donate_argnums=3)
    for B in batches:
        pages = -(-(ctx + 64) // C)
        chunks = [SequenceChunk([1], ctx, list(range(b * pages, (b + 1) * pages)))
                  for b in range(B)]
        step = build_step_batch(chunks, page_size=C, num_slots=B * pages * C)
        batch = Batch.from_step(step)
        roof_s = (weight_bytes + B * (ctx + 1) * kv_per_token) / (peaks["copy_gbs"] * 1e9)
        for impl in ("xla", "pallas_gpu"):
            guarded(rec, dict(part="e2e_decode", system=f"jaxinfer-{impl}", batch=B,
                              context=ctx, model="llama-3-8b-shape" if not smoke else "tiny",
                              dtype="bfloat16"),
                    functools.partial(_time_e2e, step_fn, params, cfg.replace(attention_impl=impl),
                                      batch, B * pages, C, B, roof_s, 3 if smoke else 15))
    params = None  # free the weights before torch loads its copy
    gc.collect()
    if with_hf:
        guarded_hf(rec, cfg, ctx, batches, peaks, smoke)


def _time_e2e(step_fn: Callable[..., Any], params: Any, cfg: Any, batch: Any, num_pages: int,
              page_size: int, B: int, roof_s: float, iters: int) -> dict[str, Any]:
    from jaxinfer.cache import init_cache

    state = {"cache": init_cache(cfg, num_pages, page_size)}

    def run() -> jax.Array:
        logits, state["cache"] = step_fn(params, cfg, batch, state["cache"])
        return logits

    t = median_time(run, warmup=2, iters=iters)
    return dict(step_ms=round(t * 1e3, 3), tok_s=round(B / t, 1),
                roofline_step_ms=round(roof_s * 1e3, 3), roofline_ratio=round(t / roof_s, 3))


def guarded_hf(rec: Recorder, cfg, ctx: int, batches: tuple[int, ...],
               peaks: dict[str, float], smoke: bool) -> None:
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        rec(part="e2e_decode", system="hf-transformers", error=f"not installed: {e}")
        return
    dev = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                         max_position_embeddings=cfg.max_position_embeddings,
                         rope_theta=cfg.rope.theta, tie_word_embeddings=False)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 directly: no 32 GB float32 copy
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(default)
    new = 4 if smoke else 33
    for B in batches:
        guarded(rec, dict(part="e2e_decode", system="hf-transformers", batch=B, context=ctx,
                          model="llama-3-8b-shape" if not smoke else "tiny",
                          dtype=str(dtype).removeprefix("torch.")),
                functools.partial(_time_hf, torch, model, dev, B, ctx, cfg.vocab_size, new))


def _time_hf(torch: Any, model: Any, dev: str, B: int, ctx: int, vocab: int,
             new: int) -> dict[str, Any]:
    """Decode step time of transformers' generate: (time for `new` tokens - time for 1)."""
    ids = torch.randint(100, vocab - 1, (B, ctx), device=dev)

    def gen(n: int) -> float:
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    gen(2)  # warm up
    t_prefill = min(gen(1) for _ in range(2))
    t_total = min(gen(new) for _ in range(2))
    step = (t_total - t_prefill) / (new - 1)
    return dict(step_ms=round(step * 1e3, 3), tok_s=round(B / step, 1))


# ------------------------------------------------------------------ quantized matmul

def quant_matmul(rec: Recorder, peaks: dict[str, float], smoke: bool, interpret: bool) -> None:
    """Weight-only int4/int8 matmul against bf16 `x @ W.T`, one call per layer of a stack.

    Each timed program runs the matmul over `layers` distinct weights (their total well past
    the 50 MB L2), so neither launch overhead nor a cached weight flatters small shapes. The
    first shape's batch-16 outputs are checked against the reference.
    """
    from pallas_kernels.quant_matmul import quant_matmul_gpu, quant_matmul_reference

    shapes = ((64, 256),) if smoke else ((4096, 4096), (14336, 4096))  # (N, K)
    batches = (1,) if smoke else (1, 4, 16, 64)
    check_batch = batches[-1] if smoke else 16
    g = 32 if smoke else 128
    for N, K in shapes:
        layers = 1 if smoke else max(4, min(32, -(-400_000_000 // (N * K // 2))))
        keys = iter(jax.random.split(jax.random.key(N + K), 3 * layers + 8))
        dense = [jax.random.normal(next(keys), (N, K), jnp.bfloat16) * 0.02
                 for _ in range(layers)]
        quantized = {bits: _random_quantized(keys, layers, N, K, bits, g) for bits in (4, 8)}
        bf16 = jax.jit(lambda x, ws: [x @ w.T for w in ws])
        for T in batches:
            x = jax.random.normal(next(keys), (T, K), jnp.bfloat16)
            io_bytes = T * K * 2 + T * N * 2
            dense_bytes = N * K * 2 + io_bytes
            times: dict[str, float] = {}
            guarded(rec, dict(part="quant_matmul", system="bf16", N=N, K=K, batch=T,
                              layers=layers, bytes=dense_bytes),
                    functools.partial(_time_quant, bf16, (x, dense), layers, dense_bytes,
                                      peaks["copy_gbs"], times, "bf16", smoke))
            for bits, weights in quantized.items():
                run = jax.jit(functools.partial(_quant_layers, quant_matmul_gpu, bits=bits,
                                                group_size=g, interpret=interpret))
                nbytes = N * K * bits // 8 + N * (K // g) * 2 + io_bytes
                guarded(rec, dict(part="quant_matmul", system=f"w{bits}a16", N=N, K=K,
                                  batch=T, group_size=g, layers=layers, bytes=nbytes),
                        functools.partial(_time_quant, run, (x, weights), layers, nbytes,
                                          peaks["copy_gbs"], times, f"w{bits}", smoke))
                if shapes[0] == (N, K) and check_batch == T:
                    guarded(rec, dict(part="quant_matmul_check", N=N, K=K, batch=T, bits=bits,
                                      group_size=g),
                            functools.partial(_quant_error, run, quant_matmul_reference, x,
                                              weights, bits, g))
        del dense, quantized  # free the weights before the next shape
        gc.collect()


# (block_n, block_k, split_k or None for the tuning rule, num_warps, num_stages)
SWEEP_CONFIGS = ((32, 256, None, 4, 4), (64, 256, None, 4, 4), (16, 256, None, 4, 4),
                 (32, 512, None, 4, 3), (64, 128, None, 4, 4), (32, 256, 1, 4, 4),
                 (128, 256, None, 4, 3), (32, 256, None, 2, 4), (32, 1024, None, 4, 2),
                 (64, 512, None, 8, 3))


def quant_sweep(rec: Recorder, peaks: dict[str, float], smoke: bool, interpret: bool) -> None:
    """W4A16 launch settings at decode batches, each timed against bf16 on the same weights."""
    from pallas_kernels.quant_matmul import quant_matmul_gpu

    shapes = ((64, 256),) if smoke else ((4096, 4096), (14336, 4096))
    batches = (1,) if smoke else (1, 16)
    configs = ((16, 64, None, 4, 2),) if smoke else SWEEP_CONFIGS
    g = 32 if smoke else 128
    for N, K in shapes:
        layers = 1 if smoke else max(4, min(32, -(-400_000_000 // (N * K // 2))))
        keys = iter(jax.random.split(jax.random.key(N * 7 + K), 2 * layers + 8))
        dense = [jax.random.normal(next(keys), (N, K), jnp.bfloat16) * 0.02
                 for _ in range(layers)]
        weights = _random_quantized(keys, layers, N, K, 4, g)
        bf16 = jax.jit(lambda x, ws: [x @ w.T for w in ws])
        for T in batches:
            x = jax.random.normal(next(keys), (T, K), jnp.bfloat16)
            io_bytes = T * K * 2 + T * N * 2
            times: dict[str, float] = {}
            guarded(rec, dict(part="quant_sweep", system="bf16", N=N, K=K, batch=T,
                              layers=layers),
                    functools.partial(_time_quant, bf16, (x, dense), layers,
                                      N * K * 2 + io_bytes, peaks["copy_gbs"], times, "bf16",
                                      smoke))
            nbytes = N * K // 2 + N * (K // g) * 2 + io_bytes
            for bn, bk, sk, warps, stages in configs:
                if N % bn or K % bk:
                    continue
                run = jax.jit(functools.partial(
                    _quant_layers, quant_matmul_gpu, bits=4, group_size=g,
                    interpret=interpret, block_n=bn, block_k=bk, split_k=sk,
                    num_warps=warps, num_stages=stages))
                guarded(rec, dict(part="quant_sweep", system="w4a16", N=N, K=K, batch=T,
                                  group_size=g, layers=layers, block_n=bn, block_k=bk,
                                  split_k=sk, num_warps=warps, num_stages=stages),
                        functools.partial(_time_quant, run, (x, weights), layers, nbytes,
                                          peaks["copy_gbs"], times, f"w4-{bn}-{bk}-{sk}-"
                                          f"{warps}-{stages}", smoke))
        del dense, weights
        gc.collect()


# (block_n, block_k, split_k, num_warps, num_stages, nibbles)
PROBE_CONFIGS = ((32, 256, None, 4, 4, "interleaved"), (32, 256, 4, 4, 4, "interleaved"),
                 (32, 256, 8, 4, 4, "interleaved"), (32, 256, 16, 4, 4, "interleaved"),
                 (64, 256, 8, 4, 4, "interleaved"), (64, 512, 4, 4, 3, "interleaved"),
                 (32, 256, 8, 2, 4, "interleaved"), (16, 256, 16, 2, 4, "interleaved"),
                 (32, 256, None, 4, 4, "halves"), (32, 256, 1, 4, 4, "halves"),
                 (32, 256, 8, 4, 4, "halves"), (64, 256, 8, 4, 4, "halves"))


def quant_probe(rec: Recorder, peaks: dict[str, float], smoke: bool, interpret: bool) -> None:
    """Variants of the W4A16 matmul at decode batches, each against bf16 on the same shapes."""
    from pallas_kernels.quant_matmul import quant_matmul_gpu, to_halves_layout

    shapes = ((64, 256),) if smoke else ((4096, 4096), (14336, 4096))
    batches = (1,) if smoke else (1, 16)
    configs = ((16, 64, None, 4, 2, "interleaved"), (16, 64, 2, 4, 2, "halves")) if smoke \
        else PROBE_CONFIGS
    g = 32 if smoke else 128
    for N, K in shapes:
        layers = 1 if smoke else max(4, min(32, -(-400_000_000 // (N * K // 2))))
        keys = iter(jax.random.split(jax.random.key(N * 3 + K), 4 * layers + 8))
        dense = [jax.random.normal(next(keys), (N, K), jnp.bfloat16) * 0.02
                 for _ in range(layers)]
        q4, scale = _random_quantized(keys, layers, N, K, 4, g)
        layouts = {"interleaved": q4, "halves": to_halves_layout(q4, g)}
        q8 = _random_quantized(keys, layers, N, K, 8, g)
        int4 = [(jax.random.randint(next(keys), (N, K), -8, 8, jnp.int8).astype(jnp.int4),
                 scale[i]) for i in range(layers)]
        bf16 = jax.jit(lambda x, ws: [x @ w.T for w in ws])
        xla_int4 = jax.jit(functools.partial(_xla_int4_layers, group_size=g))
        for T in batches:
            x = jax.random.normal(next(keys), (T, K), jnp.bfloat16)
            io_bytes = T * K * 2 + T * N * 2
            times: dict[str, float] = {}
            guarded(rec, dict(part="quant_probe", system="bf16", N=N, K=K, batch=T,
                              layers=layers),
                    functools.partial(_time_quant, bf16, (x, dense), layers,
                                      N * K * 2 + io_bytes, peaks["copy_gbs"], times, "bf16",
                                      smoke))
            nbytes4 = N * K // 2 + N * (K // g) * 2 + io_bytes
            guarded(rec, dict(part="quant_probe", system="xla-int4", N=N, K=K, batch=T,
                              group_size=g, layers=layers),
                    functools.partial(_time_quant, xla_int4, (x, int4), layers, nbytes4,
                                      peaks["copy_gbs"], times, "xla-int4", smoke))
            for bn, bk, sk, warps, stages, nibbles in configs:
                run = jax.jit(functools.partial(
                    _quant_layers, quant_matmul_gpu, bits=4, group_size=g,
                    interpret=interpret, block_n=bn, block_k=bk, split_k=sk,
                    num_warps=warps, num_stages=stages, nibbles=nibbles))
                guarded(rec, dict(part="quant_probe", system="w4a16", N=N, K=K, batch=T,
                                  group_size=g, layers=layers, block_n=bn, block_k=bk,
                                  split_k=sk, num_warps=warps, num_stages=stages,
                                  nibbles=nibbles),
                        functools.partial(_time_quant, run, (x, (layouts[nibbles], scale)),
                                          layers, nbytes4, peaks["copy_gbs"], times,
                                          f"w4-{bn}-{bk}-{sk}-{warps}-{stages}-{nibbles}",
                                          smoke))
            for sk in (None, 2 if smoke else 8):
                run = jax.jit(functools.partial(
                    _quant_layers, quant_matmul_gpu, bits=8, group_size=g,
                    interpret=interpret, split_k=sk))
                guarded(rec, dict(part="quant_probe", system="w8a16", N=N, K=K, batch=T,
                                  group_size=g, layers=layers, split_k=sk),
                        functools.partial(_time_quant, run, (x, q8), layers,
                                          N * K + N * (K // g) * 2 + io_bytes,
                                          peaks["copy_gbs"], times, f"w8-{sk}", smoke))
        del dense, q4, scale, layouts, q8, int4
        gc.collect()


def _xla_int4_layers(x: jax.Array, weights: list[tuple[jax.Array, jax.Array]], *,
                     group_size: int) -> list[jax.Array]:
    """x @ dequantize(W).T written for XLA: jnp.int4 weights scaled per group, then a dot."""
    out = []
    for q, scale in weights:
        N, K = q.shape
        w = (q.astype(x.dtype).reshape(N, K // group_size, group_size)
             * scale.astype(x.dtype)[:, :, None]).reshape(N, K)
        out.append(x @ w.T)
    return out


def _random_quantized(keys, layers: int, N: int, K: int, bits: int,
                      g: int) -> tuple[jax.Array, jax.Array]:
    """Random stacked weights [L, N, K'] in the kernel's format (symmetric, bf16 scales)."""
    if bits == 4:
        q = jax.random.bits(next(keys), (layers, N, K // 2), jnp.uint8)
    else:
        q = jax.random.randint(next(keys), (layers, N, K), -127, 128, jnp.int8)
    scale = jax.random.uniform(next(keys), (layers, N, K // g), jnp.bfloat16, 0.001, 0.01)
    return q, scale


def _quant_layers(kernel: Callable[..., jax.Array], x: jax.Array,
                  weights: tuple[jax.Array, jax.Array], **kw: Any) -> list[jax.Array]:
    q, scale = weights
    return [kernel(x, q, scale, None, layer=layer, **kw) for layer in range(q.shape[0])]


def _time_quant(f: Callable[..., Any], args: tuple, layers: int, nbytes: int, copy_gbs: float,
                times: dict[str, float], name: str, smoke: bool) -> dict[str, Any]:
    """Per-layer time of f(*args); quantized rows also get their speedup over bf16."""
    t = median_time(functools.partial(f, *args), iters=2 if smoke else 10) / layers
    times[name] = t
    gbs = nbytes / t / 1e9
    row = dict(time_us=round(t * 1e6, 2), gbs=round(gbs, 1), bw_util=round(gbs / copy_gbs, 3))
    if name != "bf16" and "bf16" in times:
        row["speedup_vs_bf16"] = round(times["bf16"] / t, 2)
    return row


def _quant_error(run: Callable[..., list[jax.Array]], reference: Callable[..., jax.Array],
                 x: jax.Array, weights: tuple[jax.Array, jax.Array], bits: int,
                 group_size: int) -> dict[str, Any]:
    """Max abs error of the timed program's last-layer output (bf16) vs the reference."""
    q, scale = weights
    got = run(x, weights)[-1].astype(jnp.float32)
    expected = reference(x, q, scale, None, bits=bits, group_size=group_size,
                         layer=q.shape[0] - 1, out_dtype=jnp.float32)
    return dict(max_abs_err=float(jnp.max(jnp.abs(got - expected))),
                max_abs_ref=float(jnp.max(jnp.abs(expected))))


# ------------------------------------------------------------------ summary

def summarize(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's bars, judged from the rows."""
    lines = []
    dec = [r for r in rows if r.get("part") == "decode_attention" and "bw_util" in r]
    for r in dec:
        if r["system"] == "pallas" and r["context"] >= 4096:
            ok = r["bw_util"] >= 0.8
            verdict = "meets" if ok else "misses"
            lines.append(f"decode attention ctx {r['context']} batch {r['batch']}: "
                         f"{r['bw_util']:.0%} of copy bandwidth ({verdict} 80%)")
    for r in rows:
        if (r.get("part") == "prefill_attention" and r.get("system") == "pallas"
                and "tflops" in r and r["tokens"] >= 16384):
            ok = r["peak_frac"] >= 0.5
            lines.append(f"prefill attention {r['tokens']}: {r['tflops']} TFLOP/s = "
                         f"{r['peak_frac']:.0%} of peak ({'meets' if ok else 'misses'} 50%)")
        if (r.get("part") == "e2e_decode" and r.get("batch") == 1
                and r.get("system", "").startswith("jaxinfer") and "roofline_ratio" in r):
            ok = r["roofline_ratio"] <= 1.3
            lines.append(f"e2e decode batch 1 {r['system']}: {r['roofline_ratio']}x the "
                         f"bytes roofline ({'meets' if ok else 'misses'} 1.3x)")
    quant = [r for r in rows if r.get("part") == "quant_matmul" and r.get("system") == "w4a16"
             and r["batch"] <= 16 and "speedup_vs_bf16" in r]
    for r in quant:
        ok = r["speedup_vs_bf16"] >= 3.0
        lines.append(f"W4A16 {r['N']}x{r['K']} batch {r['batch']}: {r['speedup_vs_bf16']}x "
                     f"bf16 ({'meets' if ok else 'misses'} 3x)")
    if quant:
        worst = min(r["speedup_vs_bf16"] for r in quant)
        lines.append(f"W4A16 >= 3x bf16 at batch <= 16: {'meets' if worst >= 3.0 else 'misses'} "
                     f"(worst {worst}x)")
    sweep: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("part") in ("quant_sweep", "quant_probe") and "speedup_vs_bf16" in r:
            sweep.setdefault((r["part"], r["N"], r["K"], r["batch"]), []).append(r)
    for (part, N, K, T), rs in sorted(sweep.items(), key=str):
        best = max(rs, key=lambda r: r["speedup_vs_bf16"])
        setting = " ".join(f"{k}={best[k]}" for k in ("system", "block_n", "block_k", "split_k",
                                                       "num_warps", "num_stages", "nibbles")
                           if k in best)
        lines.append(f"{part} {N}x{K} batch {T}: best {best['speedup_vs_bf16']}x bf16 with "
                     f"{setting}")
    by_shape: dict[tuple, dict[str, float]] = {}
    for r in rows:
        t = r.get("time_us") or r.get("time_ms") or r.get("step_ms")
        if t is None or r.get("system") not in ("pallas", "xla", "jaxinfer-xla",
                                                "jaxinfer-pallas_gpu"):
            continue
        key = (r["part"], r.get("context"), r.get("batch"), r.get("tokens"))
        by_shape.setdefault(key, {})[r["system"].removeprefix("jaxinfer-")
                                     .replace("pallas_gpu", "pallas")] = t
    for key, t in sorted(by_shape.items(), key=str):
        if "pallas" in t and "xla" in t:
            lines.append(f"{key}: pallas/xla time {t['pallas'] / t['xla']:.2f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu_results/gpu_check.jsonl"),
                    help="JSON-lines file the results are appended to")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, Pallas in interpret mode on CPU: checks the script only")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    backend = jax.default_backend()
    if backend != "gpu" and not args.smoke:
        ap.error(f"no GPU (jax backend {backend!r}); use --smoke to exercise the script on CPU")
    interpret = backend != "gpu"
    device = jax.devices()[0].device_kind
    rec = Recorder(args.out, device, args.smoke)
    rec(part="meta", jax=jax.__version__, backend=backend, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    t0 = time.time()
    peaks = measure_peaks(rec, args.smoke)
    runners: dict[str, Callable[[], None]] = {
        "peaks": lambda: None,
        "decode_attention": lambda: decode_attention(rec, peaks, args.smoke, interpret),
        "prefill_attention": lambda: prefill_attention(rec, peaks, args.smoke, interpret),
        "e2e_decode": lambda: e2e_decode(rec, peaks, args.smoke, with_hf=not args.no_hf),
        "quant_matmul": lambda: quant_matmul(rec, peaks, args.smoke, interpret),
        "quant_sweep": lambda: quant_sweep(rec, peaks, args.smoke, interpret),
        "quant_probe": lambda: quant_probe(rec, peaks, args.smoke, interpret),
    }
    for part in parts:
        t_part = time.time()
        runners[part]()
        rec(part="timing", of=part, wall_s=round(time.time() - t_part, 1))
    summary = summarize(rec.rows)
    rec(part="summary", wall_s=round(time.time() - t0, 1), bars=summary)
    print("\n".join(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
