"""W4A16 / W8A16 matmul for TPUs: a Pallas kernel lowered to Mosaic.

Grid (output-feature block, token block, K block), K innermost with a float32 accumulator
in VMEM scratch. The layer arrives by scalar prefetch and picks the block of the stacked
[L, N, K'] weights in the BlockSpec index maps, so only that layer's tiles are DMA'd. Each
step dequantizes its packed tile in VMEM and feeds the MXU in x's dtype.

Mosaic wants every operation lane aligned, so nothing is interleaved along lanes: int4
weights are used as two halves (low nibbles = even K entries, high = odd) against x split
the same way in the wrapper ([2, T, K / 2], a cheap copy of the small operand). Group scales
are spread over the tile's lanes by a one-hot matmul on the otherwise idle MXU ([N, groups]
x [groups, K'], exact) rather than by lane gathers. The scale block spans all K // g groups,
or a 128-group window of them when K // g is a multiple of 128.
Dimension legend: T tokens, N output features, K input features, K' packed width,
L layers, g group size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.typing import DTypeLike

from pallas_kernels.quant_matmul.reference import as_stacked, check_matmul
from pallas_kernels.quant_matmul.tuning import (
    TPU_DEFAULT_SCOPED_VMEM_BYTES,
    matmul_cost,
    tpu_tuning,
    tpu_vmem_bytes,
)

_LANES = 128
_SUBLANES = 16  # bf16 rows per vreg tile (8 for float32): 16 is legal for both
_SCALE_WINDOW = 128  # groups per scale block when K // g is a multiple of it
# jax 0.10.2 and 0.11.x call it CompilerParams; older releases TPUCompilerParams.
_CompilerParams = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams


def _expand(groups: jax.Array, onehot: jax.Array) -> jax.Array:
    """[BN, G] per-group values -> [BN, K'] per packed column, exactly (one-hot matmul)."""
    if groups.dtype == jnp.bfloat16:  # one bf16 pass is exact
        return jnp.dot(groups, onehot.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    return jnp.dot(groups.astype(jnp.float32), onehot, precision=lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32)


def _kernel(layer_ref, x_ref, q_ref, scale_ref, *refs, bits: int, group_size: int,
            blocks_per_window: int, has_offset: bool, precision: lax.Precision) -> None:
    # Blocks: x [BT, BK] (int8) or [2, BT, BK / 2] (int4 halves); q [BN, K'b]; scale,
    # offset [BN, G] (G groups of the window); out [BT, BN]; acc scratch [BT, BN] f32.
    del layer_ref  # used by the index maps only
    if has_offset:
        offset_ref, out_ref, acc_ref = refs
    else:
        out_ref, acc_ref = refs
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    width = q_ref.shape[-1]  # packed columns of this step
    groups = scale_ref.shape[-1]
    packed_group = group_size // 2 if bits == 4 else group_size  # packed columns per group
    # Group (within the scale window) of each packed column of this step.
    col = lax.broadcasted_iota(jnp.int32, (groups, width), 1)
    row = lax.broadcasted_iota(jnp.int32, (groups, width), 0)
    column = lax.rem(k, blocks_per_window) * width + col
    onehot = (lax.shift_right_logical(column, packed_group.bit_length() - 1) == row)
    onehot = onehot.astype(jnp.float32)
    scale = _expand(scale_ref[...], onehot)  # [BN, K'b]
    offset = _expand(offset_ref[...], onehot) if has_offset else None

    packed = q_ref[...]
    if bits == 4:
        nibbles = packed.astype(jnp.int32)
        halves = [((nibbles & 0xF) - 8, x_ref[0]),
                  (lax.shift_right_logical(nibbles, 4) - 8, x_ref[1])]
    else:
        halves = [(packed, x_ref[...])]
    acc = acc_ref[...]
    for values, x in halves:
        w = values.astype(jnp.float32) * scale
        if offset is not None:
            w = w + offset
        acc = acc + lax.dot_general(x, w.astype(x.dtype), (((1,), (1,)), ((), ())),
                                    precision=precision, preferred_element_type=jnp.float32)
    acc_ref[...] = acc

    @pl.when(k == pl.num_programs(2) - 1)
    def _finish():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _aligned_divisor(size: int, target: int, align: int) -> int:
    """Largest multiple of `align` <= target dividing size; size itself when none does."""
    block = (min(target, size) // align) * align
    while block >= align:
        if size % block == 0:
            return block
        block -= align
    return size


def quant_matmul_tpu(
    x: jax.Array,
    q: jax.Array,
    scale: jax.Array,
    offset: jax.Array | None,
    *,
    bits: int,
    group_size: int,
    layer: jax.Array | int | None = None,
    out_dtype: DTypeLike | None = None,
    interpret: bool | object = False,
    block_n: int | None = None,
    block_k: int | None = None,
    block_t: int | None = None,
) -> jax.Array:
    """x @ W.T for a group-quantized W (Mosaic kernel); contract as `quant_matmul_reference`.

    Args:
      x, q, scale, offset, bits, group_size, layer, out_dtype: as `quant_matmul_gpu`.
      interpret: True (or a `pltpu.InterpretParams`) runs the Pallas interpreter.
      block_n: output features per step (a multiple of 128 dividing N, or N).
      block_k: K entries per step (dividing K; a multiple of 256 for int4 / 128 for int8,
        or K). When K // g is a multiple of 128, 128 * g must be a multiple of block_k.
      block_t: tokens per step (a multiple of 16). Defaults come from `tuning.tpu_tuning`.

    Returns:
      [T, N] in out_dtype.
    """
    N, K, _ = check_matmul(x, q, scale, offset, bits=bits, group_size=group_size, layer=layer)
    T = x.shape[0]
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    if T == 0:
        return jnp.zeros((0, N), out_dtype)
    tune = tpu_tuning(T, bits)
    k_align = 2 * _LANES if bits == 4 else _LANES  # K' per block: whole 128-lane tiles
    num_groups = K // group_size
    windowed = num_groups % _SCALE_WINDOW == 0
    if block_t is None:
        block_t = min(tune["block_t"], -(-T // _SUBLANES) * _SUBLANES)
    if block_n is None:
        block_n = _aligned_divisor(N, tune["block_n"], _LANES)
    if block_k is None:
        target = min(tune["block_k"], _SCALE_WINDOW * group_size) if windowed else tune["block_k"]
        block_k = _aligned_divisor(K, target, k_align)
    if N % block_n or K % block_k or block_t % _SUBLANES or (bits == 4 and block_k % 2):
        raise ValueError(f"blocks (block_t={block_t}, block_n={block_n}, block_k={block_k}) "
                         f"must divide N={N} and K={K}, and block_t be a multiple of "
                         f"{_SUBLANES}")
    if not interpret and ((block_n % _LANES and block_n != N)
                          or (block_k % k_align and block_k != K)):
        raise ValueError(f"Mosaic tiles: block_n={block_n} must be a multiple of {_LANES} (or "
                         f"N={N}) and block_k={block_k} a multiple of {k_align} (or K={K})")
    if windowed and (_SCALE_WINDOW * group_size) % block_k:
        windowed = False  # the block straddles scale windows: take all groups at once
    window = _SCALE_WINDOW if windowed else num_groups
    blocks_per_window = window * group_size // block_k if windowed else K // block_k

    padded = -(-T // block_t) * block_t
    x = jnp.pad(x, ((0, padded - T), (0, 0)))
    if bits == 4:  # even / odd K entries, matching the low / high nibbles
        x = x.reshape(padded, K // 2, 2).transpose(2, 0, 1)
        x_spec = pl.BlockSpec((2, block_t, block_k // 2), lambda n, t, k, layer: (0, t, k))
    else:
        x_spec = pl.BlockSpec((block_t, block_k), lambda n, t, k, layer: (t, k))
    q, scale, offset, layer = as_stacked(q, scale, offset, layer)
    q_spec = pl.BlockSpec((None, block_n, block_k * bits // 8),
                          lambda n, t, k, layer: (layer[0], n, k))
    scale_spec = pl.BlockSpec(
        (None, block_n, window),
        lambda n, t, k, layer: (layer[0], n, lax.div(k, blocks_per_window)))
    in_specs = [x_spec, q_spec, scale_spec] + ([scale_spec] if offset is not None else [])
    operands = [layer, x, q, scale] + ([offset] if offset is not None else [])

    vmem = tpu_vmem_bytes(block_t=block_t, block_n=block_n, block_k=block_k, bits=bits,
                          x_itemsize=x.dtype.itemsize, scale_groups=window,
                          scale_itemsize=scale.dtype.itemsize, has_offset=offset is not None,
                          out_itemsize=out_dtype.itemsize)
    kernel = functools.partial(
        _kernel, bits=bits, group_size=group_size, blocks_per_window=blocks_per_window,
        has_offset=offset is not None,
        precision=lax.Precision.HIGHEST if x.dtype == jnp.float32 else lax.Precision.DEFAULT)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(N // block_n, padded // block_t, K // block_k),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((block_t, block_n), lambda n, t, k, layer: (t, n)),
            scratch_shapes=[pltpu.VMEM((block_t, block_n), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((padded, N), out_dtype),
        compiler_params=_CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            # Keep Mosaic's default scoped limit unless the blocks need more (cap: v7x VMEM).
            vmem_limit_bytes=(None if vmem <= TPU_DEFAULT_SCOPED_VMEM_BYTES
                              else min(2 * vmem, 64 * 2**20))),
        cost_estimate=matmul_cost(T, N, K, bits, group_size, x.dtype.itemsize,
                                  scale.dtype.itemsize, offset is not None,
                                  out_dtype.itemsize),
        interpret=interpret,
        name="quant_matmul_tpu",
    )(*operands)
    return out[:T]
