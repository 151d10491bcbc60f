"""The native CPU decode-attention kernel against the jnp reference on ragged inputs."""

from __future__ import annotations

import numpy as np
import pytest

from jaxinfer import cpu_kernels
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu_kernels.available(), "the native CPU kernels failed to build (see the log)"


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("E", [16, 20, 64])  # vector-width multiples and not
def test_matches_reference(window, cap, heads, E):
    H, K = heads
    L, NP, C = 3, 128, 4
    kv_lens = np.array([1, 4, 5, 23, 64, 0], np.int32)  # page boundaries, a padding slot
    S = len(kv_lens)
    P = 16
    rng = np.random.default_rng(H * 10 + K)
    k_cache = rng.standard_normal((L, NP, C, K, E)).astype(np.float32)
    v_cache = rng.standard_normal((L, NP, C, K, E)).astype(np.float32)
    q = rng.standard_normal((S, H, E)).astype(np.float32)
    page_table = rng.permutation(NP)[: S * P].reshape(S, P).astype(np.int32)
    # Decode contract: token s belongs to sequence s; padding sequences come last.
    query_start = np.array([0, 1, 2, 3, 4, 5, 5], np.int32)
    got = np.asarray(cpu_kernels.paged_decode_attention(
        q, k_cache, v_cache, kv_lens, page_table, 2, window, sm_scale=0.25, soft_cap=cap))
    expected = np.asarray(ragged_paged_attention_reference(
        q, k_cache[2], v_cache[2], kv_lens, page_table, query_start, max_query_len=1,
        sm_scale=0.25, sliding_window=window, soft_cap=cap))
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=1e-5)
    assert np.all(got[5] == 0)


def _check_ragged_against_reference(
    q_lens, kv_lens, *, H, K, E, C, P, NP, padding, seed, window, cap=None, sm_scale=0.25,
    atol=2e-6,
):
    """Random cache pages (shuffled page table), layer 1 of 2: the native kernel equals the
    reference within float32 rounding, and padding tokens get zero rows."""
    q_lens = np.asarray(q_lens, np.int32)
    kv_lens = np.asarray(kv_lens, np.int32)
    T = int(q_lens.sum()) + padding
    rng = np.random.default_rng(seed)
    k_cache = rng.standard_normal((2, NP, C, K, E)).astype(np.float32)
    v_cache = rng.standard_normal((2, NP, C, K, E)).astype(np.float32)
    q = rng.standard_normal((T, H, E)).astype(np.float32)
    page_table = rng.permutation(NP)[: len(kv_lens) * P].reshape(-1, P).astype(np.int32)
    query_start = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    got = np.asarray(cpu_kernels.ragged_paged_attention(
        q, k_cache, v_cache, kv_lens, page_table, query_start, 1, window, sm_scale=sm_scale,
        soft_cap=cap))
    expected = np.asarray(ragged_paged_attention_reference(
        q, k_cache[1], v_cache[1], kv_lens, page_table, query_start,
        max_query_len=int(2 ** np.ceil(np.log2(max(int(q_lens.max()), 1)))),
        sm_scale=sm_scale, sliding_window=window, soft_cap=cap))
    np.testing.assert_allclose(got, expected, atol=atol, rtol=1e-5)
    assert np.all(got[query_start[-1]:] == 0)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("heads", [(6, 2), (8, 1)])
@pytest.mark.parametrize("E", [16, 20])
def test_ragged_chunks_match_reference(window, cap, heads, E):
    """Prefill chunks continuing a prefix, a chunk from position 0, decodes, an empty
    sequence, padding tokens and a padding sequence."""
    H, K = heads
    _check_ragged_against_reference(
        [3, 1, 7, 0, 1, 5, 0], [9, 4, 7, 0, 23, 61, 0],  # chunk from 0: 7 of 7
        H=H, K=K, E=E, C=4, P=16, NP=128, padding=3, seed=H * 100 + E, window=window,
        cap=cap)


@pytest.mark.parametrize("window", [None, 100])
def test_long_chunks_and_decodes_match_reference(window):
    """The model's shapes (9 query heads on 3 KV heads, E = 64: the AVX-512 path) with
    prefill chunks of any length beside decodes long enough to take the prefetching path:
    a 300-token prompt from position 0, a 130-token chunk after 200 cached tokens, and
    decodes at 90 and 400 cached tokens."""
    _check_ragged_against_reference(
        [1, 1, 300, 130], [90, 400, 300, 330], H=9, K=3, E=64, C=16, P=32, NP=160,
        padding=5, seed=7, window=window, sm_scale=0.125)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("heads_e", [(9, 3, 64), (4, 1, 256), (8, 1, 32), (2, 2, 64)])
def test_matrix_form_chunks_match_reference(window, cap, heads_e):
    """Chunks of 8 or more queries take the matrix form (one KV head per work item, up to
    48 (query, head) rows in the vector lanes) when E is a multiple of 32: a chunk of exactly
    8 from position 0, chunks split over several row blocks (20 and 13 queries), a chunk
    after a history, beside a decode; the Gemma 3 shape (4 heads on 1, E = 256), multi-head
    attention, E = 32 and G = 1."""
    H, K, E = heads_e
    _check_ragged_against_reference(
        [8, 1, 20, 13, 0], [8, 50, 70, 113, 0], H=H, K=K, E=E, C=16, P=8, NP=48,
        padding=2, seed=H * 10 + E, window=window, cap=cap,
        atol=2e-6 * E / 64 if E > 64 else 2e-6)  # 256-term dots: larger scores, more rounding
