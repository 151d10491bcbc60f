"""Group-wise int8/int4 quantization against a float64 oracle, int4 packing, schemes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.config import ModelConfig
from jaxinfer.errors import ConfigError
from jaxinfer.quant.format import (
    QuantizedWeight,
    QuantScheme,
    check_quantized,
    dequantize,
    dequantize_np,
    pack_int4_np,
    parse_scheme,
    scheme_label,
    unpack_int4_np,
)
from jaxinfer.quant.matmul import quant_dense
from jaxinfer.quant.quantize import group_size_for, quantize_array


def _weights(shape, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    w.flat[::37] *= 8.0  # outliers: a group's scale must follow its own range
    w[..., :16] = 0.25  # a constant group (zero range for the asymmetric scheme)
    return w


def _oracle(w, bits, g, symmetric):
    """Float64 reference: the quantized values and the half-step error bound per element."""
    w64 = w.astype(np.float64)
    groups = w64.reshape(*w.shape[:-1], -1, g)
    half = 2 ** (bits - 1)
    if symmetric:
        step = np.abs(groups).max(-1) / (half - 1)
        low = np.zeros_like(step)
    else:
        low = groups.min(-1)
        step = (groups.max(-1) - low) / (2 * half - 1)
    return step, low


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_error_within_half_step(bits, group, symmetric):
    w = _weights((2, 6, 256))
    qw = quantize_array(w, QuantScheme(bits, group, symmetric, method="rtn"))
    check_quantized(qw)
    assert qw.shape == w.shape and qw.group_size == group
    assert (qw.offset is None) == symmetric
    step, _ = _oracle(w, bits, group, symmetric)
    np.testing.assert_allclose(qw.scale, step, rtol=1e-6, atol=0)
    got = dequantize_np(qw).astype(np.float64)
    bound = np.repeat(step, group, axis=-1) / 2
    err = np.abs(got - w.astype(np.float64))
    assert np.all(err <= bound * (1 + 1e-5) + 1e-6), float((err - bound).max())
    # Round to nearest: the error is not uniformly at the bound (a truncating quantizer is).
    assert err.mean() < 0.6 * bound.mean()
    q = unpack_int4_np(qw.q) if bits == 4 else qw.q
    if symmetric:
        assert np.abs(q).max() <= 2 ** (bits - 1) - 1
    else:  # the group's min and max are hit exactly (up to float32 rounding)
        groups = got.reshape(2, 6, -1, group)
        np.testing.assert_allclose(groups.min(-1), w.reshape(2, 6, -1, group).min(-1),
                                   atol=1e-5)
    # The device dequantization equals the host one.
    np.testing.assert_allclose(np.asarray(dequantize(jax.tree.map(jnp.asarray, qw))), got,
                               atol=1e-6, rtol=0)


def _group_sq_error(qw, w, a=None):
    err = np.square(dequantize_np(qw).astype(np.float64) - w)
    err = err if a is None else err * a
    return err.reshape(*w.shape[:-1], -1, qw.group_size).sum(-1)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_search_never_worse_than_round_to_nearest(bits, symmetric):
    """The clipping search keeps round to nearest among its candidates, so every group's
    error, weighted as the search weighs it without calibration (w^2 + the group's mean
    w^2), is at most round to nearest's (and clearly lower overall for 4 bits)."""
    w = _weights((2, 6, 256))
    w[0, 0, 16:32] = 0.0  # an all-zero group (and w[..., :16] a constant one)
    mse = quantize_array(w, QuantScheme(bits, 16, symmetric, method="mse"))
    rtn = quantize_array(w, QuantScheme(bits, 16, symmetric, method="rtn"))
    check_quantized(mse)
    assert (mse.offset is None) == symmetric and mse.scale.dtype == np.float32
    w2 = np.square(w.astype(np.float64)).reshape(2, 6, -1, 16)
    a = (w2 + w2.mean(-1, keepdims=True)).reshape(w.shape)
    e_mse, e_rtn = _group_sq_error(mse, w, a), _group_sq_error(rtn, w, a)
    assert np.all(e_mse <= e_rtn * (1 + 1e-4) + 1e-9)
    if bits == 4:
        assert e_mse.sum() < 0.9 * e_rtn.sum()
    got = dequantize_np(mse)
    np.testing.assert_array_equal(got[..., :16], w[..., :16])  # constant group: exact
    np.testing.assert_array_equal(got[0, 0, 16:32], 0.0)
    q = unpack_int4_np(mse.q) if bits == 4 else mse.q
    assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1


def test_importance_weights_the_error():
    """With per-feature importance the weighted error drops below the unweighted search's,
    and round to nearest ignores the importance."""
    w = _weights((1, 32, 128), seed=3)
    a = np.random.default_rng(4).lognormal(0.0, 2.0, 128).astype(np.float32)
    plain = quantize_array(w, "int4-g64-asym")
    weighted = quantize_array(w, "int4-g64-asym", importance=a)
    assert _group_sq_error(weighted, w, a).sum() < 0.9 * _group_sq_error(plain, w, a).sum()
    rtn = quantize_array(w, "int4-g64-asym-rtn")
    np.testing.assert_array_equal(quantize_array(w, "int4-g64-asym-rtn", importance=a).q, rtn.q)


def test_int4_nibble_order():
    q = np.array([[1, -8, 7, 0]], np.int8)
    packed = pack_int4_np(q)
    assert packed.tolist() == [[0x09, 0x8F]]  # element 2j low nibble, 2j+1 high; u = q + 8
    np.testing.assert_array_equal(unpack_int4_np(packed), q)


def test_group_size_falls_back_to_a_divisor():
    assert group_size_for(1536, 128) == 128
    assert group_size_for(576, 128) == 64  # SmolLM2's hidden width
    with pytest.raises(ConfigError, match="divides"):
        group_size_for(40, 16)
    with pytest.raises(ConfigError, match="does not divide"):
        quantize_array(np.ones((4, 576), np.float32), "int8-g128", exact_group=True)


def test_schemes_parse_and_bad_ones_are_refused():
    assert parse_scheme("int8") == QuantScheme(8, 128, True, method="rtn")
    assert parse_scheme("INT4-g64-asym") == QuantScheme(4, 64, False, method="mse")
    assert scheme_label("int4-g32") == "int4-g32-sym"  # mse: the 4-bit default
    assert parse_scheme("int4-g32-asym-rtn").method == "rtn"
    assert scheme_label("int4-rtn") == "int4-g128-sym-rtn"
    assert scheme_label("int8-mse-head8") == "int8-g128-sym-mse"
    assert parse_scheme("int4").head.method == "rtn"  # 8-bit head: its own default
    assert parse_scheme("int4-head4").head.method == "mse"
    assert scheme_label("gguf") == "gguf" and scheme_label(None) is None
    assert parse_scheme("int4").head == QuantScheme(8, 128, True)  # 8-bit embedding / head
    assert parse_scheme("int4-g32-asym-head4").head_bits == 4
    for bad, hint in [("fp8", "unknown quantization scheme"), ("int4-g64-foo", "int4-g64"),
                      ("int3", "bits=3"), ("int4-g100", "group size 100"),
                      ("int4-gptq", "int4-g64")]:
        with pytest.raises(ConfigError, match=hint):
            parse_scheme(bad)


def test_check_quantized_names_the_problem():
    qw = quantize_array(np.ones((4, 64), np.float32), "int8-g32")
    with pytest.raises(ConfigError, match="scale has shape"):
        check_quantized(qw.replace(scale=qw.scale[:, :1]), "layers.wo")
    with pytest.raises(ConfigError, match="stores q as uint8"):
        check_quantized(qw.replace(bits=4), "layers.wo")


@pytest.mark.parametrize("scheme", ["int8-g32", "int4-g16-asym"])
def test_xla_quant_dense_matches_float64(scheme):
    w = _weights((3, 24, 64), seed=1)
    qw = jax.tree.map(jnp.asarray, quantize_array(w, scheme))
    x = np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32)
    cfg = ModelConfig(family="llama", vocab_size=8, hidden_size=64, intermediate_size=64,
                      num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                      max_position_embeddings=64)
    got = jax.jit(quant_dense, static_argnums=0)(cfg, jnp.asarray(x), qw, jnp.int32(1))
    want = x.astype(np.float64) @ dequantize_np(jax.device_get(qw))[1].astype(np.float64).T
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-5)
    assert isinstance(qw[None], QuantizedWeight) and qw[None].shape == (1, 3, 24, 64)
