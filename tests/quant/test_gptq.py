"""GPTQ (jaxinfer.quant.gptq): output error against round to nearest and the clipping search
on a correlated random calibration set, the packed format, the H = I limit, bad inputs, and
the Gram calibration feeding `quantize_params`."""

from __future__ import annotations

import numpy as np
import pytest

from jaxinfer.errors import ConfigError
from jaxinfer.quant.format import (
    QuantizedWeight,
    check_quantized,
    dequantize_np,
    parse_scheme,
    unpack_int4_np,
)
from jaxinfer.quant.gptq import gptq_quantize, inverse_cholesky, refit_grids
from jaxinfer.quant.quantize import quantize_array

N, K, T = 48, 256, 1024


def _problem(seed=0):
    """W [N, K], calibration inputs X [T, K] with correlated features of unequal scales, and
    H = X^T X / T."""
    rng = np.random.default_rng(seed)
    mix = np.eye(K) + 2.0 * rng.standard_normal((K, K)) / np.sqrt(K)
    x = (rng.standard_normal((T, K)) @ mix) * np.exp(rng.standard_normal(K))
    w = rng.standard_normal((N, K)).astype(np.float32)
    w.flat[::53] *= 6.0  # outliers
    return w, x, x.T @ x / T


def _output_error(x, w, qw):
    return float(np.linalg.norm(x @ (w.astype(np.float64) - dequantize_np(qw)).T))


@pytest.mark.parametrize("scheme", ["int4-g128-asym", "int4-g64", "int8-g64-mse"])
def test_output_error_below_rtn_and_clipping_search(scheme):
    w, x, h = _problem()
    gptq = _output_error(x, w, gptq_quantize(w, h, scheme))
    method = parse_scheme(scheme).method
    rtn = _output_error(x, w, quantize_array(w, scheme.replace(f"-{method}", "") + "-rtn"))
    search = _output_error(x, w, quantize_array(w, scheme, importance=np.diag(h)))
    assert gptq < 0.9 * search < 0.9 * rtn, (gptq, search, rtn)
    # With round-to-nearest grids GPTQ still beats round to nearest.
    rtn_scheme = scheme.replace(f"-{method}", "") + "-rtn"
    assert _output_error(x, w, gptq_quantize(w, h, rtn_scheme)) < 0.9 * rtn


@pytest.mark.parametrize("scheme", ["int4-g128-asym", "int4-g64", "int4-g64-asym-rtn"])
def test_act_order_and_refit_lower_the_output_error(scheme):
    """Act order (static groups) moves the most active inputs' error onto the rest; each
    refit round's least-squares grids never raise the error of the codes they refit."""
    w, x, h = _problem()
    plain = _output_error(x, w, gptq_quantize(w, h, scheme))
    ordered = _output_error(x, w, gptq_quantize(w, h, scheme, act_order=True))
    assert ordered < 0.9 * plain, (ordered, plain)
    for act_order, before in ((False, plain), (True, ordered)):
        once = _output_error(x, w, gptq_quantize(w, h, scheme, act_order=act_order, refit=1))
        assert once <= before * (1 + 1e-6), (act_order, once, before)
    twice = _output_error(x, w, gptq_quantize(w, h, scheme, act_order=True, refit=2))
    assert twice < ordered, (twice, ordered)


@pytest.mark.parametrize("scheme", ["int4-g64-asym-rtn", "int4-g32-rtn", "int8-rtn"])
def test_act_order_with_identity_gram_is_round_to_nearest(scheme):
    """H = I: every diag ties (the input order is kept) and the static grids are the group
    quantizer's, so act order changes nothing."""
    w, _, _ = _problem(2)
    qw, ref = gptq_quantize(w, np.eye(K), scheme, act_order=True), quantize_array(w, scheme)
    np.testing.assert_array_equal(qw.q, ref.q)
    np.testing.assert_array_equal(qw.scale, ref.scale)


def test_act_order_permutes_per_matrix():
    """Stacked matrices each sweep in their own act order: as each alone. (Not bit-equal:
    XLA's batched clipping search rounds differently in the last bit, which flips a
    near-tie between candidate grids in a few rows.)"""
    w, x, h = _problem(6)
    stacked, grams = np.stack([w, w[:, ::-1]]), np.stack([h, h[::-1, ::-1]])
    qw = gptq_quantize(stacked, grams, "int4-g64-asym", act_order=True, refit=1)
    inputs = (x, x[:, ::-1])
    for i in range(2):
        alone = gptq_quantize(stacked[i], grams[i], "int4-g64-asym", act_order=True, refit=1)
        assert np.mean(unpack_int4_np(qw.q[i]) == unpack_int4_np(alone.q)) > 0.97
        one = QuantizedWeight(q=qw.q[i], scale=qw.scale[i], offset=qw.offset[i], bits=4,
                              group_size=64)
        np.testing.assert_allclose(_output_error(inputs[i], stacked[i], one),
                                   _output_error(inputs[i], stacked[i], alone), rtol=0.02)


@pytest.mark.parametrize("symmetric", [True, False])
def test_refit_recovers_exact_grids(symmetric):
    """Weights that lie exactly on a grid: refitting a perturbed grid to their codes finds
    the exact one (float64 oracle: the weights themselves)."""
    rng = np.random.default_rng(7)
    g, G = 32, K // 32
    codes = rng.integers(-8 if symmetric else 0, 8 if symmetric else 16, (1, N, K))
    scale = rng.uniform(0.01, 0.1, (1, N, G))
    low = np.zeros_like(scale) if symmetric else rng.uniform(-0.5, 0.0, (1, N, G))
    w = codes * np.repeat(scale, g, -1) + np.repeat(low, g, -1)
    _, _, h = _problem(8)
    s2, l2 = refit_grids(w, codes, scale * 1.1, low + (0 if symmetric else 0.01), h[None], g,
                         symmetric=symmetric, damp=0.0)
    np.testing.assert_allclose(s2, scale, rtol=2e-3)
    np.testing.assert_allclose(l2, low, atol=2e-4)


@pytest.mark.parametrize("scheme", ["int4-g32-asym", "int4-g128", "int8-g64-asym-rtn"])
def test_result_is_a_valid_packed_weight(scheme):
    w, _, h = _problem(1)
    stacked = np.stack([w, -w[::-1]])  # leading (layer) axes with one H each
    grams = np.stack([h, h[::-1, ::-1]])
    qw = gptq_quantize(stacked, grams, scheme)
    check_quantized(qw)
    s = parse_scheme(scheme)
    G = K // s.group_size
    assert qw.shape == (2, N, K) and qw.bits == s.bits and qw.group_size == s.group_size
    assert qw.scale.shape == (2, N, G) and qw.scale.dtype == np.float32
    assert (qw.offset is None) == s.symmetric
    if qw.offset is not None:
        assert qw.offset.shape == (2, N, G)
    if s.bits == 4:
        assert qw.q.shape == (2, N, K // 2) and qw.q.dtype == np.uint8
        codes = unpack_int4_np(qw.q)
        assert codes.min() >= -8 and codes.max() <= 7
    else:
        assert qw.q.dtype == np.int8 and qw.q.shape == (2, N, K)
    # Each stacked matrix is quantized under its own H: the same as quantizing it alone.
    alone = gptq_quantize(stacked[1], grams[1], scheme)
    np.testing.assert_array_equal(qw.q[1], alone.q)


@pytest.mark.parametrize("scheme", ["int4-g64-asym-rtn", "int4-g32-rtn", "int8-rtn",
                                    "int8-g64-asym"])
def test_identity_gram_is_round_to_nearest(scheme):
    """H = I: no error is moved, so each group is the group quantizer's own result."""
    w, _, _ = _problem(2)
    qw, ref = gptq_quantize(w, np.eye(K), scheme), quantize_array(w, scheme)
    np.testing.assert_array_equal(qw.q, ref.q)
    np.testing.assert_array_equal(qw.scale, ref.scale)
    if ref.offset is not None:
        np.testing.assert_array_equal(qw.offset, ref.offset)


def test_identity_gram_with_the_search_matches_the_search():
    w, _, _ = _problem(3)
    qw = gptq_quantize(w, 4.0 * np.eye(K), "int4-g64-asym")
    ref = quantize_array(w, "int4-g64-asym", importance=np.ones(K))
    # The same codes; the fitted grids differ only by float rounding (weights 1.01 vs 1).
    assert np.mean(unpack_int4_np(qw.q) == unpack_int4_np(ref.q)) > 0.999
    np.testing.assert_allclose(dequantize_np(qw), dequantize_np(ref), rtol=1e-4, atol=1e-5)


def test_dead_inputs_and_damp():
    """A feature never active (diag 0) is decoupled: its weights are rounded, not moved onto
    others, and H without any live feature is treated as I."""
    w, x, _ = _problem(4)
    x[:, 5] = 0.0
    h = x.T @ x / T
    u = inverse_cholesky(h[None])[0].astype(np.float64)
    assert np.allclose(u, np.triu(u)) and np.all(u[5, 6:] == 0.0) and np.all(u[:5, 5] == 0.0)
    damped = h + 0.01 * np.mean(np.diag(h)[np.diag(h) > 0]) * np.eye(K)
    damped[5, 5] += 1.0  # a dead input: diag 1, then dampened
    np.testing.assert_allclose(u.T @ u @ damped, np.eye(K), atol=1e-4)  # float32 LAPACK
    qw = gptq_quantize(w, h, "int4-g64-asym")
    assert np.isfinite(dequantize_np(qw)).all()
    zero = gptq_quantize(w, np.zeros((K, K)), "int4-g64-asym-rtn")
    np.testing.assert_array_equal(zero.q, quantize_array(w, "int4-g64-asym-rtn").q)


def test_bad_inputs_raise():
    w, _, h = _problem(5)
    with pytest.raises(ConfigError, match="expected"):
        gptq_quantize(w, h[:-1, :-1], "int4")
    with pytest.raises(ConfigError, match="expected"):
        gptq_quantize(np.stack([w, w]), h, "int4")
    with pytest.raises(ConfigError, match="finite"):
        gptq_quantize(w, np.where(np.eye(K) > 0, np.nan, h), "int4")
    with pytest.raises(ConfigError, match="damp"):
        gptq_quantize(w, h, "int4", damp=-1.0)
    with pytest.raises(ConfigError, match="refit"):
        gptq_quantize(w, h, "int4", refit=-1)
    with pytest.raises(ConfigError, match="positive definite"):
        bad = h.copy()
        bad[0, 1] = bad[1, 0] = 10 * np.sqrt(bad[0, 0] * bad[1, 1])  # indefinite
        gptq_quantize(w, bad, "int4", damp=0.0)
    with pytest.raises(ConfigError, match="weight"):
        gptq_quantize(w[0], h, "int4")
    with pytest.raises(ConfigError, match="bits=5"):
        gptq_quantize(w, h, "int5")
    with pytest.raises(ConfigError, match="divide"):
        gptq_quantize(w[:, :96], h[:96, :96], "int4-g64", exact_group=True)


def test_grams_calibration_feeds_quantize_params():
    """`activation_grams` gives E[x x^T] of each projection's input (layer 0's wqkv input is
    the normed embedding); with it `quantize_params(..., grams=)` quantizes the projections
    by GPTQ, each under its own layer's H."""
    from jaxinfer.model.layers import rms_norm
    from jaxinfer.model.params import init_params
    from jaxinfer.quant import quantize_params
    from jaxinfer.quant.calibrate import activation_grams
    from tests.quant.test_quant_model import PAGE, TINY, _tokens

    dense = init_params(TINY, seed=3, scale=0.3)
    windows = [_tokens(TINY, 9, seed=1), _tokens(TINY, 5, seed=2)]
    grams = activation_grams(dense, TINY, windows, page_size=PAGE)
    assert set(grams) == {"wqkv", "wo", "w_gate_up", "w_down"}
    assert grams["w_down"].shape == (TINY.num_layers, TINY.intermediate_size,
                                     TINY.intermediate_size)
    h = np.asarray(rms_norm(np.asarray(dense.embed)[np.concatenate(windows)],
                            dense.layers.attn_norm[0], TINY.rms_norm_eps,
                            TINY.norm_weight_offset), np.float64)
    np.testing.assert_allclose(grams["wqkv"][0], h.T @ h / len(h), rtol=1e-4, atol=1e-6)
    params = quantize_params(dense, "int4-g32-asym-rtn", grams=grams)
    w_down = params.layers.w_down
    assert w_down.bits == 4 and w_down.group_size == 32
    direct = gptq_quantize(np.asarray(dense.layers.w_down), grams["w_down"], "int4-g32-asym-rtn")
    np.testing.assert_array_equal(np.asarray(w_down.q), direct.q)
    with pytest.raises(ConfigError, match="projections"):
        quantize_params(dense, "int4", grams={"embed": grams["wqkv"]})


def test_sequential_gptq_calibrates_on_the_quantized_model():
    """Sequential GPTQ quantizes each projection from the Gram matrix of its input as the
    model quantized so far computes it. Oracle: the plain calibration (`activation_grams`)
    of a dense model holding the already-quantized projections dequantized, then GPTQ of the
    projection under that H."""
    import jax

    from jaxinfer.model.params import init_params
    from jaxinfer.quant.calibrate import activation_grams
    from jaxinfer.quant.sequential import sequential_gptq
    from tests.quant.test_quant_model import PAGE, TINY, _tokens

    scheme = "int4-g32-asym"
    dense = init_params(TINY, seed=4, scale=0.3)
    windows = [_tokens(TINY, 24, seed=1), _tokens(TINY, 17, seed=2)]
    seq = sequential_gptq(dense, TINY, windows, scheme, page_size=PAGE)
    assert seq.embed.bits == 8  # the embedding / head as quantize_params quantizes them

    def field(params, name):
        return jax.tree.map(np.asarray, getattr(params.layers, name))

    def with_dequantized(names):
        """The dense model with layer 0's `names` (and all of layer 0 for "layer1")
        replaced by the sequential result, dequantized."""
        updates = {}
        for name in ("wqkv", "wo", "w_gate_up", "w_down"):
            value = np.array(getattr(dense.layers, name))
            if name in names:
                value[0] = dequantize_np(field(seq, name))[0]
            updates[name] = value
        return dense.replace(layers=dense.layers.replace(**updates))

    def codes(qw, layer):
        return unpack_int4_np(np.asarray(qw.q[layer]))

    plain = activation_grams(dense, TINY, windows, page_size=PAGE)
    cases = [(0, "wqkv", ()), (0, "wo", ("wqkv",)), (0, "w_down", ("wqkv", "wo", "w_gate_up")),
             (1, "wqkv", ("wqkv", "wo", "w_gate_up", "w_down"))]
    for layer, name, before in cases:
        grams = activation_grams(with_dequantized(before), TINY, windows, page_size=PAGE)
        h = grams[name][layer]
        if before:  # the quantized inputs really differ from the dense model's
            assert np.abs(h - plain[name][layer]).max() > 1e-3 * np.abs(h).max(), name
        expected = gptq_quantize(np.asarray(getattr(dense.layers, name))[layer], h, scheme)
        got = field(seq, name)
        agree = np.mean(codes(got, layer) == unpack_int4_np(expected.q))
        assert agree > 0.98, (layer, name, agree)
        close = np.isclose(got.scale[layer], expected.scale, rtol=1e-3, atol=1e-5)
        assert close.mean() > 0.98, (layer, name, close.mean())
    with pytest.raises(ConfigError, match="window"):
        sequential_gptq(dense, TINY, [], scheme)


def test_grid_tuning_lowers_the_distillation_kl_and_keeps_the_codes():
    """`tune_grids` trains only the grids: the codes are untouched, the format unchanged, and
    the KL to the dense model on the calibration windows falls (measured after tuning, on
    every window, against the KL before)."""
    import jax
    import jax.numpy as jnp

    from jaxinfer.model.params import init_params
    from jaxinfer.quant import quantize_params
    from jaxinfer.quant.tune import apply_grid_deltas, distillation_kl, grid_deltas, tune_grids
    from jaxinfer.train.step import packed_logits
    from tests.quant.test_quant_model import TINY, _tokens

    dense = init_params(TINY, seed=5, scale=0.3)
    quantized = quantize_params(dense, "int4-g32-asym-rtn")
    windows = [_tokens(TINY, 24, seed=s) for s in range(4)]
    batch = jnp.asarray(windows, jnp.int32)

    def kl(params):
        seg = jnp.ones_like(batch)
        return float(distillation_kl(packed_logits(dense, TINY, batch, seg),
                                     packed_logits(params, TINY, batch, seg)))

    unchanged = apply_grid_deltas(quantized, grid_deltas(quantized))
    assert kl(unchanged) == pytest.approx(kl(quantized), rel=1e-6)
    tuned, history = tune_grids(quantized, dense, TINY, windows, steps=30, batch_windows=2,
                                learning_rate=1e-2)
    assert len(history) == 30 and all(np.isfinite(history))
    assert kl(tuned) < 0.8 * kl(quantized), (kl(tuned), kl(quantized))
    for name in ("wqkv", "wo", "w_gate_up", "w_down"):
        before, after = getattr(quantized.layers, name), getattr(tuned.layers, name)
        np.testing.assert_array_equal(np.asarray(before.q), np.asarray(after.q))
        assert after.scale.shape == before.scale.shape and after.scale.dtype == before.scale.dtype
        assert not np.array_equal(np.asarray(before.scale), np.asarray(after.scale))
    assert jax.tree.structure(tuned) == jax.tree.structure(quantized)
    with pytest.raises(ConfigError, match="quantize first"):
        tune_grids(dense, dense, TINY, windows)
    with pytest.raises(ConfigError, match="one length"):
        tune_grids(quantized, dense, TINY, [windows[0], windows[1][:10]])
