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

    Attributes:
      tokens: [T] token ids (padding 0).
      positions: [T] absolute positions (padding 0).
      slot_mapping: [T] cache slot page * C + offset of each token (padding: num_slots, which
        the cache write drops).
      query_start: [S+1] cumulative offsets of each sequence's tokens in `tokens`.
      kv_lens: [S] tokens in cache per sequence after this step (padding 0).
      page_table: [S, P] page ids (padding 0, never read unmasked).
      logits_indices: [S] flat index of each sequence's last new token.
      num_seqs: real sequences (<= S).
      num_tokens: real tokens (<= T).
      max_query_len: static bucket >= every sequence's new-token count.
      prefix_free: no sequence has tokens in the cache before this step (every chunk starts
        at position 0), so attention needs only this step's keys and values.
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
    prefix_free: bool = False

    @property
    def shape_key(self) -> tuple[int, int, int, int, bool]:
        """(T, S, P, max_query_len, prefix_free): the compiled program this batch needs."""
        return (len(self.tokens), len(self.kv_lens), self.page_table.shape[1],
                self.max_query_len, self.prefix_free)

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1


def build_step_batch(
    chunks: Sequence[SequenceChunk],
    *,
    page_size: int,
    num_slots: int,
    min_tokens: int = 1,
    min_seqs: int = 1,
    min_pages: int = 1,
) -> StepBatch:
    """Pack sequence chunks into a bucketed `StepBatch`.

    Args:
      chunks: one entry per sequence in this step.
      page_size: tokens per cache page (C).
      num_slots: total slots in the cache pool; used as the "write nowhere" slot for padding.
      min_tokens, min_seqs, min_pages: lower bounds for the buckets (fewer distinct shapes).

    Raises:
      ValueError: a chunk is empty or its pages do not cover its tokens.
    """
    if not chunks:
        raise ValueError("a step needs at least one sequence")
    num_tokens = sum(len(c.token_ids) for c in chunks)
    max_q = max(len(c.token_ids) for c in chunks)
    max_pages = max(-(-(c.start + len(c.token_ids)) // page_size) for c in chunks)
    T = bucket(num_tokens, min_tokens)
    S = bucket(len(chunks), min_seqs)
    P = bucket(max_pages, min_pages)
    Qm = min(bucket(max_q), T)

    tokens = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    slots = np.full(T, num_slots, np.int32)
    query_start = np.full(S + 1, num_tokens, np.int32)
    kv_lens = np.zeros(S, np.int32)
    page_table = np.zeros((S, P), np.int32)
    logits_indices = np.zeros(S, np.int32)
    offset = 0
    for s, c in enumerate(chunks):
        n = len(c.token_ids)
        if n == 0:
            raise ValueError(f"sequence chunk {s} has no tokens")
        end = c.start + n
        needed = -(-end // page_size)
        if len(c.pages) < needed:
            raise ValueError(
                f"sequence chunk {s} needs {needed} pages for {end} tokens, has {len(c.pages)}")
        pages = np.asarray(c.pages[:needed], np.int32)
        pos = np.arange(c.start, end, dtype=np.int32)
        tokens[offset:offset + n] = np.asarray(c.token_ids, np.int32)
        positions[offset:offset + n] = pos
        slots[offset:offset + n] = pages[pos // page_size] * page_size + pos % page_size
        query_start[s] = offset
        kv_lens[s] = end
        page_table[s, :needed] = pages
        logits_indices[s] = offset + n - 1
        offset += n
    return StepBatch(tokens=tokens, positions=positions, slot_mapping=slots,
                     query_start=query_start, kv_lens=kv_lens, page_table=page_table,
                     logits_indices=logits_indices, num_seqs=len(chunks),
                     num_tokens=num_tokens, max_query_len=Qm,
                     prefix_free=Qm > 1 and all(c.start == 0 for c in chunks))
