"""Build a Hugging Face `tokenizers` backend from GGUF tokenizer metadata: byte-level
("gpt2") and SentencePiece-style ("llama") vocabularies, with their added tokens."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

from jaxinfer.errors import CheckpointError

logger = logging.getLogger(__name__)

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_SPIECE_SPACE = "\u2581"  # "▁", SentencePiece's spelling of a space

# Pre-tokenizer split regexes, as llama.cpp (llama-vocab.cpp) and the models' tokenizer.json use
# (GPT-2's own regex is built into the ByteLevel pre-tokenizer).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` -> pre-tokenizer family, for byte-level ("gpt2") GGUF vocabularies.
# "gpt2": the GPT-2 regex; "digits": every digit alone, then the GPT-2 regex (StarCoder,
# SmolLM); "llama3" / "qwen2": their split regex. Anything else falls back to "gpt2".
_GGUF_PRE_FAMILIES = {
    "gpt-2": "gpt2",
    "gpt2": "gpt2",
    "default": "gpt2",
    "smollm": "digits",
    "starcoder": "digits",
    "refact": "digits",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "llama-bpe": "llama3",
    "qwen2": "qwen2",
    "deepseek-r1-qwen": "qwen2",
}


def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies.

    Bytes that are printable Latin-1 characters stand for themselves; the others (controls,
    space, DEL, NBSP, soft hyphen) are assigned U+0100, U+0101, ... in byte order.
    """
    kept = set(range(ord("!"), ord("~") + 1))
    kept |= set(range(ord("\u00a1"), ord("\u00ac") + 1))
    kept |= set(range(ord("\u00ae"), ord("\u00ff") + 1))
    table: dict[int, str] = {}
    shifted = 0
    for byte in range(256):
        if byte in kept:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


_BYTE_TO_CHAR = _byte_to_char()
_BYTE_ALPHABET = frozenset(_BYTE_TO_CHAR.values())


def _respell_bytes(text: str) -> str:
    """Spell `text` in the byte-level alphabet (its UTF-8 bytes through `_BYTE_TO_CHAR`)."""
    return "".join(_BYTE_TO_CHAR[b] for b in text.encode("utf-8"))


def _sentencepiece_merges(
    pieces: Sequence[str], types: Sequence[int], scores: Sequence[float],
    vocab: Mapping[str, int],
) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece-style vocabulary that stores scores, not merges.

    SentencePiece BPE joins, at each step, the adjacent pair whose joined piece scores best. As
    a ranked merge list: every split of a piece into two in-vocab halves is a merge, ranked by
    the joined piece. User-defined pieces (SentencePiece matches them whole, before BPE) come
    first, in vocabulary order; normal pieces follow by score, best first (ties: lower id).
    Within one piece, splits with the longer left half come first. Control, byte and unused
    pieces are never merge results: text never spells them through merges.

    Args:
        pieces: the vocabulary, spaces spelled "▁".
        types: GGUF token types, one per piece.
        scores: SentencePiece scores, one per piece.
        vocab: piece -> id.

    Returns:
        (left, right) merges, highest priority first.
    """
    user = [i for i, t in enumerate(types) if t == _USER_DEFINED]
    normal = [i for i, t in enumerate(types) if t == _NORMAL]
    normal.sort(key=lambda i: (-scores[i], i))
    merges: list[tuple[str, str]] = []
    append = merges.append
    for order in (user, normal):
        for i in order:
            piece = pieces[i]
            for cut in range(len(piece) - 1, 0, -1):
                left = piece[:cut]
                if left in vocab:
                    right = piece[cut:]
                    if right in vocab:
                        append((left, right))
    return merges


def _sentencepiece_backend(meta: Mapping[str, Any], tokens: list[str],
                           types: list[int]) -> _Backend:
    """A byte-fallback BPE equivalent to a GGUF "llama" (SentencePiece-style) vocabulary."""
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise CheckpointError(
            "GGUF tokenizer.ggml.model is 'llama' but tokenizer.ggml.scores is missing or has "
            f"the wrong length ({None if scores is None else len(scores)} for {len(tokens)} "
            "tokens); the file's tokenizer is incomplete, re-convert it")
    # llama.cpp's converter writes spaces in user-defined pieces as " "; the vocabulary the
    # BPE works on spells them "▁" (e.g. Gemma's runs of 2..31 spaces).
    pieces = [
        tok.replace(" ", _SPIECE_SPACE) if typ == _USER_DEFINED and tok and not tok.strip(" ")
        else tok
        for tok, typ in zip(tokens, types, strict=True)
    ]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = _sentencepiece_merges(pieces, types, scores, vocab)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = pieces[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(pieces) else None
    backend = _Backend(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                           byte_fallback=True, dropout=None))
    add_prefix_space = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [decoders.Replace(_SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        # Llama-2 style: "▁" before the text (only the first segment, like HF's non-legacy
        # Llama tokenizer), and the decoder strips it again.
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=_SPIECE_SPACE, prepend_scheme="first", split=False)
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    else:
        # Gemma style: spaces become "▁" and nothing is prepended.
        backend.normalizer = normalizers.Replace(" ", _SPIECE_SPACE)
    backend.decoder = decoders.Sequence(steps)
    respelled = {i for i, (a, b) in enumerate(zip(tokens, pieces, strict=True)) if a != b}
    _add_gguf_added_tokens(backend, pieces, types, skip=respelled)
    return backend


def _byte_level_pre_tokenizer(pre: str) -> tuple[Any, bool]:
    """(pre-tokenizer, ignore_merges) for a byte-level GGUF vocabulary's `tokenizer.ggml.pre`."""
    family = _GGUF_PRE_FAMILIES.get(pre)
    if family is None:
        logger.warning(
            "GGUF pre-tokenizer %r is not one jaxinfer knows; splitting text like GPT-2. "
            "Token ids may differ from llama.cpp for this model.", pre)
        family = "gpt2"
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if family == "gpt2":
        return byte_level, False
    if family == "digits":
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]), False
    split = _LLAMA3_SPLIT if family == "llama3" else _QWEN2_SPLIT
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]), family == "llama3"


def _byte_level_backend(meta: Mapping[str, Any], tokens: list[str],
                        types: list[int]) -> _Backend:
    """A byte-level BPE (GPT-2 style) from a GGUF "gpt2" vocabulary and its merges."""
    raw_merges = meta.get("tokenizer.ggml.merges")
    if not raw_merges:
        raise CheckpointError(
            "GGUF tokenizer.ggml.model is 'gpt2' but tokenizer.ggml.merges is missing; "
            "the file's tokenizer is incomplete, re-convert it")
    # Normal tokens are stored in the byte alphabet ("Ġthe"); control and user-defined tokens
    # are stored as their literal text and are matched whole in the input, so they stay so.
    vocab: dict[str, int] = {}
    for i, (tok, typ) in enumerate(zip(tokens, types, strict=True)):
        if typ in (_CONTROL, _UNKNOWN, _USER_DEFINED) or _BYTE_ALPHABET.issuperset(tok):
            vocab[tok] = i
        else:
            vocab[_respell_bytes(tok)] = i
    merges: list[tuple[str, str]] = []
    for merge in raw_merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise CheckpointError(f"GGUF tokenizer.ggml.merges has a malformed entry {merge!r}")
        merges.append((left, right))
    pre_tokenizer, ignore_merges = _byte_level_pre_tokenizer(
        str(meta.get("tokenizer.ggml.pre", "default")))
    try:
        model = BPE(vocab=vocab, merges=merges, dropout=None, ignore_merges=ignore_merges)
    except Exception as e:
        raise CheckpointError(f"GGUF byte-level vocabulary and merges disagree ({e})") from None
    backend = _Backend(model)
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    _add_gguf_added_tokens(backend, tokens, types, skip=set())
    return backend


def _add_gguf_added_tokens(backend: _Backend, pieces: Sequence[str], types: Sequence[int],
                           skip: set[int]) -> None:
    """Make control (and unknown) tokens special and user-defined tokens added tokens, so both
    are matched whole in text: "<|im_start|>" in a chat prompt encodes to its one id.
    """
    control = [AddedToken(p, special=True, normalized=False)
               for i, (p, t) in enumerate(zip(pieces, types, strict=True))
               if t in (_CONTROL, _UNKNOWN) and p and i not in skip]
    user = [AddedToken(p, special=False, normalized=False)
            for i, (p, t) in enumerate(zip(pieces, types, strict=True))
            if t == _USER_DEFINED and p and i not in skip]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)
