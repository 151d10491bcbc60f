"""W4A16 / W8A16 matmul for GPUs: a Pallas kernel lowered to Triton.

One program per (token block, output-feature block, K split). The weights stay packed in
memory; each loop step reads a block of whole quantization groups of the layer's rows
straight from the stacked [L, N, K'] arrays (the layer is an operand, so `lax.scan` over
layers copies nothing), turns the integers into floats in registers and multiplies them
with x on the tensor cores, one dot per group (integers up to 128 are exact in bf16/f16).
The group's scale (and offset times the group's sum of x) is applied to that dot's
[block_t, block_n] result rather than to each of its g x block_n weights, fewer multiplies
whenever block_t <= g: in-register dequantization, not the dot, is what competes with
memory bandwidth at small T (MARLIN applies per-channel scales to the output the same
way). For small T (decode) the whole batch is one 16-row block and K is split over extra
programs until the grid fills the GPU; the splits are summed in float32 after the kernel.
Dimension legend: T tokens, N output features, K input features, K' packed width,
L layers, g group size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jax.typing import DTypeLike

from pallas_kernels.quant_matmul.reference import as_stacked, check_matmul
from pallas_kernels.quant_matmul.tuning import gpu_tuning, matmul_cost

# Triton's dot needs every operand dimension >= 16 (and powers of two).
_MIN_DOT = 16
# float32 bits of 1.5 * 2**23: adding a small integer to them adds it to the value exactly,
# so an integer add and a float subtract replace the int->float conversion instruction,
# whose throughput on NVIDIA GPUs is a fraction of the FMA rate.
_MAGIC_BITS = 0x4B400000
_MAGIC_VALUE = 12582912.0


def _next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _is_power_of_2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def integer_values(packed: jax.Array, bits: int) -> jax.Array:
    """Exact float32 values of a weight tile: int8 [R, C] or packed uint8 [R, C // 2] -> [R, C].

    Nibbles are interleaved back (low nibble = even column) by a join along a new minor
    axis, the same register shuffle Pallas uses for its own int4 loads.
    """
    if bits == 4:
        rows, width = packed.shape
        nibbles = jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(rows, 2 * width)
        ints, bias = nibbles.astype(jnp.int32), 8.0
    else:
        ints, bias = packed.astype(jnp.int32), 0.0
    return lax.bitcast_convert_type(ints + _MAGIC_BITS, jnp.float32) - (_MAGIC_VALUE + bias)


def to_halves_layout(q: jax.Array, group_size: int) -> jax.Array:
    """Rearrange packed int4 [..., N, K // 2] (low nibble = even column) offline so that in each
    group the low nibbles hold its first g / 2 columns and the high nibbles the last g / 2.

    The kernel (`nibbles="halves"`) then splits a loaded tile with one mask and one shift and
    runs two dots of K = g / 2, with no register shuffle to interleave the nibbles back.
    """
    if jnp.dtype(q.dtype) != jnp.uint8:
        raise ValueError(f"packed int4 weights are uint8, got {q.dtype}")
    *lead, n, half = q.shape
    if (2 * half) % group_size or group_size % 2:
        raise ValueError(f"group_size={group_size} must be even and divide K={2 * half}")
    values = jnp.stack([q & 0xF, q >> 4], axis=-1).reshape(*lead, n, -1, group_size)
    lo, hi = values[..., : group_size // 2], values[..., group_size // 2:]
    return (lo | (hi << 4)).astype(jnp.uint8).reshape(*lead, n, half)


def _kernel(layer_ref, x_ref, q_ref, scale_ref, *refs, bits: int, group_size: int,
            num_tokens: int, block_t: int, block_n: int, groups_per_step: int,
            steps_per_split: int, has_offset: bool, compute_dtype: jnp.dtype,
            precision: lax.Precision, halves: bool) -> None:
    # Whole-array refs: layer [1]; x [Tp, K]; q [L, N, K']; scale, offset [L, N, K // g];
    # x_sums [Tp, K // g]; out [splits, Tp, N].
    if has_offset:
        offset_ref, x_sums_ref, out_ref = refs
    else:
        (out_ref,) = refs
    t, n, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    tokens = pl.ds(t * block_t, block_t)
    features = pl.ds(n * block_n, block_n)
    packed_group = group_size // 2 if bits == 4 else group_size  # K' columns per group
    # x is padded to whole blocks; masking its padding rows spares their loads (a decode
    # block is 1 real row of 16) in every program.
    real = t * block_t + lax.broadcasted_iota(jnp.int32, (block_t, group_size), 0) < num_tokens
    real_half = (t * block_t + lax.broadcasted_iota(jnp.int32, (block_t, group_size // 2), 0)
                 < num_tokens)

    def step(i, acc):  # acc [block_t, block_n] float32
        for j in range(groups_per_step):
            group = (split * steps_per_split + i) * groups_per_step + j
            # Each weight is read once: evict it first, keeping x and the scales in cache.
            packed = pltriton.load(
                q_ref.at[layer, features, pl.ds(group * packed_group, packed_group)],
                eviction_policy="evict_first")
            if halves:  # low nibbles: the group's first g / 2 columns; high: the rest
                half = group_size // 2
                dot = jnp.zeros((block_t, block_n), jnp.float32)
                for h, nib in enumerate((packed & 0xF, packed >> 4)):
                    w = (lax.bitcast_convert_type(nib.astype(jnp.int32) + _MAGIC_BITS,
                                                  jnp.float32) - (_MAGIC_VALUE + 8.0))
                    x = pltriton.load(
                        x_ref.at[tokens, pl.ds(group * group_size + h * half, half)],
                        mask=real_half, other=0.0)  # [block_t, g / 2]
                    dot = dot + jnp.dot(x, w.astype(compute_dtype).T, precision=precision,
                                        preferred_element_type=jnp.float32)
            else:
                w = integer_values(packed, bits).astype(compute_dtype)  # [block_n, g], exact
                x = pltriton.load(x_ref.at[tokens, pl.ds(group * group_size, group_size)],
                                  mask=real, other=0.0)  # [block_t, g]
                dot = jnp.dot(x, w.T, precision=precision, preferred_element_type=jnp.float32)
            scale = scale_ref[layer, features, group].astype(jnp.float32)  # [block_n]
            acc = acc + dot * scale[None, :]
            if has_offset:
                offset = offset_ref[layer, features, group].astype(jnp.float32)
                acc = acc + x_sums_ref[tokens, group][:, None] * offset[None, :]
        return acc

    acc = lax.fori_loop(0, steps_per_split, step,
                        jnp.zeros((block_t, block_n), jnp.float32))
    out_ref[split, tokens, features] = acc.astype(out_ref.dtype)


def _block_n(N: int, block_n: int | None, tuned: int) -> int:
    if block_n is not None:
        if not _is_power_of_2(block_n) or N % block_n:
            raise ValueError(f"block_n={block_n} must be a power of two dividing N={N}")
        return block_n
    block = tuned
    while N % block:
        block //= 2
    return block


def _groups_per_step(K: int, group_size: int, block_k: int | None, tuned: int) -> int:
    num_groups = K // group_size
    if block_k is not None:
        if block_k % group_size or K % block_k:
            raise ValueError(f"block_k={block_k} must be a multiple of group_size={group_size} "
                             f"and divide K={K}")
        return block_k // group_size
    per_step = max(1, tuned // group_size)
    while num_groups % per_step:
        per_step -= 1
    return per_step


def quant_matmul_gpu(
    x: jax.Array,
    q: jax.Array,
    scale: jax.Array,
    offset: jax.Array | None,
    *,
    bits: int,
    group_size: int,
    layer: jax.Array | int | None = None,
    out_dtype: DTypeLike | None = None,
    interpret: bool = False,
    block_n: int | None = None,
    block_k: int | None = None,
    block_t: int | None = None,
    split_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    nibbles: str = "interleaved",
) -> jax.Array:
    """x @ W.T for a group-quantized W (Triton kernel); contract as `quant_matmul_reference`.

    Args:
      x: [T, K] float32, bfloat16 or float16. 16-bit x runs the dots in its dtype (the
        integer weights are exact in it) with float32 accumulation; float32 x runs them in
        full float32 precision.
      q, scale, offset: one layer's weight ([N, K'] and [N, K // g]) or stacked [L, ...]
        arrays with `layer` (an int or a traced int32 scalar, clamped into range).
      bits, group_size: the format (4 or 8; 16 ... 256 dividing K).
      out_dtype: result dtype, x's by default.
      interpret: run the kernel in the Pallas interpreter (any backend; how CPU tests run).
      block_n: output features per program (power of two dividing N; compiled kernels need
        >= 16, so N must be a multiple of 16). block_k: K entries per loop step (a multiple
        of group_size dividing K). block_t: token rows per program (power of two, >= 16
        compiled). split_k: programs sharing one output block's K range (divides the number
        of K steps). Defaults come from `tuning.gpu_tuning`.
      num_warps, num_stages: Triton launch settings.
      nibbles: int4 packing, "interleaved" (the format's: low nibble = even column) or
        "halves" (rearranged offline by `to_halves_layout`).

    Returns:
      [T, N] in out_dtype.
    """
    N, K, _ = check_matmul(x, q, scale, offset, bits=bits, group_size=group_size, layer=layer)
    if nibbles not in ("interleaved", "halves"):
        raise ValueError(f"nibbles={nibbles!r}: use 'interleaved' or 'halves'")
    halves = bits == 4 and nibbles == "halves"
    if halves and not interpret and group_size // 2 < _MIN_DOT:
        raise ValueError(f"nibbles='halves' needs group_size >= {2 * _MIN_DOT} compiled")
    T = x.shape[0]
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    if T == 0:
        return jnp.zeros((0, N), out_dtype)
    tune = gpu_tuning(T, bits)
    if block_t is None:
        block_t = min(tune["block_t"], max(_MIN_DOT, _next_power_of_2(T)))
    if not _is_power_of_2(block_t):
        raise ValueError(f"block_t={block_t} must be a power of two")
    block_n = _block_n(N, block_n, tune["block_n"])
    if not interpret and min(block_t, block_n) < _MIN_DOT:
        raise ValueError(f"the Triton kernel needs block_t and block_n >= {_MIN_DOT} (got "
                         f"{block_t}, {block_n}; N={N} must be a multiple of {_MIN_DOT}); use "
                         "quant_matmul_reference for such weights")
    groups_per_step = _groups_per_step(K, group_size, block_k, tune["block_k"])
    num_steps = K // (group_size * groups_per_step)
    grid_tn = -(-T // block_t) * (N // block_n)
    if split_k is None:
        split_k = 1
        while (grid_tn * split_k < tune["min_programs"] and num_steps % (2 * split_k) == 0
               and num_steps // (2 * split_k) >= 2):
            split_k *= 2
    if split_k < 1 or num_steps % split_k:
        raise ValueError(f"split_k={split_k} must divide the {num_steps} K steps")

    compute_dtype = jnp.dtype(x.dtype)
    precision = (lax.Precision.HIGHEST if compute_dtype == jnp.float32
                 else lax.Precision.DEFAULT)
    padded = -(-T // block_t) * block_t
    x = jnp.pad(x, ((0, padded - T), (0, 0)))
    q, scale, offset, layer = as_stacked(q, scale, offset, layer)
    operands = [layer, x, q, scale]
    if offset is not None:
        # Sum of x over each group, for offset * sum(x): the offset never touches a weight.
        x_sums = x.astype(jnp.float32).reshape(padded, K // group_size, group_size).sum(-1)
        operands += [offset, x_sums]
    part_dtype = out_dtype if split_k == 1 else jnp.dtype(jnp.float32)

    kernel = functools.partial(
        _kernel, bits=bits, group_size=group_size, num_tokens=T, block_t=block_t,
        block_n=block_n, groups_per_step=groups_per_step, steps_per_split=num_steps // split_k,
        has_offset=offset is not None, compute_dtype=compute_dtype, precision=precision,
        halves=halves)
    parts = pl.pallas_call(
        kernel,
        grid=(padded // block_t, N // block_n, split_k),
        out_shape=jax.ShapeDtypeStruct((split_k, padded, N), part_dtype),
        compiler_params=pltriton.CompilerParams(
            num_warps=num_warps or tune["num_warps"],
            num_stages=num_stages or tune["num_stages"]),
        cost_estimate=matmul_cost(T, N, K, bits, group_size, x.dtype.itemsize,
                                  scale.dtype.itemsize, offset is not None,
                                  out_dtype.itemsize),
        interpret=interpret,
        name="quant_matmul_gpu",
    )(*operands)
    out = parts[0] if split_k == 1 else parts.sum(axis=0)
    return out[:T].astype(out_dtype)

