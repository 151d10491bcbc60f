"""The step batch: numpy arrays describing one engine step (host side, never imports jax).

One step computes a flat stream of new tokens from several sequences (decode tokens and
prefill chunks alike). Shapes are bucketed to powers of two so that a server compiles a
handful of programs; padding tokens write nowhere and padding sequences attend to nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class SequenceChunk:
    """The new tokens of one sequence in a step.

    Attributes:
      token_ids: the new tokens (one for decode, a chunk of the prompt for prefill).
      start: number of this sequence's tokens already in the cache (position of the first).
      pages: the sequence's page ids, covering at least start + len(token_ids) tokens.
      want_logits: whether the step should return logits for its last token.
    """

    token_ids: Sequence[int]
    start: int
    pages: Sequence[int]
    want_logits: bool = True


@dataclasses.dataclass(frozen=True)
class StepBatch:
    """Ragged description of one step. Dimension legend: T tokens, S sequences, P pages.

    Layout: a decode section first (single-token chunks; token s belongs to sequence s for
    s < num_decode), then a prefill section (multi-token chunks back to back), then padding.
    Kernels treat the two sections separately, so a mixed step costs what its parts cost.

    Attributes:
      tokens: [T] token ids (padding 0).
      positions: [T] absolute positions (padding 0).
      slot_mapping: [T] cache slot page * C + offset of each token (padding: num_slots, which
        the cache write drops).
      query_start: [S+1] cumulative offsets of each sequence's tokens in `tokens`.
      kv_lens: [S] tokens in cache per sequence after this step (padding 0).
      page_table: [S, P] page ids (padding 0, never read unmasked).
      logits_indices: [S] flat index of each sequence's last new token.
      copy_src, copy_dst: [N] pages to copy (all layers, k and v) before the step, for
        copy-on-write of shared pages (padding: dst = number of pages, dropped).
      num_seqs: real sequences (<= S).
      num_tokens: real tokens (<= T).
      num_decode: static size of the decode section (tokens and sequences; a bucket).
      max_query_len: static bucket >= every prefill-section chunk (1 without one).
      flat_prefill: static choice of the prefill section's attention: flat (this step's
        keys plus the `hist_*` history keys, cost T x (T + history)) or per sequence over
        its pages (cost S x max_query_len x P x C); `build_step_batch` picks the cheaper.
      hist_slots: [N] cache slots of the history keys of the flat prefill section (the
        tokens cached before this step of its sequences; padding: slot 0, sequence -1).
      hist_seq: [N] prefill-section sequence index of each history key (-1: padding).
      hist_pos: [N] position of each history key.
      seq_index: [num_seqs] the sequence slot of each input chunk, in input order: per-
        sequence inputs (sampling parameters) and outputs (tokens) are indexed by it.
    """

    tokens: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    query_start: np.ndarray
    kv_lens: np.ndarray
    page_table: np.ndarray
    logits_indices: np.ndarray
    num_seqs: int
    num_tokens: int
    max_query_len: int
    flat_prefill: bool = False
    num_decode: int = 0
    copy_src: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    copy_dst: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    seq_index: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    hist_slots: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    hist_seq: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    hist_pos: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))

    @property
    def prefix_free(self) -> bool:
        """Flat prefill attention that needs no cached keys (every chunk starts at 0)."""
        return self.flat_prefill and len(self.hist_slots) == 0

    @property
    def shape_key(self) -> tuple[int, ...]:
        """Everything static about this batch: the compiled program it needs."""
        return (len(self.tokens), len(self.kv_lens), self.page_table.shape[1],
                self.max_query_len, int(self.flat_prefill), self.num_decode, len(self.copy_src),
                len(self.hist_slots))

    @property
    def is_decode(self) -> bool:
        """Only single-token chunks (the decode section is the whole batch)."""
        return self.num_decode == len(self.tokens)


def build_step_batch(
    chunks: Sequence[SequenceChunk],
    *,
    page_size: int,
    num_slots: int,
    page_copies: Sequence[tuple[int, int]] = (),
    min_tokens: int = 1,
    min_seqs: int = 1,
    min_pages: int = 1,
) -> StepBatch:
    """Pack sequence chunks into a bucketed `StepBatch`.

    Leading single-token chunks form the decode section; the rest the prefill section.
    Callers put decodes first (the scheduler does); a single-token chunk after a longer one
    simply joins the prefill section.

    Args:
      chunks: one entry per sequence in this step.
      page_size: tokens per cache page (C).
      num_slots: total slots in the cache pool; used as the "write nowhere" slot for padding.
      page_copies: (src, dst) page pairs to copy before the step (copy-on-write).
      min_tokens, min_seqs, min_pages: lower bounds for the buckets (fewer distinct shapes).

    Raises:
      ValueError: a chunk is empty or its pages do not cover its tokens.
    """
    if not chunks:
        raise ValueError("a step needs at least one sequence")
    for s, c in enumerate(chunks):
        if len(c.token_ids) == 0:
            raise ValueError(f"sequence chunk {s} has no tokens")
    n_dec = 0
    while n_dec < len(chunks) and len(chunks[n_dec].token_ids) == 1:
        n_dec += 1
    prefill = chunks[n_dec:]
    num_tokens = sum(len(c.token_ids) for c in chunks)
    if not prefill:  # decode only: T == S == D
        D = bucket(n_dec, max(min_seqs, min_tokens))
        T, S, Qm = D, D, 1
    else:
        D = bucket(n_dec) if n_dec else 0
        T = bucket(D + num_tokens - n_dec, min_tokens)
        S = D + bucket(len(prefill), min_seqs if not D else 1)
        Qm = min(bucket(max(len(c.token_ids) for c in prefill)), T - D)
    max_pages = max(-(-(c.start + len(c.token_ids)) // page_size) for c in chunks)
    P = bucket(max_pages, min_pages)

    tokens = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    slots = np.full(T, num_slots, np.int32)
    query_start = np.zeros(S + 1, np.int32)
    query_start[:D + 1] = np.arange(D + 1)
    kv_lens = np.zeros(S, np.int32)
    page_table = np.zeros((S, P), np.int32)
    logits_indices = np.zeros(S, np.int32)
    offset = D
    for s, c in enumerate(chunks):
        seq = s if s < n_dec else D + s - n_dec
        n = len(c.token_ids)
        first = s if s < n_dec else offset
        end = c.start + n
        needed = -(-end // page_size)
        if len(c.pages) < needed:
            raise ValueError(
                f"sequence chunk {s} needs {needed} pages for {end} tokens, has {len(c.pages)}")
        pages = np.asarray(c.pages[:needed], np.int32)
        pos = np.arange(c.start, end, dtype=np.int32)
        tokens[first:first + n] = np.asarray(c.token_ids, np.int32)
        positions[first:first + n] = pos
        slots[first:first + n] = pages[pos // page_size] * page_size + pos % page_size
        kv_lens[seq] = end
        page_table[seq, :needed] = pages
        logits_indices[seq] = first + n - 1
        if s >= n_dec:
            query_start[seq] = offset
            offset += n
    query_start[D + len(prefill):] = offset  # padding prefill sequences: no tokens
    num_pages = num_slots // page_size
    n_copies = len(page_copies)
    copy_src = np.zeros(bucket(n_copies) if n_copies else 0, np.int32)
    copy_dst = np.full(len(copy_src), num_pages, np.int32)
    for i, (src, dst) in enumerate(page_copies):
        copy_src[i], copy_dst[i] = src, dst
    flat, hist = _choose_prefill_attention(prefill, T - D, S - D, Qm, P, page_size)
    return StepBatch(tokens=tokens, positions=positions, slot_mapping=slots,
                     query_start=query_start, kv_lens=kv_lens, page_table=page_table,
                     logits_indices=logits_indices, num_seqs=len(chunks),
                     num_tokens=num_tokens, max_query_len=Qm,
                     flat_prefill=flat, hist_slots=hist[0], hist_seq=hist[1], hist_pos=hist[2],
                     num_decode=D, copy_src=copy_src, copy_dst=copy_dst,
                     seq_index=np.array([s if s < n_dec else D + s - n_dec
                                         for s in range(len(chunks))], np.int32))


def _choose_prefill_attention(
    prefill: Sequence[SequenceChunk], T: int, S: int, Qm: int, P: int, page_size: int
) -> tuple[bool, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Flat or per-sequence attention for the prefill section, by the score elements each
    computes; for flat, the history keys (bucketed) it must gather from the cache."""
    empty = np.zeros(0, np.int32)
    if not prefill or Qm == 1:
        return False, (empty, empty, empty)
    history = sum(c.start for c in prefill)
    N = bucket(history) if history else 0
    if S * Qm * P * page_size < T * (T + N):
        return False, (empty, empty, empty)
    slots = np.zeros(N, np.int32)
    seq = np.full(N, -1, np.int32)
    pos = np.zeros(N, np.int32)
    offset = 0
    for s, c in enumerate(prefill):
        if c.start:
            p = np.arange(c.start, dtype=np.int32)
            pages = np.asarray(c.pages, np.int32)
            slots[offset:offset + c.start] = pages[p // page_size] * page_size + p % page_size
            seq[offset:offset + c.start] = s
            pos[offset:offset + c.start] = p
            offset += c.start
    return True, (slots, seq, pos)
