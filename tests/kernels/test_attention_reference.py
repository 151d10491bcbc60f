"""The jnp attention references against a float64 numpy oracle written token by token.

The oracle gathers each sequence's keys position by position from its page table, so it
shares no indexing code with the references. Ragged cases: empty sequences, single tokens,
lengths that are not multiples of the page size, page boundaries, sliding windows, GQA,
soft caps, and the decode, prefix-free and general paths.
"""

from __future__ import annotations

import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention.reference import (
    causal_prefill_attention_reference,
    ragged_paged_attention_reference,
)

C, K, G, E = 4, 2, 3, 8
H = K * G


def oracle(q, k_pages, v_pages, kv_lens, page_table, q_lens, scale, window=None, cap=None):
    """float64 attention of each new token over its sequence's cached tokens."""
    out = np.zeros(q.shape, np.float64)
    t = 0
    for s, (n_kv, n_q) in enumerate(zip(kv_lens, q_lens, strict=True)):
        keys = np.stack([k_pages[page_table[s][p // C], p % C] for p in range(n_kv)]) \
            if n_kv else np.zeros((0, K, E))
        values = np.stack([v_pages[page_table[s][p // C], p % C] for p in range(n_kv)]) \
            if n_kv else np.zeros((0, K, E))
        for i in range(n_q):
            pos = n_kv - n_q + i
            for h in range(H):
                kh = h // G
                scores = keys[: pos + 1, kh].astype(np.float64) @ q[t, h].astype(np.float64)
                scores = scores * scale
                if cap:
                    scores = np.tanh(scores / cap) * cap
                allowed = np.arange(pos + 1)
                if window:
                    allowed = allowed[pos - allowed < window]
                w = np.exp(scores[allowed] - scores[allowed].max())
                out[t, h] = (w / w.sum()) @ values[allowed, kh]
            t += 1
    return out


def make_case(rng, q_lens, kv_lens, num_pages=40, pad_tokens=3, pad_seqs=1):
    P = max(1, max(-(-n // C) for n in kv_lens))
    pages = rng.permutation(num_pages)
    page_table = np.zeros((len(kv_lens) + pad_seqs, P), np.int32)
    used = 0
    for s, n in enumerate(kv_lens):
        need = -(-n // C)
        page_table[s, :need] = pages[used:used + need]
        used += need
    T = sum(q_lens)
    q = rng.standard_normal((T + pad_tokens, H, E)).astype(np.float32)
    k_pages = rng.standard_normal((num_pages, C, K, E)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, C, K, E)).astype(np.float32)
    query_start = np.concatenate([[0], np.cumsum(q_lens), [T] * pad_seqs]).astype(np.int32)
    kv = np.array(list(kv_lens) + [0] * pad_seqs, np.int32)
    return q, k_pages, v_pages, kv, page_table, query_start


CASES = {
    "mixed": ([3, 1, 5, 1], [7, 9, 5, 4]),  # prefill chunks after a prefix, and decodes
    "page_boundaries": ([4, 8], [8, 12]),
    "empty_sequence": ([2, 0, 3], [6, 0, 3]),
    "single_tokens": ([1, 1, 1], [1, 5, 13]),
}


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("cap", [None, 2.0])
@pytest.mark.parametrize("case", sorted(CASES))
def test_ragged_paged_attention_matches_oracle(case, window, cap):
    q_lens, kv_lens = CASES[case]
    rng = np.random.default_rng(hash(case) % 2**32)
    q, kp, vp, kv, pt, qs = make_case(rng, q_lens, kv_lens)
    max_q = 1 << (max(max(q_lens), 1) - 1).bit_length()
    got = np.asarray(ragged_paged_attention_reference(
        q, kp, vp, kv, pt, qs, max_query_len=max_q, sm_scale=0.3, sliding_window=window,
        soft_cap=cap))
    expected = oracle(q, kp, vp, kv[:len(kv_lens)], pt, q_lens, 0.3, window, cap)
    T = sum(q_lens)
    np.testing.assert_allclose(got[:T], expected[:T], atol=2e-5, rtol=1e-5)
    assert np.all(got[T:] == 0), "padding tokens must produce zeros"


@pytest.mark.parametrize("window", [None, 4])
def test_decode_path_matches_oracle(window):
    """max_query_len 1 with T == S takes the decode path (token s is sequence s)."""
    rng = np.random.default_rng(5)
    kv_lens = [1, 6, 17, 0]
    q_lens = [1, 1, 1, 0]
    q, kp, vp, kv, pt, qs = make_case(rng, q_lens[:3], kv_lens[:3], pad_tokens=1, pad_seqs=1)
    got = np.asarray(ragged_paged_attention_reference(
        q, kp, vp, kv, pt, qs, max_query_len=1, sm_scale=0.5, sliding_window=window))
    expected = oracle(q, kp, vp, kv[:3], pt, q_lens[:3], 0.5, window)
    np.testing.assert_allclose(got[:3], expected[:3], atol=2e-5, rtol=1e-5)
    assert np.all(got[3] == 0)


@pytest.mark.parametrize("window", [None, 2])
def test_prefix_free_path_matches_oracle(window):
    rng = np.random.default_rng(7)
    q_lens = [5, 1, 3]
    q, kp, vp, kv, pt, qs = make_case(rng, q_lens, q_lens)
    # The prefix-free path reads this step's keys and values, not the pages: rebuild them.
    T = sum(q_lens)
    k = np.zeros((len(q), K, E), np.float32)
    v = np.zeros((len(q), K, E), np.float32)
    positions = np.zeros(len(q), np.int32)
    t = 0
    for s, n in enumerate(q_lens):
        for p in range(n):
            k[t] = kp[pt[s][p // C], p % C]
            v[t] = vp[pt[s][p // C], p % C]
            positions[t] = p
            t += 1
    got = np.asarray(causal_prefill_attention_reference(
        q, k, v, positions, qs, sm_scale=0.3, sliding_window=window))
    expected = oracle(q, kp, vp, kv[:3], pt, q_lens, 0.3, window)
    np.testing.assert_allclose(got[:T], expected[:T], atol=2e-5, rtol=1e-5)
    assert np.all(got[T:] == 0)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_flat_path_with_history_matches_oracle(case, window):
    """Chunks continuing a sequence: this step's keys plus the earlier ones, gathered flat
    from the pages and tagged with their sequence (padding entries tagged -1)."""
    q_lens, kv_lens = CASES[case]
    rng = np.random.default_rng(hash(case) % 2**32 + 1)
    q, kp, vp, kv, pt, qs = make_case(rng, q_lens, kv_lens)
    T = sum(q_lens)
    k = np.zeros((len(q), K, E), np.float32)
    v = np.zeros((len(q), K, E), np.float32)
    positions = np.zeros(len(q), np.int32)
    hist_k, hist_v, hist_seq, hist_pos = [], [], [], []
    t = 0
    for s, (n_q, n_kv) in enumerate(zip(q_lens, kv_lens, strict=True)):
        for p in range(n_kv):
            key, value = kp[pt[s][p // C], p % C], vp[pt[s][p // C], p % C]
            if p < n_kv - n_q:
                hist_k.append(key), hist_v.append(value), hist_seq.append(s), hist_pos.append(p)
            else:
                k[t], v[t], positions[t] = key, value, p
                t += 1
    for _ in range(3):  # padding history entries must be ignored
        hist_k.append(np.full((K, E), 9.0, np.float32)), hist_v.append(hist_k[-1])
        hist_seq.append(-1), hist_pos.append(0)
    got = np.asarray(causal_prefill_attention_reference(
        q, k, v, positions, qs, sm_scale=0.3, sliding_window=window,
        k_hist=np.stack(hist_k), v_hist=np.stack(hist_v),
        hist_seq=np.array(hist_seq, np.int32), hist_pos=np.array(hist_pos, np.int32)))
    expected = oracle(q, kp, vp, kv[:len(kv_lens)], pt, q_lens, 0.3, window)
    np.testing.assert_allclose(got[:T], expected[:T], atol=2e-5, rtol=1e-5)
    assert np.all(got[T:] == 0)
