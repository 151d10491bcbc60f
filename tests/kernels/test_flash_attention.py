"""Flash attention kernels (GPU/Triton and TPU/Mosaic, run interpreted) against the reference.

Cases pack several sequences of ragged lengths (1-token ones included) into one stream with
trailing padding, so T is never a multiple of the blocks; small explicit blocks force several
query and key blocks, which exercises the block skipping. The reference itself is checked
against a float64 numpy oracle, and both kernels are lowered for real hardware (no device
needed) to catch lowering-only errors.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from pallas_kernels.flash_attention import (
    attention_mask,
    flash_attention_gpu,
    flash_attention_reference,
    flash_attention_tpu,
    flash_tuning,
)
from pallas_kernels.flash_attention.layout import block_key_ranges, token_key_ranges

TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
SCALE = 0.35
# Blocks small enough that the cases span several query and key blocks.
KERNELS = {
    "gpu": functools.partial(flash_attention_gpu, block_q=4, block_k=8, interpret=True),
    "tpu": functools.partial(flash_attention_tpu, block_q=8, block_k=8, interpret=True),
}


class Case(NamedTuple):
    """One packed batch: sequence lengths, heads, dtype and attention options."""

    lengths: tuple[int, ...]
    num_heads: int
    num_kv_heads: int
    dtype: Any = jnp.float32
    pad: int = 3
    options: dict[str, Any] = {}


CASES = {
    "gqa": Case((9, 1, 6, 3), 4, 2),
    "group3_window": Case((12, 1, 7), 6, 2, options={"sliding_window": 4}),
    "mha_soft_cap_bf16": Case((5, 1, 10), 2, 2, dtype=jnp.bfloat16,
                              options={"soft_cap": 2.0}),
    "non_causal": Case((7, 1, 8), 4, 2, options={"causal": False}),
    "non_causal_window_bf16": Case((11, 4), 6, 2, dtype=jnp.bfloat16,
                                   options={"causal": False, "sliding_window": 3}),
}
HEAD_DIM = 16


def make_inputs(case: Case, seed: int = 0, offset: int = 0):
    """Random q/k/v and packed segment ids / positions (padding tokens: segment -1)."""
    rng = np.random.default_rng(seed)
    T = sum(case.lengths) + case.pad
    segment_ids = np.full(T, -1, np.int32)
    positions = np.zeros(T, np.int32)
    start = 0
    for s, n in enumerate(case.lengths):
        segment_ids[start:start + n] = s
        positions[start:start + n] = offset * s + np.arange(n)  # chunks may start mid-sequence
        start += n
    shapes = [(T, case.num_heads, HEAD_DIM)] + [(T, case.num_kv_heads, HEAD_DIM)] * 2
    q, k, v = (jnp.asarray(rng.standard_normal(s), case.dtype) for s in shapes)
    return q, k, v, jnp.asarray(segment_ids), jnp.asarray(positions)


def float64_oracle(q, k, v, segment_ids, positions, scale, causal, window, cap):
    """Token-by-token float64 attention written from the definition."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    T, H, E = q.shape
    G = H // k.shape[1]
    out = np.zeros((T, H, E))
    for t in range(T):
        keys = [u for u in range(T)
                if segment_ids[u] == segment_ids[t] != -1
                and (not causal or positions[u] <= positions[t])
                and (window is None or positions[t] - positions[u] < window)]
        for h in range(H):
            if not keys:
                continue
            scores = np.array([q[t, h] @ k[u, h // G] for u in keys]) * scale
            if cap is not None:
                scores = cap * np.tanh(scores / cap)
            weights = np.exp(scores - scores.max())
            out[t, h] = (weights / weights.sum()) @ v[keys, h // G]
    return out


@pytest.mark.parametrize("causal, window, cap", [(True, None, None), (True, 3, 1.5),
                                                 (False, 2, None)])
def test_reference_matches_float64_oracle(causal, window, cap):
    case = Case((4, 1, 3), 6, 2)
    q, k, v, segment_ids, positions = make_inputs(case, seed=1, offset=5)
    got = flash_attention_reference(q, k, v, segment_ids=segment_ids, positions=positions,
                                    sm_scale=SCALE, causal=causal, sliding_window=window,
                                    soft_cap=cap)
    expected = float64_oracle(q, k, v, np.asarray(segment_ids), np.asarray(positions), SCALE,
                              causal, window, cap)
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-6, rtol=1e-5)
    assert np.all(np.asarray(got)[-case.pad:] == 0)


@pytest.mark.parametrize("causal, window", [(True, None), (True, 3), (False, None), (False, 2)])
def test_key_ranges_cover_the_mask(causal, window):
    """Every allowed key of a token lies in the token range the kernels visit."""
    _, _, _, segment_ids, positions = make_inputs(Case((6, 1, 4, 2), 2, 2), offset=7)
    mask = np.asarray(attention_mask(segment_ids, positions, causal=causal,
                                     sliding_window=window))
    lo, hi = (np.asarray(x) for x in token_key_ranges(segment_ids, causal=causal,
                                                      sliding_window=window))
    rows, cols = np.nonzero(mask)
    assert np.all(lo[rows] <= cols) and np.all(cols < hi[rows])
    # Exact for causal attention: the range holds nothing but allowed keys.
    if causal:
        np.testing.assert_array_equal(mask.sum(axis=1), np.maximum(hi - lo, 0))
    # Padded to 16 tokens, blocks of 4: later query blocks start past key block 0.
    pad = 16 - len(lo)
    first, last = block_key_ranges(jnp.pad(jnp.asarray(lo), (0, pad), constant_values=16),
                                   jnp.pad(jnp.asarray(hi), (0, pad)), block_q=4, block_k=4)
    assert int(first[2]) > 0 and int(last[0]) < 4


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernel_matches_reference(kernel, name):
    case = CASES[name]
    q, k, v, segment_ids, positions = make_inputs(case, seed=len(name), offset=3)
    args = dict(segment_ids=segment_ids, positions=positions, sm_scale=SCALE, **case.options)
    got = KERNELS[kernel](q, k, v, **args)
    expected = flash_attention_reference(q, k, v, **args)
    assert got.shape == q.shape and got.dtype == q.dtype
    tol = TOLERANCE[case.dtype]
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                               atol=tol, rtol=tol)
    assert np.all(np.asarray(got, np.float32)[-case.pad:] == 0), "padding rows must be zero"


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_traced_window(kernel):
    """The window arrives as a traced scalar (per-layer windows under lax.scan)."""
    case = Case((10, 1, 5), 4, 2)
    q, k, v, segment_ids, positions = make_inputs(case, seed=3)
    run = jax.jit(lambda q, k, v, window: KERNELS[kernel](
        q, k, v, segment_ids=segment_ids, positions=positions, sm_scale=SCALE,
        sliding_window=window))
    for window in (2, 7, 100):
        got = run(q, k, v, jnp.int32(window))
        expected = flash_attention_reference(q, k, v, segment_ids=segment_ids,
                                             positions=positions, sm_scale=SCALE,
                                             sliding_window=window)
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kernel", [flash_attention_gpu, flash_attention_tpu])
def test_defaults_single_sequence(kernel):
    """No segment ids or positions, default block sizes, MHA, T not a multiple of 8."""
    q, k, v, _, _ = make_inputs(Case((13,), 2, 2, pad=0))
    got = kernel(q, k, v, sm_scale=SCALE, interpret=True)
    expected = flash_attention_reference(q, k, v, sm_scale=SCALE)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5, rtol=2e-5)


def _lowering_inputs():
    T, H, K, E = 300, 6, 2, 128
    return (jax.ShapeDtypeStruct((T, H, E), jnp.bfloat16),
            jax.ShapeDtypeStruct((T, K, E), jnp.bfloat16),
            jax.ShapeDtypeStruct((T, K, E), jnp.bfloat16),
            jax.ShapeDtypeStruct((T,), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32))


def _prefill(kernel, q, k, v, segment_ids, window):
    return kernel(q, k, v, segment_ids=segment_ids, sm_scale=SCALE, sliding_window=window,
                  soft_cap=30.0)


def test_tpu_kernel_lowers_to_mosaic():
    """Jax-side lowering only: Mosaic's own layout passes run in the TPU compiler."""
    lowered = jax.jit(functools.partial(_prefill, flash_attention_tpu)).trace(
        *_lowering_inputs()).lower(lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()


def test_gpu_kernel_lowers_to_triton():
    # On this CPU-only jaxlib the cuda lowering also works without the abstract mesh; the
    # mesh pins the device kind a real H100 would report.
    device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                            platform="cuda")
    with use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=device)):
        lowered = jax.jit(functools.partial(_prefill, flash_attention_gpu)).trace(
            *_lowering_inputs()).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "xla.gpu.triton" in text
    tuning = flash_tuning("gpu", 128, jnp.bfloat16)
    assert f"num_warps = {tuning['num_warps']}" in text


def test_tpu_rejects_illegal_compiled_blocks():
    q, k, v, _, _ = make_inputs(Case((300,), 2, 2, pad=0))
    with pytest.raises(ValueError, match="multiple of 128"):
        flash_attention_tpu(q, k, v, sm_scale=SCALE, block_q=8, block_k=8)


def test_tuning_lookup():
    assert flash_tuning("cuda", 128, jnp.bfloat16) == flash_tuning("gpu", 128, "bfloat16")
    fallback = flash_tuning("tpu", 80, jnp.float16)  # unlisted head dim: platform default
    assert fallback["block_k"] % 128 == 0 and fallback["num_warps"] is None
    with pytest.raises(ValueError, match="platform"):
        flash_tuning("cpu", 64, jnp.float32)
