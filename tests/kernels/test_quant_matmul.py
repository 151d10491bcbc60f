"""Quantized matmul kernels (GPU/Triton and TPU/Mosaic, run interpreted) against oracles.

Every kernel result is checked against `quant_matmul_reference` and against a float64 numpy
oracle built from the integer values (the GPU kernel multiplies x with the exact integers
and scales afterwards, so it is held to float32 accumulation error; the TPU kernel rounds
the dequantized weight to x's dtype, so its oracle rounds the same way). Cases cover 4 and
8 bits, symmetric and asymmetric, group sizes 16/32/128 (one or several groups per GPU
step), float32 / bfloat16 / float16 scales, ragged T (1, 5, 19, 37: never a multiple of the
blocks), stacked weights with an int or traced layer, float32 and bfloat16 x; explicit
small blocks force several N, K and token blocks (and, on GPU, a K split). Both kernels
are also lowered for real hardware (no device needed).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from pallas_kernels.quant_matmul import (
    dequantize,
    gpu_tuning,
    pack_int4,
    quant_matmul_gpu,
    quant_matmul_reference,
    quant_matmul_tpu,
    to_halves_layout,
    tpu_tuning,
    unpack_int4,
)
from pallas_kernels.quant_matmul.tuning import (
    GPU_SHARED_MEMORY_BYTES,
    GPU_TUNING,
    TPU_TUNING,
    gpu_shared_memory_bytes,
    tpu_vmem_bytes,
)

# Relative to max|oracle|: float32 accumulation vs. outputs rounded to bfloat16.
TOLERANCE = {jnp.float32: 2e-6, jnp.bfloat16: 8e-3}


class Case(NamedTuple):
    bits: int
    group_size: int
    asymmetric: bool
    tokens: int
    x_dtype: Any
    scale_dtype: Any
    layer: int | str | None  # None: one layer's arrays; "traced": a jit argument
    out_dtype: Any = jnp.float32
    K: int = 512
    N: int = 64
    gpu_block_k: int | None = None  # K entries per GPU loop step (groups unrolled per step)
    gpu_split_k: int = 1  # GPU programs sharing one output block's K range


CASES = {
    "int4_asym_g32_decode_bf16_traced": Case(4, 32, True, 1, jnp.bfloat16, jnp.bfloat16,
                                             "traced", gpu_block_k=32, gpu_split_k=4),
    "int8_sym_g32_t19_bf16_out": Case(8, 32, False, 19, jnp.bfloat16, jnp.float16, None,
                                      out_dtype=None, gpu_block_k=64),
    "int8_asym_g128_t37_f32_stacked": Case(8, 128, True, 37, jnp.float32, jnp.float32, 1,
                                           gpu_block_k=128),
    # K // g = 256 groups: the TPU kernel takes scales in two 128-group windows.
    "int4_sym_g16_t5_f32_windowed": Case(4, 16, False, 5, jnp.float32, jnp.float32, "traced",
                                         K=4096, N=16, gpu_block_k=16),
}


def kernel_for(name: str, case: Case):
    """The kernel in interpret mode with blocks small enough for several N / K / T blocks
    (TPU: its smallest legal tiles)."""
    if name == "gpu":
        return functools.partial(quant_matmul_gpu, interpret=True, block_n=16,
                                 block_k=case.gpu_block_k, block_t=16, split_k=case.gpu_split_k)
    return functools.partial(quant_matmul_tpu, interpret=True, block_n=min(128, case.N),
                             block_k=256, block_t=16)


def make_weights(rng: np.random.Generator, case: Case, num_layers: int = 2):
    """Integer values [L, N, K], their stored form, scale and offset (stacked)."""
    lo, hi = (-8, 7) if case.bits == 4 else (-128, 127)
    shape = (num_layers, case.N, case.K)
    values = rng.integers(lo, hi + 1, size=shape).astype(np.int8)
    q = pack_int4(jnp.asarray(values)) if case.bits == 4 else jnp.asarray(values)
    groups = (num_layers, case.N, case.K // case.group_size)
    scale = jnp.asarray(rng.uniform(0.002, 0.02, groups), case.scale_dtype)
    offset = (jnp.asarray(rng.normal(0.0, 0.02, groups), case.scale_dtype)
              if case.asymmetric else None)
    return values, q, scale, offset


def oracle_weight(values, scale, offset, group_size: int, round_to=None) -> np.ndarray:
    """float64 W = q * scale + offset, optionally rounded like a kernel (f32 -> round_to)."""
    expand = lambda a: np.repeat(np.asarray(a, np.float64), group_size, axis=-1)
    w = values.astype(np.float64) * expand(scale)
    if offset is not None:
        w = w + expand(offset)
    if round_to is not None:
        w = np.asarray(jnp.asarray(w, jnp.float32).astype(round_to), np.float64)
    return w


def run_case(kernel, case: Case, seed: int):
    """(kernel output, reference output, x, weights) for one case."""
    rng = np.random.default_rng(seed)
    values, q, scale, offset = make_weights(rng, case)
    x = jnp.asarray(rng.normal(size=(case.tokens, case.K)), case.x_dtype)
    layer = 1
    args = dict(bits=case.bits, group_size=case.group_size, out_dtype=case.out_dtype)
    if case.layer is None:
        values, q, scale = values[layer], q[layer], scale[layer]
        offset = None if offset is None else offset[layer]
        got = kernel(x, q, scale, offset, **args)
        expected = quant_matmul_reference(x, q, scale, offset, **args)
    elif case.layer == "traced":
        run = jax.jit(lambda x, q, s, o, layer: kernel(x, q, s, o, layer=layer, **args))
        got = run(x, q, scale, offset, jnp.int32(layer))
        expected = quant_matmul_reference(x, q, scale, offset, layer=layer, **args)
        values, scale = values[layer], scale[layer]
        offset = None if offset is None else offset[layer]
    else:
        got = kernel(x, q, scale, offset, layer=case.layer, **args)
        expected = quant_matmul_reference(x, q, scale, offset, layer=case.layer, **args)
        values, scale = values[case.layer], scale[case.layer]
        offset = None if offset is None else offset[case.layer]
    return got, expected, x, (values, scale, offset)


def assert_close(got, expected, dtype) -> None:
    expected = np.asarray(expected, np.float64)
    tol = TOLERANCE[dtype] * np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, atol=tol, rtol=0)


def test_pack_unpack_round_trip():
    values = jnp.asarray([[-8, 7, 0, -1], [3, -4, 5, 6]], jnp.int8)
    packed = pack_int4(values)
    assert packed.dtype == jnp.uint8 and packed.shape == (2, 2)
    # Low nibble holds the even element, high the odd one; nibble u stands for u - 8.
    assert np.asarray(packed)[0].tolist() == [0x0 | 0xF << 4, 0x8 | 0x7 << 4]
    rng = np.random.default_rng(0)
    many = jnp.asarray(rng.integers(-8, 8, size=(3, 5, 32)), jnp.int8)
    np.testing.assert_array_equal(np.asarray(unpack_int4(pack_int4(many))), np.asarray(many))


@pytest.mark.parametrize("bits, group_size, asymmetric, scale_dtype", [
    (4, 32, True, jnp.bfloat16), (8, 128, False, jnp.float16)])
def test_dequantize_matches_float64_oracle(bits, group_size, asymmetric, scale_dtype):
    case = Case(bits, group_size, asymmetric, 1, jnp.float32, scale_dtype, None, K=256, N=8)
    values, q, scale, offset = make_weights(np.random.default_rng(bits + group_size), case)
    got = dequantize(q, scale, offset, bits=bits, group_size=group_size)
    assert got.shape == values.shape and got.dtype == jnp.float32
    w = oracle_weight(values, scale, offset, group_size)
    np.testing.assert_allclose(np.asarray(got), w, rtol=1e-6, atol=1e-7)
    half = dequantize(q, scale, offset, bits=bits, group_size=group_size, dtype=jnp.bfloat16)
    assert half.dtype == jnp.bfloat16


def test_reference_matches_float64_oracle():
    case = Case(4, 32, True, 3, jnp.bfloat16, jnp.bfloat16, "traced", K=256, N=16)
    rng = np.random.default_rng(7)
    values, q, scale, offset = make_weights(rng, case)
    x = jnp.asarray(rng.normal(size=(3, 256)), jnp.bfloat16)
    got = jax.jit(lambda layer: quant_matmul_reference(
        x, q, scale, offset, bits=4, group_size=32, layer=layer, out_dtype=jnp.float32))(
        jnp.int32(1))
    expected = np.asarray(x, np.float64) @ oracle_weight(values[1], scale[1], offset[1], 32).T
    assert_close(got, expected, jnp.float32)
    default = quant_matmul_reference(x, q, scale, offset, bits=4, group_size=32, layer=0)
    assert default.dtype == jnp.bfloat16 and default.shape == (3, 16)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
def test_kernel_matches_reference_and_oracle(kernel, name):
    case = CASES[name]
    got, expected, x, (values, scale, offset) = run_case(kernel_for(kernel, case), case,
                                                         len(name))
    out_dtype = case.x_dtype if case.out_dtype is None else case.out_dtype
    assert got.shape == (case.tokens, case.N) and got.dtype == out_dtype
    # The reference dequantizes in float32; bf16 x meets it within bf16 weight rounding.
    assert_close(got, expected, jnp.float32 if case.x_dtype == jnp.float32 and
                 out_dtype == jnp.float32 else jnp.bfloat16)
    if out_dtype != jnp.float32:
        return
    # GPU: exact integers in the dot, scale after; TPU: weights rounded to x's dtype.
    round_to = case.x_dtype if kernel == "tpu" and case.x_dtype != jnp.float32 else None
    w = oracle_weight(values, scale, offset, case.group_size, round_to)
    assert_close(got, np.asarray(x, np.float64) @ w.T, jnp.float32)


def _llama_args(bits: int, tokens: int, asymmetric: bool):
    L, N, K, g = 32, 14336, 4096, 128
    packed = K // 2 if bits == 4 else K
    return (jax.ShapeDtypeStruct((tokens, K), jnp.bfloat16),
            jax.ShapeDtypeStruct((L, N, packed), jnp.uint8 if bits == 4 else jnp.int8),
            jax.ShapeDtypeStruct((L, N, K // g), jnp.bfloat16),
            jax.ShapeDtypeStruct((L, N, K // g), jnp.bfloat16) if asymmetric else None,
            jax.ShapeDtypeStruct((), jnp.int32))


def _lower(kernel, bits: int, tokens: int, asymmetric: bool, platform: str) -> str:
    f = lambda x, q, s, o, layer: kernel(x, q, s, o, bits=bits, group_size=128, layer=layer)
    return jax.jit(f).trace(*_llama_args(bits, tokens, asymmetric)).lower(
        lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("bits, tokens, asymmetric", [(4, 1, True), (8, 100, False)])
def test_gpu_kernel_lowers_to_triton(bits, tokens, asymmetric):
    device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                            platform="cuda")
    with use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=device)):
        text = _lower(quant_matmul_gpu, bits, tokens, asymmetric, "cuda")
    assert "xla.gpu.triton" in text
    assert f"num_warps = {gpu_tuning(tokens, bits)['num_warps']}" in text
    # The layer is picked inside the kernel: no slice of the stacked weights outside it.
    assert "dynamic_slice" not in text and "gather" not in text


@pytest.mark.parametrize("bits, tokens, asymmetric", [(4, 1, True), (8, 100, False)])
def test_tpu_kernel_lowers_to_mosaic(bits, tokens, asymmetric):
    """Jax-side lowering only: Mosaic's own layout passes run in the TPU compiler."""
    text = _lower(quant_matmul_tpu, bits, tokens, asymmetric, "tpu")
    assert "tpu_custom_call" in text
    assert "dynamic_slice" not in text and "gather" not in text


def _inputs(bits=4, K=256, N=32, g=32, L=None):
    lead = () if L is None else (L,)
    q = jnp.zeros((*lead, N, K // 2 if bits == 4 else K), jnp.uint8 if bits == 4 else jnp.int8)
    scale = jnp.ones((*lead, N, K // g), jnp.float32)
    return dict(x=jnp.ones((3, K), jnp.float32), q=q, scale=scale, offset=None, bits=bits,
                group_size=g)


BAD_INPUTS = {
    "bits": (dict(bits=3), "bits must be 4 or 8"),
    "group_size": (dict(group_size=48), "group_size must be one of"),
    "q_dtype": (dict(q=jnp.zeros((32, 128), jnp.int8)), "wants q of dtype uint8"),
    "packed_width": (dict(x=jnp.ones((3, 128), jnp.float32)), r"x must be \[T, K\] with K=256"),
    "k_not_group_multiple": (dict(q=jnp.zeros((32, 40), jnp.uint8)), "not a multiple of group"),
    "scale_shape": (dict(scale=jnp.ones((32, 4), jnp.float32)), r"scale must be .*\(32, 8\)"),
    "offset_shape": (dict(offset=jnp.ones((32, 9), jnp.float32)), "offset must be"),
    "scale_dtype": (dict(scale=jnp.ones((32, 8), jnp.int32)), "scale must be float32"),
    "x_dtype": (dict(x=jnp.ones((3, 256), jnp.int32)), "x must be float32"),
    "x_rank": (dict(x=jnp.ones((1, 3, 256), jnp.float32)), r"x must be \[T, K\]"),
    "stacked_without_layer": (_inputs(L=2), "pass `layer`"),
    "layer_unstacked": (dict(layer=0), "not stacked"),
    "layer_range": ({**_inputs(L=2), "layer": 2}, "out of range"),
    "layer_dtype": ({**_inputs(L=2), "layer": jnp.float32(1)}, "integer scalar"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
@pytest.mark.parametrize("kernel", [quant_matmul_reference, quant_matmul_gpu,
                                    quant_matmul_tpu])
def test_bad_inputs_raise(kernel, name):
    change, message = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=message):
        kernel(**{**_inputs(), **change})


@pytest.mark.parametrize("kernel", [quant_matmul_gpu, quant_matmul_tpu])
def test_empty_batch(kernel):
    inputs = _inputs()
    out = kernel(**{**inputs, "x": inputs["x"][:0]}, interpret=True)
    assert out.shape == (0, 32) and out.dtype == jnp.float32


def test_bad_packing_and_blocks_raise():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(jnp.asarray([[9, 0]], jnp.int8))
    with pytest.raises(ValueError, match="even last dim"):
        pack_int4(jnp.zeros((2, 3), jnp.int8))
    with pytest.raises(ValueError, match="multiple of 16"):  # compiled Triton, N = 24
        quant_matmul_gpu(**_inputs(N=24))
    with pytest.raises(ValueError, match="block_n=24 must be a power of two"):
        quant_matmul_gpu(**_inputs(N=48), block_n=24, interpret=True)
    with pytest.raises(ValueError, match="Mosaic tiles"):  # compiled Mosaic, K' not 128-wide
        quant_matmul_tpu(**_inputs(K=1024, N=256), block_k=128)


def test_tuning_fits_the_hardware():
    for (bits, bucket), t in GPU_TUNING.items():
        assert all(b & (b - 1) == 0 for b in (t["block_t"], t["block_n"], t["block_k"]))
        assert t["block_t"] >= 16 and (bucket is None or t["block_t"] <= bucket)
        smem = gpu_shared_memory_bytes(block_t=t["block_t"], block_n=t["block_n"],
                                       block_k=t["block_k"], bits=bits, x_itemsize=2,
                                       num_stages=t["num_stages"])
        assert smem <= GPU_SHARED_MEMORY_BYTES, (bits, bucket, smem)
    for (bits, bucket), t in TPU_TUNING.items():
        assert t["block_t"] % 16 == 0 and t["block_n"] % 128 == 0
        assert (t["block_k"] * bits // 8) % 128 == 0
        vmem = tpu_vmem_bytes(block_t=t["block_t"], block_n=t["block_n"], block_k=t["block_k"],
                              bits=bits, x_itemsize=4, scale_groups=128, scale_itemsize=4,
                              has_offset=True, out_itemsize=4)
        assert vmem <= 32 * 2**20, (bits, bucket, vmem)
    assert gpu_tuning(1, 4)["block_t"] == 16 and gpu_tuning(1000, 8) == GPU_TUNING[(8, None)]
    assert tpu_tuning(17, 4) == TPU_TUNING[(4, 64)]


def _halves_case(tokens: int, g: int, asymmetric: bool, dtype, seed: int):
    rng = np.random.default_rng(seed)
    L, N, K = 3, 64, 512
    q = jnp.asarray(rng.integers(0, 256, (L, N, K // 2)), jnp.uint8)
    scale = jnp.asarray(rng.uniform(0.01, 0.02, (L, N, K // g)), jnp.float32)
    offset = (jnp.asarray(rng.uniform(-0.05, 0.05, (L, N, K // g)), jnp.float32)
              if asymmetric else None)
    x = jnp.asarray(rng.normal(size=(tokens, K)), dtype)
    return x, q, scale, offset


@pytest.mark.parametrize("tokens, g, asymmetric", [(1, 32, False), (5, 128, True)])
def test_halves_layout_matches_reference(tokens, g, asymmetric):
    """The rearranged nibble layout gives the reference's result on the original weights."""
    x, q, scale, offset = _halves_case(tokens, g, asymmetric, jnp.float32, tokens + g)
    got = quant_matmul_gpu(x, to_halves_layout(q, g), scale, offset, bits=4, group_size=g,
                           layer=2, interpret=True, nibbles="halves")
    expected = quant_matmul_reference(x, q, scale, offset, bits=4, group_size=g, layer=2)
    assert_close(got, expected, jnp.float32)
    # The layout really differs: the interleaved kernel on it is wrong.
    wrong = quant_matmul_gpu(x, to_halves_layout(q, g), scale, offset, bits=4, group_size=g,
                             layer=2, interpret=True)
    assert float(jnp.max(jnp.abs(wrong - expected))) > 1e-2
    # Within one group: the first half of the columns in the low nibbles.
    values = unpack_int4(q[0, 0, : g // 2])
    lo = (to_halves_layout(q, g)[0, 0, : g // 2] & 0xF).astype(jnp.int8) - 8
    np.testing.assert_array_equal(np.asarray(lo), np.asarray(values[: g // 2]))
    with pytest.raises(ValueError, match="nibbles"):
        quant_matmul_gpu(x, q, scale, offset, bits=4, group_size=g, layer=2, nibbles="odd")


def test_halves_layout_lowers_to_triton():
    device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                            platform="cuda")
    f = lambda x, q, s, o, layer: quant_matmul_gpu(x, q, s, o, bits=4, group_size=128,  # noqa: E731
                                                   layer=layer, nibbles="halves")
    with use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=device)):
        text = jax.jit(f).trace(*_llama_args(4, 1, False)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 16])
def test_halves_layout_compiled(tokens):
    x, q, scale, offset = _halves_case(tokens, 128, True, jnp.bfloat16, tokens)
    got = quant_matmul_gpu(x, to_halves_layout(q, 128), scale, offset, bits=4, group_size=128,
                           layer=1, nibbles="halves")
    expected = quant_matmul_reference(x, q, scale, offset, bits=4, group_size=128, layer=1)
    assert_close(got, expected, jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits, tokens", [(4, 1), (4, 40), (8, 16), (8, 200)])
def test_gpu_kernel_compiled(bits, tokens):
    """The Triton kernel compiled for the card (run by scripts/gpu_check.sh)."""
    case = Case(bits, 128, True, tokens, jnp.bfloat16, jnp.bfloat16, "traced", K=1024, N=512)
    got, expected, _, _ = run_case(quant_matmul_gpu, case, bits + tokens)
    assert_close(got, expected, jnp.bfloat16)
