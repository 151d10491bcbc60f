"""`build_step_batch` and `bucket` (host side, no model).

Layout of ragged steps (query_start, kv_lens, positions, slot_mapping, page tables,
logits_indices), padding (slot num_slots, query_start num_tokens, zeros elsewhere), bucketed
shapes, `prefix_free`, decode batches, errors, and a hypothesis property test that rebuilds
every sequence from the flat arrays over random chunk lists.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxinfer.batch import SequenceChunk, bucket, build_step_batch

NUM_SLOTS = 1000  # any value that is not a real slot in these tests


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


# ---------------------------------------------------------------------------- bucket
@pytest.mark.parametrize(("n", "minimum", "expected"), [
    (0, 1, 1), (1, 1, 1), (2, 1, 2), (3, 1, 4), (4, 1, 4), (5, 1, 8), (8, 1, 8),
    (9, 1, 16), (511, 1, 512), (512, 1, 512), (513, 1, 1024),
    (3, 16, 16), (17, 16, 32), (1, 8, 8), (-5, 1, 1),
])
def test_bucket(n, minimum, expected):
    assert bucket(n, minimum) == expected


def test_bucket_is_smallest_power_of_two_at_least_n():
    for n in range(1, 3000):
        b = bucket(n)
        assert _is_pow2(b) and b >= n and b // 2 < n, n


# ---------------------------------------------------------------------------- layout
def test_mixed_prefill_and_decode_layout():
    page_size = 4
    chunks = [
        SequenceChunk([11, 12, 13, 14, 15], 0, [7, 2]),   # prefill from 0, 5 tokens
        SequenceChunk([21], 6, [3, 9]),                   # decode at position 6
        SequenceChunk([31, 32, 33], 2, [5, 0, 8]),        # later chunk at positions 2..4
    ]
    b = build_step_batch(chunks, page_size=page_size, num_slots=NUM_SLOTS)
    assert b.num_tokens == 9 and b.num_seqs == 3
    assert len(b.tokens) == 16  # bucket(9)
    assert len(b.kv_lens) == 4  # bucket(3)
    assert b.page_table.shape == (4, 2)  # max pages needed: ceil(7/4) = 2
    assert b.max_query_len == 8  # bucket(5)
    assert not b.prefix_free and not b.is_decode
    assert b.num_decode == 0  # the single-token chunk is not leading: prefill section
    # Flat attention would score 16 x (16 + 2 history) elements, per-sequence 4 x 8 x 8.
    assert not b.flat_prefill and len(b.hist_slots) == 0
    assert b.shape_key == (16, 4, 2, 8, 0, 0, 0, 0)

    np.testing.assert_array_equal(b.tokens, [11, 12, 13, 14, 15, 21, 31, 32, 33] + [0] * 7)
    np.testing.assert_array_equal(b.positions, [0, 1, 2, 3, 4, 6, 2, 3, 4] + [0] * 7)
    # slot = page * C + offset: seq 0 pages [7, 2]; seq 1 position 6 -> page 9 offset 2;
    # seq 2 positions 2, 3 on page 5, position 4 on page 0.
    np.testing.assert_array_equal(
        b.slot_mapping,
        [28, 29, 30, 31, 8, 38, 22, 23, 0] + [NUM_SLOTS] * 7)
    np.testing.assert_array_equal(b.query_start, [0, 5, 6, 9, 9])
    np.testing.assert_array_equal(b.kv_lens, [5, 7, 5, 0])
    np.testing.assert_array_equal(b.page_table, [[7, 2], [3, 9], [5, 0], [0, 0]])
    np.testing.assert_array_equal(b.logits_indices, [4, 5, 8, 0])
    for a in (b.tokens, b.positions, b.slot_mapping, b.query_start, b.kv_lens,
              b.page_table, b.logits_indices):
        assert a.dtype == np.int32


def test_decode_section_then_prefill_section():
    page_size = 4
    chunks = [
        SequenceChunk([21], 6, [3, 9]),                   # decode at position 6
        SequenceChunk([22], 1, [4]),                      # decode at position 1
        SequenceChunk([23], 2, [6]),                      # decode at position 2
        SequenceChunk([11, 12, 13, 14, 15], 0, [7, 2]),   # prefill from 0
        SequenceChunk([31, 32, 33], 2, [5, 0, 8]),        # later chunk at positions 2..4
    ]
    b = build_step_batch(chunks, page_size=page_size, num_slots=NUM_SLOTS)
    assert b.num_decode == 4  # bucket(3): one padding decode slot
    assert len(b.tokens) == 16  # bucket(4 + 8)
    assert len(b.kv_lens) == 4 + 2
    assert b.max_query_len == 8 and not b.prefix_free and not b.is_decode
    np.testing.assert_array_equal(
        b.tokens, [21, 22, 23, 0, 11, 12, 13, 14, 15, 31, 32, 33] + [0] * 4)
    np.testing.assert_array_equal(
        b.positions, [6, 1, 2, 0, 0, 1, 2, 3, 4, 2, 3, 4] + [0] * 4)
    np.testing.assert_array_equal(
        b.slot_mapping,
        [38, 17, 26, NUM_SLOTS, 28, 29, 30, 31, 8, 22, 23, 0] + [NUM_SLOTS] * 4)
    # Decode section: sequence s owns token s (the padding sequence owns the padding slot and
    # has no cache); then the prefill sequences' offsets.
    np.testing.assert_array_equal(b.query_start, [0, 1, 2, 3, 4, 9, 12])
    np.testing.assert_array_equal(b.kv_lens, [7, 2, 3, 0, 5, 5])
    np.testing.assert_array_equal(b.logits_indices, [0, 1, 2, 0, 8, 11])
    np.testing.assert_array_equal(b.page_table, [[3, 9], [4, 0], [6, 0], [0, 0], [7, 2],
                                                 [5, 0]])


def test_page_copies():
    b = build_step_batch([SequenceChunk([1, 2], 0, [3])], page_size=4, num_slots=64,
                         page_copies=[(5, 9), (6, 10), (7, 11)])
    np.testing.assert_array_equal(b.copy_src, [5, 6, 7, 0])
    np.testing.assert_array_equal(b.copy_dst, [9, 10, 11, 16])  # padding: page 16 is out
    assert b.shape_key[6] == 4


def test_only_needed_pages_enter_the_page_table():
    # 3 tokens at page_size 4 need 1 page even though the sequence owns 3.
    b = build_step_batch([SequenceChunk([1, 2, 3], 0, [6, 4, 5])], page_size=4,
                         num_slots=NUM_SLOTS)
    assert b.page_table.shape == (1, 1)
    np.testing.assert_array_equal(b.page_table, [[6]])
    np.testing.assert_array_equal(b.slot_mapping[:3], [24, 25, 26])
    assert b.slot_mapping[3] == NUM_SLOTS


def test_min_buckets_raise_shapes():
    b = build_step_batch([SequenceChunk([5], 3, [1])], page_size=16, num_slots=NUM_SLOTS,
                         min_tokens=8, min_seqs=4, min_pages=2)
    # A decode-only batch has T == S == num_decode: the larger minimum sets all three.
    assert b.shape_key == (8, 8, 2, 1, 0, 8, 0, 0)
    np.testing.assert_array_equal(b.page_table, [[1, 0]] + [[0, 0]] * 7)
    np.testing.assert_array_equal(b.query_start, np.arange(9))
    np.testing.assert_array_equal(b.slot_mapping, [19] + [NUM_SLOTS] * 7)
    assert b.is_decode


def test_max_query_len_never_exceeds_tokens_bucket():
    b = build_step_batch([SequenceChunk(list(range(3)), 0, [0])], page_size=4,
                         num_slots=NUM_SLOTS)
    assert b.max_query_len == 4 == len(b.tokens)


# ---------------------------------------------------------------------------- flat prefill
def test_flat_prefill_for_one_long_chunk_from_zero():
    # 8 tokens, 2 pages of 4: flat scores 8 x 8, per-sequence 1 x 8 x 8 (ties go flat).
    b = build_step_batch([SequenceChunk(list(range(8)), 0, [0, 1])], page_size=4,
                         num_slots=NUM_SLOTS)
    assert b.flat_prefill and b.prefix_free and len(b.hist_slots) == 0


def test_many_short_prompts_attend_per_sequence():
    # 8 prompts of 4 tokens: flat would score 32 x 32 elements, per-sequence 8 x 4 x 4.
    chunks = [SequenceChunk([1, 2, 3, 4], 0, [s]) for s in range(8)]
    b = build_step_batch(chunks, page_size=4, num_slots=NUM_SLOTS)
    assert not b.flat_prefill and not b.prefix_free


def test_flat_prefill_gathers_the_history_of_continuing_chunks():
    page_size = 4
    chunks = [SequenceChunk(list(range(13)), 5, [6, 1, 8, 2, 9]),  # positions 5..17
              SequenceChunk([1, 2, 3], 0, [10])]
    b = build_step_batch(chunks, page_size=page_size, num_slots=NUM_SLOTS)
    # Flat scores 16 x (16 + 8 history), per-sequence 2 x 16 x 8 pages x 4.
    assert b.flat_prefill and not b.prefix_free
    assert len(b.hist_slots) == 8  # bucket(5)
    pos = np.arange(5)
    np.testing.assert_array_equal(b.hist_slots[:5],
                                  np.array([6, 1])[pos // page_size] * page_size + pos % 4)
    np.testing.assert_array_equal(b.hist_seq, [0] * 5 + [-1] * 3)  # prefill-section index
    np.testing.assert_array_equal(b.hist_pos[:5], pos)
    assert b.shape_key[-1] == 8 and b.shape_key[4] == 1


# ---------------------------------------------------------------------------- decode
def test_decode_batch_puts_sequence_s_token_at_index_s():
    page_size = 16
    starts = [0, 17, 40, 5, 63]
    pages = [[0], [1, 2], [3, 4, 5], [6], [7, 8, 9, 10]]
    chunks = [SequenceChunk([100 + s], start, p)
              for s, (start, p) in enumerate(zip(starts, pages, strict=True))]
    b = build_step_batch(chunks, page_size=page_size, num_slots=NUM_SLOTS)
    assert b.is_decode and b.max_query_len == 1
    assert len(b.tokens) == len(b.kv_lens) == 8
    np.testing.assert_array_equal(b.tokens[:5], [100, 101, 102, 103, 104])
    np.testing.assert_array_equal(b.positions[:5], starts)
    np.testing.assert_array_equal(b.logits_indices[:5], range(5))
    # Padding sequences own their padding token slot (kv_len 0: they attend to nothing).
    np.testing.assert_array_equal(b.query_start, np.arange(9))
    np.testing.assert_array_equal(b.kv_lens, [1, 18, 41, 6, 64, 0, 0, 0])
    expected_slots = [p[start // page_size] * page_size + start % page_size
                      for start, p in zip(starts, pages, strict=True)]
    np.testing.assert_array_equal(b.slot_mapping[:5], expected_slots)
    np.testing.assert_array_equal(b.slot_mapping[5:], [NUM_SLOTS] * 3)


# ---------------------------------------------------------------------------- errors
def test_no_chunks_is_an_error():
    with pytest.raises(ValueError, match="at least one sequence"):
        build_step_batch([], page_size=16, num_slots=NUM_SLOTS)


def test_empty_chunk_is_an_error():
    chunks = [SequenceChunk([1, 2], 0, [0]), SequenceChunk([], 0, [1])]
    with pytest.raises(ValueError, match="chunk 1 has no tokens"):
        build_step_batch(chunks, page_size=16, num_slots=NUM_SLOTS)


def test_too_few_pages_is_an_error():
    # 17 tokens at page size 16 need 2 pages.
    chunks = [SequenceChunk([1], 0, [0]), SequenceChunk(list(range(17)), 0, [1])]
    with pytest.raises(ValueError, match=r"chunk 1 needs 2 pages for 17 tokens, has 1"):
        build_step_batch(chunks, page_size=16, num_slots=NUM_SLOTS)


def test_decode_past_the_last_page_is_an_error():
    with pytest.raises(ValueError, match="needs 2 pages"):
        build_step_batch([SequenceChunk([9], 16, [0])], page_size=16, num_slots=NUM_SLOTS)


# ---------------------------------------------------------------------------- property
@st.composite
def _step(draw):
    page_size = draw(st.sampled_from([1, 2, 4, 16]))
    n_seqs = draw(st.integers(1, 9))
    decode = draw(st.booleans())
    specs = []
    for _ in range(n_seqs):
        n = 1 if decode else draw(st.integers(1, 40))
        start = draw(st.integers(0, 50))
        extra = draw(st.integers(0, 2))
        specs.append((n, start, -(-(start + n) // page_size) + extra))
    # Distinct pages for all sequences, in a shuffled order.
    total = sum(p for _, _, p in specs)
    perm = draw(st.permutations(range(total)))
    chunks, used = [], 0
    for s, (n, start, npages) in enumerate(specs):
        tokens = [1000 * (s + 1) + i for i in range(n)]
        chunks.append(SequenceChunk(tokens, start, list(perm[used:used + npages])))
        used += npages
    mins = draw(st.tuples(st.sampled_from([1, 4, 64]), st.sampled_from([1, 2, 16]),
                          st.sampled_from([1, 8])))
    return page_size, chunks, mins, total * page_size


@settings(max_examples=150, deadline=None)
@given(_step())
def test_property_layout_invariants(case):
    page_size, chunks, (min_tokens, min_seqs, min_pages), num_slots = case
    b = build_step_batch(chunks, page_size=page_size, num_slots=num_slots,
                         min_tokens=min_tokens, min_seqs=min_seqs, min_pages=min_pages)
    n = len(chunks)
    lens = [len(c.token_ids) for c in chunks]
    total = sum(lens)
    n_dec = next((i for i, length in enumerate(lens) if length != 1), n)
    prefill = chunks[n_dec:]
    D = b.num_decode
    t_bucket, s_bucket, p_bucket = len(b.tokens), len(b.kv_lens), b.page_table.shape[1]

    # Sections and buckets: powers of two, the smallest that fit the content and minimums.
    max_pages = max(-(-(c.start + len(c.token_ids)) // page_size) for c in chunks)
    assert _is_pow2(p_bucket) and p_bucket >= max(max_pages, min_pages) > p_bucket // 2
    if not prefill:
        assert b.is_decode and t_bucket == s_bucket == D and b.max_query_len == 1
        assert _is_pow2(D) and D >= max(n, min_seqs, min_tokens) > D // 2
    else:
        assert not b.is_decode
        assert (bucket(n_dec) if n_dec else 0) == D
        assert _is_pow2(t_bucket) and t_bucket >= max(D + total - n_dec, min_tokens)
        assert _is_pow2(s_bucket - D) and s_bucket - D >= len(prefill)
        assert b.max_query_len == min(bucket(max(lens[n_dec:])), t_bucket - D)
    assert b.shape_key == (t_bucket, s_bucket, p_bucket, b.max_query_len,
                           int(b.flat_prefill), D, 0, len(b.hist_slots))
    assert b.num_seqs == n and b.num_tokens == total
    assert b.positions.shape == b.slot_mapping.shape == (t_bucket,)
    assert b.query_start.shape == (s_bucket + 1,) and b.logits_indices.shape == (s_bucket,)
    assert np.all(np.diff(b.query_start) >= 0)

    # Every sequence is recovered from its slice of the flat arrays.
    real_tokens: set[int] = set()
    for s, c in enumerate(chunks):
        seq = s if s < n_dec else D + s - n_dec
        lo, hi = b.query_start[seq], b.query_start[seq + 1]
        if s < n_dec:
            assert (lo, hi) == (s, s + 1), "decode token s belongs to sequence s"
        real_tokens.update(range(lo, hi))
        pos = np.arange(c.start, c.start + len(c.token_ids))
        np.testing.assert_array_equal(b.tokens[lo:hi], c.token_ids)
        np.testing.assert_array_equal(b.positions[lo:hi], pos)
        pages = np.asarray(c.pages)
        np.testing.assert_array_equal(b.slot_mapping[lo:hi],
                                      pages[pos // page_size] * page_size + pos % page_size)
        assert b.kv_lens[seq] == c.start + len(c.token_ids)
        assert b.logits_indices[seq] == hi - 1
        needed = -(-b.kv_lens[seq] // page_size)
        np.testing.assert_array_equal(b.page_table[seq, :needed], pages[:needed])
        assert np.all(b.page_table[seq, needed:] == 0)
    if prefill:
        assert b.query_start[D] == D, "the prefill section starts right after the decodes"

    # Padding: tokens write nowhere, sequences attend to nothing.
    padding = [t for t in range(t_bucket) if t not in real_tokens]
    assert np.all(b.slot_mapping[padding] == num_slots)
    assert np.all(b.tokens[padding] == 0) and np.all(b.positions[padding] == 0)
    real_seqs = set(range(n_dec)) | {D + j for j in range(len(prefill))}
    pad_seqs = [s for s in range(s_bucket) if s not in real_seqs]
    assert np.all(b.kv_lens[pad_seqs] == 0) and np.all(b.page_table[pad_seqs] == 0)
    assert np.all(b.logits_indices[pad_seqs] == 0)
    # Real slots are distinct (sequences own distinct pages) and inside the pool.
    real = b.slot_mapping[sorted(real_tokens)]
    assert len(set(real.tolist())) == total and np.all((real >= 0) & (real < num_slots))

    # Flat prefill attention exactly when it scores fewer elements; its history lists
    # every earlier token of the prefill sequences once, then padding.
    history = sum(c.start for c in prefill)
    n_hist = bucket(history) if history else 0
    t_pre, s_pre = t_bucket - D, s_bucket - D
    cheaper = t_pre * (t_pre + n_hist) <= s_pre * b.max_query_len * p_bucket * page_size
    assert b.flat_prefill == (bool(prefill) and b.max_query_len > 1 and cheaper)
    if b.flat_prefill:
        assert len(b.hist_slots) == n_hist
        listed = [(int(s), int(p)) for s, p in zip(b.hist_seq, b.hist_pos, strict=True)
                  if s >= 0]
        assert listed == [(j, p) for j, c in enumerate(prefill) for p in range(c.start)]
        for j, p, slot in zip(b.hist_seq, b.hist_pos, b.hist_slots, strict=True):
            if j >= 0:
                pages = np.asarray(prefill[j].pages)
                assert slot == pages[p // page_size] * page_size + p % page_size
    else:
        assert len(b.hist_slots) == 0
