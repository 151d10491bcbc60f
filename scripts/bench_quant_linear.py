"""Micro-benchmark of the native quantized CPU matmul against the f32 paths, on SmolLM2-135M's
shapes. Prints one JSON line per (shape, bits, T).

Each variant runs inside one jitted `lax.scan` over the stacked layers (as the model calls
it, layer index traced, weights cold in cache); variants are interleaved round by round in
one process and the median per-layer time is reported, since the machine is shared.

  python scripts/bench_quant_linear.py [--rows 1,2,4,8,16,32] [--rounds 9] [--shapes qkv,head]

Columns: f32_native_ms (cpu_kernels.linear on f32 weights), xla_f32_ms (XLA dot on the
already dequantized f32 weight), xla_dequant_ms (XLA dequantize + dot from the quantized
weight), quant_ms (cpu_kernels.quant_linear), quant_gbps (bytes of q + scale + offset read
per second), speedup_vs_native / speedup_vs_xla_f32.

Dimension legend: L layers, N output features, K input features, T tokens, G groups.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import cpu_kernels

# name -> (N, K, L); the LM head is one matrix, stacked twice so it is not cache resident.
SHAPES = {"o": (576, 576, 30), "qkv": (960, 576, 30), "gate_up": (3072, 576, 30),
          "down": (576, 1536, 30), "head": (49152, 576, 2)}


def quantize(w: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, ...]:
    """Asymmetric group quantization of w [L, N, K] in the shared format (offset = min + 8s
    for int4, so q = u - 8), float16 scales and offsets like GGUF."""
    L, N, K = w.shape
    g = w.reshape(L, N, K // group_size, group_size)
    lo, hi = g.min(-1), g.max(-1)
    levels = 255 if bits == 8 else 15
    scale = np.maximum(hi - lo, 1e-8) / levels
    u = np.clip(np.rint((g - lo[..., None]) / scale[..., None]), 0, levels).astype(np.int32)
    shift = 128 if bits == 8 else 8
    q = (u - shift).reshape(L, N, K)
    offset = lo + shift * scale
    if bits == 8:
        packed = q.astype(np.int8)
    else:
        nib = (q + 8).astype(np.uint8)
        packed = nib[..., 0::2] | (nib[..., 1::2] << 4)
    return packed, scale.astype(np.float16), offset.astype(np.float16)


def dequantize(q, scale, offset, bits: int, group_size: int):
    """The XLA dequantization of the whole stacked weight (jnp, f32)."""
    if bits == 4:
        q = jnp.stack([(q & 15).astype(jnp.int32) - 8, (q >> 4).astype(jnp.int32) - 8], -1)
        q = q.reshape(*q.shape[:-2], -1)
    L, N, K = q.shape
    grouped = q.astype(jnp.float32).reshape(L, N, K // group_size, group_size)
    w = grouped * scale.astype(jnp.float32)[..., None] + offset.astype(jnp.float32)[..., None]
    return w.reshape(L, N, K)


def scan_layers(layer_fn, steps: int, L: int):
    """jit(x, *weights) -> [steps, T, N]: layer_fn(x, *weights, l) for l = 0, 1, .. mod L."""
    def run(x, *weights):
        def body(carry, l):
            return carry, layer_fn(x, *weights, l)
        return jax.lax.scan(body, 0, jnp.arange(steps, dtype=jnp.int32) % L)[1]
    return jax.jit(run)


def xla_f32(x, w, l):
    return jax.lax.dot_general(x, w[l], (((1,), (1,)), ((), ())))


def time_call(fn, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def bench_shape(name: str, rows: list[int], rounds: int, group_size: int) -> None:
    N, K, L = SHAPES[name]
    steps = max(L, 6)
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((L, N, K), np.float32) * 0.05).astype(np.float32)
    quants = {bits: tuple(jnp.asarray(a) for a in quantize(w, bits, group_size))
              for bits in (8, 4)}
    w = jnp.asarray(w)
    for T in rows:
        x = jnp.asarray(rng.standard_normal((T, K), np.float32))
        variants = {
            "f32_native": (scan_layers(cpu_kernels.linear, steps, L), (x, w)),
            "xla_f32": (scan_layers(xla_f32, steps, L), (x, w)),
        }
        for bits, (q, s, o) in quants.items():
            def native(x, q, s, o, l, bits=bits):
                return cpu_kernels.quant_linear(x, q, s, o, l, bits=bits, group_size=group_size)

            def xla_dequant(x, q, s, o, l, bits=bits):
                return xla_f32(x, dequantize(q[l][None], s[l][None], o[l][None], bits,
                                             group_size), 0)
            variants[f"quant{bits}"] = (scan_layers(native, steps, L), (x, q, s, o))
            variants[f"xla_dequant{bits}"] = (scan_layers(xla_dequant, steps, L), (x, q, s, o))
        times: dict[str, list[float]] = {k: [] for k in variants}
        for fn, args in variants.values():
            time_call(fn, args)  # compile and warm up
        for _ in range(rounds):
            for key, (fn, args) in variants.items():
                times[key].append(time_call(fn, args) / steps * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        for bits, (q, s, o) in quants.items():
            nbytes = (q.size * q.dtype.itemsize + s.size * s.dtype.itemsize
                      + o.size * o.dtype.itemsize) / L
            quant = med[f"quant{bits}"]
            print(json.dumps({
                "shape": name, "N": N, "K": K, "bits": bits, "group_size": group_size, "T": T,
                "f32_native_ms": round(med["f32_native"], 4),
                "xla_f32_ms": round(med["xla_f32"], 4),
                "xla_dequant_ms": round(med[f"xla_dequant{bits}"], 4),
                "quant_ms": round(quant, 4), "quant_gbps": round(nbytes / quant / 1e6, 1),
                "speedup_vs_native": round(med["f32_native"] / quant, 2),
                "speedup_vs_xla_f32": round(med["xla_f32"] / quant, 2)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    if not cpu_kernels.available():
        raise SystemExit("the native CPU kernels did not build (see the warning above)")
    rows = [int(r) for r in args.rows.split(",")]
    for name in args.shapes.split(","):
        bench_shape(name, rows, args.rounds, args.group_size)


if __name__ == "__main__":
    main()
