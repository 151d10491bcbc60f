"""The native CPU group-quantized matmul against a float64 numpy oracle of the dequantized
weight, for both bit widths, symmetric and asymmetric groups, every scale dtype it reads,
each code path (one token, register tiles, a partial tile) and a traced layer.

Dimension legend: L layers, N output features, K input features, T tokens, G groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import cpu_kernels
from jaxinfer.errors import ConfigError


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu_kernels.available(), "the native CPU kernels failed to build (see the log)"


def make_weight(rng, L, N, K, bits, group_size, scale_dtype, asymmetric):
    """Random q, scale, offset in the shared format, and the float64 weight they stand for
    (from the stored, rounded scale/offset values)."""
    lo, hi = (-128, 128) if bits == 8 else (-8, 8)
    values = rng.integers(lo, hi, size=(L, N, K))
    if bits == 8:
        q = values.astype(np.int8)
    else:  # element 2j in the low nibble of byte j, 2j + 1 in the high one; nibble u = q + 8
        nibbles = (values + 8).astype(np.uint8)
        q = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    G = K // group_size
    scale = jnp.asarray(rng.uniform(0.01, 0.1, (L, N, G)).astype(np.float32), scale_dtype)
    offset = (jnp.asarray(rng.normal(0, 0.3, (L, N, G)).astype(np.float32), scale_dtype)
              if asymmetric else None)
    expand = lambda a: np.repeat(np.asarray(a.astype(jnp.float32), np.float64), group_size, -1)  # noqa: E731
    w = values * expand(scale) + (expand(offset) if asymmetric else 0.0)
    return q, scale, offset, w


def check(got, x, w):
    """|error| within f32 accumulation of the products: 1e-5 of sum |x_k| |W_nk| per output."""
    x64 = np.asarray(x, np.float64)
    expected = x64 @ w.T
    bound = 1e-5 * (np.abs(x64) @ np.abs(w).T) + 1e-30
    got = np.asarray(got)
    assert got.shape == expected.shape and got.dtype == np.float32
    worst = np.max(np.abs(got - expected) / bound)
    assert worst <= 1.0, f"error {worst:.2f}x the f32 accumulation bound"


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("group_size,scale_dtype", [(32, jnp.float16), (64, jnp.float32),
                                                    (128, jnp.float16), (16, jnp.float32)])
@pytest.mark.parametrize("rows", [1, 3, 8, 17])  # one token; tiles of 3; 6 + 2; 2 x 6 + 5
def test_matches_float64(bits, asymmetric, group_size, scale_dtype, rows):
    rng = np.random.default_rng([bits, asymmetric, group_size, rows])
    L, N, K = 3, 37, 256  # N = 9 tiles of 4 rows + 1, split over threads unevenly
    q, scale, offset, w = make_weight(rng, L, N, K, bits, group_size, scale_dtype, asymmetric)
    x = rng.standard_normal((rows, K)).astype(np.float32)
    got = cpu_kernels.quant_linear(x, q, scale, offset, 2, bits=bits, group_size=group_size)
    check(got, x, w[2])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 5])
def test_width_not_multiple_of_64_and_bfloat16(bits, rows):
    rng = np.random.default_rng([bits, rows, 96])
    q, scale, offset, w = make_weight(rng, 2, 11, 96, bits, 32, jnp.bfloat16, True)
    x = rng.standard_normal((rows, 96)).astype(np.float32)
    check(cpu_kernels.quant_linear(x, q, scale, offset, 1, bits=bits, group_size=32), x, w[1])


def test_mixed_scale_and_offset_dtypes():
    rng = np.random.default_rng(7)
    q, scale, offset, w = make_weight(rng, 1, 8, 64, 4, 32, jnp.float16, True)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    check(cpu_kernels.quant_linear(x, q, scale, offset.astype(jnp.float32), 0, bits=4,
                                   group_size=32), x, w[0])


@pytest.mark.parametrize("bits", [8, 4])
def test_traced_layer_under_jit_and_scan(bits):
    rng = np.random.default_rng(bits)
    L, N, K = 4, 24, 128
    q, scale, offset, w = make_weight(rng, L, N, K, bits, 32, jnp.float16, True)
    x = rng.standard_normal((2, K)).astype(np.float32)

    @jax.jit
    def every_layer(x, q, scale, offset):
        def body(carry, layer):
            y = cpu_kernels.quant_linear(x, q, scale, offset, layer, bits=bits, group_size=32)
            return carry, y
        return jax.lax.scan(body, 0, jnp.arange(L, dtype=jnp.int32))[1]

    got = every_layer(x, q, scale, offset)
    for layer in range(L):
        check(got[layer], x, w[layer])


def test_layer_out_of_range_fails_at_run_time():
    rng = np.random.default_rng(0)
    q, scale, _, _ = make_weight(rng, 2, 4, 32, 8, 32, jnp.float32, False)
    with pytest.raises(Exception, match="layer out of range"):
        jax.block_until_ready(cpu_kernels.quant_linear(np.ones((1, 32), np.float32), q, scale,
                                                       None, 5, bits=8, group_size=32))


def bad_inputs():
    rng = np.random.default_rng(0)
    q8, s, o, _ = make_weight(rng, 2, 4, 64, 8, 32, jnp.float32, True)
    q4, *_ = make_weight(rng, 2, 4, 64, 4, 32, jnp.float32, True)
    x = np.ones((1, 64), np.float32)
    return {
        "bits=3": (x, q8, s, o, dict(bits=3, group_size=32)),
        "group_size=48": (x, q8, s, o, dict(bits=8, group_size=48)),
        "must be float32": (x.astype(np.float16), q8, s, o, dict(bits=8, group_size=32)),
        "multiple of 32": (np.ones((1, 48), np.float32), q8[..., :48], s, o,
                           dict(bits=8, group_size=16)),
        "needs q as int8": (x, q4, s, o, dict(bits=8, group_size=32)),
        "needs q as uint8": (x, q8, s, o, dict(bits=4, group_size=32)),
        "does not match x's K": (x, q8[..., :32], s, o, dict(bits=8, group_size=32)),
        "scale shape": (x, q8, s[..., :1], o, dict(bits=8, group_size=32)),
        "offset dtype": (x, q8, s, o.astype(np.int32), dict(bits=8, group_size=32)),
    }


@pytest.mark.parametrize("problem", list(bad_inputs()))
def test_bad_inputs_raise_clear_errors(problem):
    x, q, s, o, kwargs = bad_inputs()[problem]
    with pytest.raises(ConfigError, match=problem):
        cpu_kernels.quant_linear(x, q, s, o, 0, **kwargs)


def test_max_rows_is_positive():
    assert 1 <= cpu_kernels.quant_linear_max_rows() <= 64
