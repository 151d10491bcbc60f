"""Pallas ragged paged attention (GPU/Triton and TPU/Mosaic variants) against the reference.

The kernels run in interpret mode on CPU (how CI tests them) on random ragged batches: empty
and padding sequences, single tokens, chunks that are not a multiple of the block, keys that
cross page boundaries, GQA with non-power-of-two groups, sliding windows (static and traced),
soft caps, stacked caches indexed by a traced layer, pages larger than the key block (the
contiguous layout). Lowering for CUDA and TPU is checked without hardware.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh

from pallas_kernels.ragged_paged_attention import (
    ragged_paged_attention_gpu,
    ragged_paged_attention_reference,
    ragged_paged_attention_tpu,
)

KERNELS = {"gpu": ragged_paged_attention_gpu, "tpu": ragged_paged_attention_tpu}
# Max abs error against the f32 reference computed from the same (rounded) inputs.
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


@dataclasses.dataclass
class Case:
    q: jax.Array
    k_cache: jax.Array  # [L, NP, C, K, E]
    v_cache: jax.Array
    kv_lens: jax.Array
    page_table: jax.Array
    query_start: jax.Array
    max_query_len: int


def make_case(seed: int, q_lens: list[int], ctx_lens: list[int], *, H: int, K: int, E: int,
              C: int, dtype=jnp.float32, layers: int = 2, extra_tokens: int = 3,
              extra_pages: int = 1) -> Case:
    """Sequences with q_lens[s] new tokens after ctx_lens[s] cached ones, on shuffled pages."""
    rng = np.random.default_rng(seed)
    S = len(q_lens)
    kv = [a + b for a, b in zip(q_lens, ctx_lens, strict=True)]
    P = max(-(-n // C) for n in kv) + extra_pages
    NP = S * P + 2
    page_table = rng.permutation(NP)[:S * P].reshape(S, P)
    query_start = np.concatenate([[0], np.cumsum(q_lens)])
    T = int(query_start[-1]) + extra_tokens

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)

    return Case(rand(T, H, E), rand(layers, NP, C, K, E), rand(layers, NP, C, K, E),
                jnp.asarray(kv, jnp.int32), jnp.asarray(page_table, jnp.int32),
                jnp.asarray(query_start, jnp.int32), max(max(q_lens), 1))


def reference(case: Case, layer: int, **kw) -> jax.Array:
    """The XLA reference in float32 with full-precision dots (a GPU's default is TF32)."""
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        out = ragged_paged_attention_reference(
            f32(case.q), f32(case.k_cache[layer]), f32(case.v_cache[layer]), case.kv_lens,
            case.page_table, case.query_start, max_query_len=case.max_query_len, **kw)
    return out


def run(kernel: str, case: Case, layer: int, **kw) -> jax.Array:
    return KERNELS[kernel](case.q, case.k_cache, case.v_cache, case.kv_lens, case.page_table,
                           case.query_start, max_query_len=case.max_query_len, layer=layer,
                           interpret=True, **kw)


def assert_close(out: jax.Array, ref: jax.Array, dtype) -> None:
    chex.assert_equal_shape([out, ref])
    assert out.dtype == dtype
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
    assert err <= TOLERANCE[dtype], f"max abs error {err} > {TOLERANCE[dtype]}"


# (q_lens, ctx_lens): a mixed batch (decode tokens first, then chunks), empty sequences,
# chunks crossing page boundaries and not a multiple of any block.
RAGGED = ([1, 1, 5, 0, 17, 3], [6, 0, 3, 0, 20, 13])


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
@pytest.mark.parametrize("H,K", [(6, 2), (4, 4), (8, 1)])
def test_ragged_batch_gqa(kernel: str, H: int, K: int) -> None:
    case = make_case(0, *RAGGED, H=H, K=K, E=16, C=16)
    kw = dict(sm_scale=0.25)
    assert_close(run(kernel, case, 1, **kw), reference(case, 1, **kw), jnp.float32)


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
def test_window_softcap_bf16(kernel: str) -> None:
    case = make_case(1, *RAGGED, H=4, K=2, E=32, C=16, dtype=jnp.bfloat16)
    kw = dict(sm_scale=0.2, sliding_window=7, soft_cap=5.0)
    assert_close(run(kernel, case, 0, **kw), reference(case, 0, **kw), jnp.bfloat16)


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
def test_traced_layer_and_window(kernel: str) -> None:
    """Under `lax.scan` the layer and the per-layer window are traced values."""
    case = make_case(2, *RAGGED, H=4, K=2, E=16, C=16, layers=3)
    windows = jnp.asarray([4, 1 << 20, 9], jnp.int32)

    def body(_, xs):
        layer, window = xs
        out = KERNELS[kernel](case.q, case.k_cache, case.v_cache, case.kv_lens, case.page_table,
                              case.query_start, max_query_len=case.max_query_len, layer=layer,
                              sliding_window=window, sm_scale=0.3, interpret=True)
        return None, out

    _, outs = jax.jit(lambda: jax.lax.scan(body, None, (jnp.arange(3, dtype=jnp.int32),
                                                        windows)))()
    for layer in range(3):
        ref = reference(case, layer, sm_scale=0.3, sliding_window=int(windows[layer]))
        assert_close(outs[layer], ref, jnp.float32)


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
def test_pure_decode_batch(kernel: str) -> None:
    """Decode steps: one token per sequence, token s of sequence s, padding sequences."""
    case = make_case(3, [1, 1, 1, 1, 0], [0, 15, 16, 40, 0], H=6, K=2, E=16, C=16,
                     extra_tokens=1)
    chex.assert_shape(case.q, (5, 6, 16))
    kw = dict(sm_scale=0.3)
    out = run(kernel, case, 1, **kw)
    assert_close(out, reference(case, 1, **kw), jnp.float32)
    assert not np.asarray(out[4]).any()


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
def test_large_pages_walked_in_blocks(kernel: str) -> None:
    """The contiguous layout: one page per sequence, larger than the key block."""
    case = make_case(4, [9, 1, 30], [50, 70, 0], H=4, K=2, E=16, C=128, extra_pages=0)
    kw = dict(sm_scale=0.3, sliding_window=40)
    out = run(kernel, case, 0, block_k=32, **kw)
    assert_close(out, reference(case, 0, **kw), jnp.float32)


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
def test_padding_rows_are_zero_and_only_real_rows_written(kernel: str) -> None:
    case = make_case(5, [3, 0, 2], [2, 0, 0], H=4, K=2, E=16, C=16, extra_tokens=5)
    out = run(kernel, case, 0, sm_scale=1.0)
    assert not np.asarray(out[5:]).any()
    assert np.asarray(out[:5]).any(axis=(1, 2)).all()


@pytest.mark.parametrize("kv_splits", [1, 3, 8])
def test_gpu_key_range_split(kv_splits: int) -> None:
    """Flash-decoding: the key range split over programs, merged by log-sum-exp, in decode
    and in a mixed batch, with a window; splits that see no key (short or empty sequences,
    more splits than key blocks) drop out of the merge."""
    decode = make_case(7, [1, 1, 1, 0], [300, 5, 129, 0], H=8, K=2, E=16, C=16,
                       extra_tokens=1)
    kw = dict(sm_scale=0.25, sliding_window=200)
    out = run("gpu", decode, 1, kv_splits=kv_splits, **kw)
    assert_close(out, reference(decode, 1, **kw), jnp.float32)
    assert not np.asarray(out[3:]).any()
    mixed = make_case(8, *RAGGED, H=6, K=2, E=16, C=16)
    out = run("gpu", mixed, 0, kv_splits=kv_splits, sm_scale=0.3)
    assert_close(out, reference(mixed, 0, sm_scale=0.3), jnp.float32)


def test_gpu_rejects_small_pages() -> None:
    case = make_case(6, [2], [3], H=4, K=2, E=16, C=8)
    with pytest.raises(ValueError, match="page size"):
        run("gpu", case, 0, sm_scale=1.0)


def test_rejects_bad_shapes() -> None:
    case = make_case(7, [2], [3], H=4, K=2, E=16, C=16)
    with pytest.raises(ValueError, match="layer"):
        ragged_paged_attention_gpu(case.q, case.k_cache, case.v_cache, case.kv_lens,
                                   case.page_table, case.query_start, max_query_len=2,
                                   sm_scale=1.0)
    with pytest.raises(ValueError, match="query_start"):
        ragged_paged_attention_tpu(case.q, case.k_cache, case.v_cache, case.kv_lens,
                                   case.page_table, case.query_start[:-1], max_query_len=2,
                                   sm_scale=1.0, layer=0)


# ------------------------------------------------------------------ lowering without hardware

H100 = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda"))


def _abstract_args(T: int, S: int, dtype=jnp.bfloat16, E: int = 128):
    sd = jax.ShapeDtypeStruct
    H, K, C, NP, L, P = 8, 2, 16, 64, 2, 8
    return (sd((T, H, E), dtype), sd((L, NP, C, K, E), dtype), sd((L, NP, C, K, E), dtype),
            sd((S,), jnp.int32), sd((S, P), jnp.int32), sd((S + 1,), jnp.int32),
            sd((), jnp.int32))


@pytest.mark.parametrize("T,S,Qm", [(64, 4, 32), (8, 8, 1)])
def test_gpu_kernel_lowers_to_triton(T: int, S: int, Qm: int) -> None:
    def f(q, k, v, kv_lens, pt, qs, layer):
        return ragged_paged_attention_gpu(q, k, v, kv_lens, pt, qs, layer=layer, max_query_len=Qm,
                                          sm_scale=0.1, sliding_window=layer + 4, soft_cap=30.0)
    with jax.sharding.use_abstract_mesh(H100):
        text = jax.jit(f).trace(*_abstract_args(T, S)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text and "ragged_paged_attention_gpu" in text


@pytest.mark.parametrize("T,S,Qm", [(64, 4, 32), (8, 8, 1)])
def test_tpu_kernel_lowers_to_mosaic(T: int, S: int, Qm: int) -> None:
    def f(q, k, v, kv_lens, pt, qs, layer):
        return ragged_paged_attention_tpu(q, k, v, kv_lens, pt, qs, layer=layer, max_query_len=Qm,
                                          sm_scale=0.1, sliding_window=layer + 4, soft_cap=30.0)
    text = jax.jit(f).trace(*_abstract_args(T, S)).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text and "ragged_paged_attention_tpu" in text
