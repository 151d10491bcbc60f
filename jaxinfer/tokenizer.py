"""Host-side tokenizer (Hugging Face `tokenizers`) built from a HF folder or GGUF metadata.

Also renders chat templates in a Jinja sandbox and streams text deltas. Never imports jax."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

from jaxinfer.errors import CheckpointError, InputError

logger = logging.getLogger(__name__)

__all__ = ["END_OF_TURN_TOKENS", "IncrementalDetokenizer", "Tokenizer"]

#: End-of-turn markers that may stop generation. One is a stop token only when it is the eos
#: token or the chat template writes it (so a base model never stops on, say, an
#: `<|endoftext|>` that merely exists in its vocabulary).
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")

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


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or remove the file") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object, not {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    """The token string of a tokenizer_config entry: a string or an AddedToken-like dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _id_list(value: Any) -> list[int]:
    """An int or a list of ints (as in generation_config.json eos_token_id) as a list."""
    if value is None or isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list | tuple):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _raise_exception(message: str) -> None:
    """`raise_exception()` for chat templates: the template rejects the conversation."""
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """`tojson` for chat templates: plain json.dumps, without Jinja's HTML escaping."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_chat_template(source: str) -> Any:
    """Compile a checkpoint's chat template in a sandbox, with transformers' Jinja settings."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks
        in some templates): renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise CheckpointError(
            f"the checkpoint's chat template does not parse (line {e.lineno}: {e.message}); "
            "fix the template or pass plain prompts") from None


# --------------------------------------------------------------------------------------------
# GGUF -> tokenizers backend
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids for one checkpoint, plus its chat template and stop tokens.

    Build it with `from_hf_dir` or `from_gguf_metadata`. Encoding matches transformers'
    `AutoTokenizer` for the same checkpoint (tested on SmolLM2 and Gemma 3 GGUFs).
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        vocab_size: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        prefix_ids: Sequence[int] = (),
        suffix_ids: Sequence[int] = (),
        chat_template: str | None = None,
        extra_stop_ids: Iterable[int] = (),
        source: str = "",
    ):
        """Wrap a `tokenizers.Tokenizer`; prefer the `from_*` constructors.

        Args:
            backend: the `tokenizers` tokenizer. Its post-processor is not used.
            vocab_size: ids the model knows (default: the backend's size with added tokens).
            bos_token_id: beginning-of-sequence id, or None.
            eos_token_id: end-of-sequence id, or None.
            prefix_ids: ids `encode` puts before the text when adding special tokens (BOS).
            suffix_ids: ids `encode` puts after the text when adding special tokens (EOS).
            chat_template: Jinja chat template source, or None for a base model.
            extra_stop_ids: further stop ids (generation_config.json eos ids, GGUF eot/eom).
            source: where the tokenizer came from, for messages.
        """
        self._backend = backend
        self.vocab_size: int = int(
            vocab_size if vocab_size is not None else backend.get_vocab_size(True))
        self.bos_token_id: int | None = bos_token_id
        self.eos_token_id: int | None = eos_token_id
        self._prefix = [int(i) for i in prefix_ids]
        self._suffix = [int(i) for i in suffix_ids]
        self._chat_template = chat_template or None
        self._compiled_template: Any = None
        self._source = source
        self.bos_token: str | None = self._id_to_token(bos_token_id)
        self.eos_token: str | None = self._id_to_token(eos_token_id)
        self.stop_token_ids: frozenset[int] = self._stop_ids(extra_stop_ids)
        self._byte_fallback_ids: frozenset[int] | None = None
        self._special_ids: frozenset[int] | None = None

    def _id_to_token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._backend.id_to_token(int(token_id))

    def _stop_ids(self, extra: Iterable[int]) -> frozenset[int]:
        """eos, the extra ids, and the END_OF_TURN_TOKENS that are the eos or that the chat
        template writes (a token the template never emits cannot end a turn)."""
        stops = {int(i) for i in extra}
        if self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        for token in END_OF_TURN_TOKENS:
            token_id = self._backend.token_to_id(token)
            if token_id is None:
                continue
            if token_id == self.eos_token_id or (
                    self._chat_template is not None and token in self._chat_template):
                stops.add(token_id)
        return frozenset(stops)

    def __repr__(self) -> str:
        return (f"Tokenizer(source={self._source!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"chat_template={self.has_chat_template})")

    # ---------------------------------------------------------------- constructors

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a Hugging Face tokenizer folder.

        Reads tokenizer.json (required), and when present tokenizer_config.json,
        special_tokens_map.json, chat_template.jinja / chat_template.json, generation_config.json
        and config.json. As in transformers 5, the tokenizer.json post-processor alone decides
        which special tokens `encode` adds (BOS/EOS); `add_bos_token` / `add_eos_token` in
        tokenizer_config.json are ignored when tokenizer.json exists.

        Args:
            path: the folder (or its tokenizer.json).

        Returns:
            The tokenizer.

        Raises:
            CheckpointError: tokenizer.json is missing or unreadable.
        """
        folder = Path(path)
        if folder.is_file():
            folder = folder.parent
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise CheckpointError(
                f"{folder} has no tokenizer.json; pass a Hugging Face model folder saved with "
                "a fast tokenizer (tokenizer.save_pretrained) or a .gguf file")
        try:
            backend = _Backend.from_file(str(tok_file))
        except Exception as e:
            raise CheckpointError(f"{tok_file} cannot be loaded ({e})") from None
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        gen_config = _read_json(folder / "generation_config.json")
        model_config = _read_json(folder / "config.json")

        def token_id(name: str) -> int | None:
            text = _token_text(config.get(name))
            if text is None:
                text = _token_text(special_map.get(name))
            if text is not None:
                found = backend.token_to_id(text)
                if found is not None:
                    return int(found)
            for source in (gen_config, model_config):
                ids = _id_list(source.get(f"{name}_id"))
                if ids:
                    return ids[0]
            return None

        bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
        prefix, suffix = _probe_special_affixes(backend)
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            prefix_ids=prefix,
            suffix_ids=suffix,
            chat_template=_hf_chat_template(folder, config),
            extra_stop_ids=_id_list(gen_config.get("eos_token_id")),
            source=str(folder),
        )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer a GGUF file describes from its metadata.

        "gpt2" vocabularies become a byte-level BPE with the file's merges and the pre-tokenizer
        `tokenizer.ggml.pre` names; "llama" (SentencePiece-style) ones a byte-fallback BPE
        whose merges are derived from the vocabulary and scores. Control tokens become special
        tokens and user-defined tokens added tokens, so both are matched whole in text.

        Args:
            meta: GGUF metadata as plain Python values (arrays as lists).

        Returns:
            The tokenizer.

        Raises:
            CheckpointError: the metadata has no usable tokenizer.
        """
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise CheckpointError(
                "GGUF metadata has no tokenizer.ggml.tokens: this file carries no tokenizer; "
                "use a GGUF converted with its vocabulary or a Hugging Face folder")
        tokens = [str(t) for t in tokens]
        types = meta.get("tokenizer.ggml.token_type")
        if types is None:
            types = [_NORMAL] * len(tokens)
        elif len(types) != len(tokens):
            raise CheckpointError(
                f"GGUF tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} "
                "tokens; the file is corrupt, re-convert it")
        types = [int(t) for t in types]
        kind = meta.get("tokenizer.ggml.model")
        pre = str(meta.get("tokenizer.ggml.pre", "default"))
        if kind == "gpt2":
            backend = _byte_level_backend(meta, tokens, types)
        elif kind == "llama":
            backend = _sentencepiece_backend(meta, tokens, types)
        else:
            raise CheckpointError(
                f"GGUF tokenizer.ggml.model {kind!r} is not supported (supported: 'gpt2' "
                "byte-level BPE, 'llama' SentencePiece); use a Hugging Face folder instead")

        def valid_id(key: str) -> int | None:
            value = _optional_int(meta.get(key))
            return value if value is not None and 0 <= value < len(tokens) else None

        bos_id = valid_id("tokenizer.ggml.bos_token_id")
        eos_id = valid_id("tokenizer.ggml.eos_token_id")
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:  # llama.cpp's defaults: SentencePiece and Llama-3 vocabularies add it
            add_bos = kind == "llama" or _GGUF_PRE_FAMILIES.get(pre) == "llama3"
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        extra_stops = [i for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                       if (i := valid_id(key)) is not None]
        return cls(
            backend,
            vocab_size=len(tokens),
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            prefix_ids=[bos_id] if add_bos and bos_id is not None else [],
            suffix_ids=[eos_id] if add_eos and eos_id is not None else [],
            chat_template=meta.get("tokenizer.chat_template") or None,
            extra_stop_ids=extra_stops,
            source=f"GGUF {meta.get('general.name') or meta.get('general.architecture') or ''}",
        )

    # ---------------------------------------------------------------- text <-> ids

    @property
    def has_chat_template(self) -> bool:
        """Whether the checkpoint ships a chat template (False for base models)."""
        return self._chat_template is not None

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template source, or None."""
        return self._chat_template

    @property
    def add_bos_token(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` starts with BOS."""
        return self.bos_token_id is not None and self._prefix[-1:] == [self.bos_token_id]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`.

        Special-token text such as "<|im_start|>" becomes its single id either way.

        Args:
            text: the text.
            add_special_tokens: add what the model wants around a sequence (usually BOS).

        Returns:
            The ids.
        """
        if not isinstance(text, str):
            raise InputError(f"text to encode must be a str, not {type(text).__name__}")
        ids: list[int] = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and (self._prefix or self._suffix):
            return self._prefix + ids + self._suffix
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids.

        Args:
            ids: token ids (ints, or anything int() accepts such as numpy integers).
            skip_special_tokens: leave out special (control) tokens such as BOS/EOS.

        Returns:
            The text; incomplete UTF-8 sequences come out as "\\ufffd".
        """
        id_list = [int(i) for i in ids]
        if any(i < 0 for i in id_list):
            raise InputError(f"token ids must be >= 0, got {min(id_list)}")
        return str(self._backend.decode(id_list, skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry spelled as the vocabulary spells it, or None."""
        token_id = self._backend.token_to_id(token)
        return None if token_id is None else int(token_id)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of an id, or None."""
        return self._id_to_token(token_id)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of special tokens (the ones `decode(..., skip_special_tokens=True)` leaves out)."""
        if self._special_ids is None:
            self._special_ids = frozenset(
                int(i) for i, t in self._backend.get_added_tokens_decoder().items() if t.special)
        return self._special_ids

    @property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of "<0xNN>" byte tokens when the decoder joins them (SentencePiece byte fallback)."""
        if self._byte_fallback_ids is None:
            ids: set[int] = set()
            if "ByteFallback" in repr(self._backend.decoder):
                for byte in range(256):
                    token_id = self._backend.token_to_id(f"<0x{byte:02X}>")
                    if token_id is not None:
                        ids.add(int(token_id))
            self._byte_fallback_ids = frozenset(ids)
        return self._byte_fallback_ids

    # ---------------------------------------------------------------- chat

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True, **template_vars: Any) -> str:
        """Render a conversation with the checkpoint's chat template (as transformers does).

        Args:
            messages: [{"role": ..., "content": ...}, ...].
            add_generation_prompt: end with the header that starts the assistant's turn.
            **template_vars: extra template variables (e.g. `enable_thinking=False`).

        Returns:
            The prompt text.

        Raises:
            InputError: the model has no chat template (a base model), the messages are not
                a list of dicts, or the template rejects the conversation.
        """
        if self._chat_template is None:
            raise InputError(
                f"this model ({self._source or 'tokenizer'}) has no chat template: it is a base "
                "model, not a chat model. Send a plain text prompt instead of chat messages.")
        if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not all(
                isinstance(m, Mapping) for m in messages):
            raise InputError(
                "chat messages must be a list of dicts like {'role': 'user', 'content': 'hi'}")
        if self._compiled_template is None:
            self._compiled_template = _compile_chat_template(self._chat_template)
        import jinja2

        variables: dict[str, Any] = {
            "tools": None, "documents": None,
            "bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
        }
        variables.update(template_vars)
        variables["messages"] = [dict(m) for m in messages]
        variables["add_generation_prompt"] = add_generation_prompt
        try:
            return str(self._compiled_template.render(**variables))
        except jinja2.exceptions.TemplateError as e:
            raise InputError(f"the chat template rejected the conversation: {e}") from None

    def encode_chat(self, messages: list[dict[str, Any]],
                    add_generation_prompt: bool = True, **template_vars: Any) -> list[int]:
        """Token ids of a rendered conversation.

        The rendered text is encoded without the sequence affixes `encode` adds; BOS is put
        first only when the model adds BOS and the template did not already write it.

        Args:
            messages: [{"role": ..., "content": ...}, ...].
            add_generation_prompt: end with the header that starts the assistant's turn.
            **template_vars: extra template variables.

        Returns:
            The prompt ids.
        """
        text = self.apply_chat_template(messages, add_generation_prompt, **template_vars)
        ids = self.encode(text, add_special_tokens=False)
        if self._prefix and ids[:len(self._prefix)] != self._prefix:
            ids = self._prefix + ids
        return ids


def _probe_special_affixes(backend: _Backend) -> tuple[list[int], list[int]]:
    """The ids a tokenizer.json post-processor puts before and after a single sequence."""
    if backend.post_processor is None:
        return [], []
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain):])
    logger.warning("could not tell which special tokens the tokenizer adds; adding none")
    return [], []


def _hf_chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """The chat template of a HF folder: chat_template.jinja, chat_template.json, or
    tokenizer_config.json's "chat_template" (a string, or a list of named templates)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8") or None
    template: Any = _read_json(folder / "chat_template.json").get("chat_template")
    if template is None:
        template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) and template else None


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------

_CONTEXT_TOKENS = 6  # prompt tokens kept as left context for the first decoded window


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas for streaming.

    vLLM-style prefix/read offsets: each `add` decodes a small window of recent ids twice (up
    to the read offset, and to the end) and emits the difference, holding text back while it
    ends in an incomplete UTF-8 sequence ("\\ufffd") or in a SentencePiece byte-token run
    (whose bytes are only valid or invalid as a whole). `flush()` emits what is held at the end.

    Guarantee: the deltas of all `add` calls plus `flush()` concatenate to exactly
    `tokenizer.decode(generated_ids, skip_special_tokens)`, for any ids. Call `flush()` when the
    stream ends, or a final unfinished character / byte run is never emitted. `prompt_ids`
    give the first tokens their left context: that changes nothing for byte-level BPE or Gemma
    style vocabularies, and for Llama-2 style ones (whose decode strips the leading space of a
    sequence) keeps the space the first generated token carries, as a continuation should.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True):
        """Start a stream.

        Args:
            tokenizer: the tokenizer.
            prompt_ids: the prompt, used only as decoding context (never emitted).
            skip_special_tokens: leave special tokens out of the text, as `decode` does.
        """
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        # Ids after which a byte-fallback run may still go on: byte tokens, and special tokens
        # when they are skipped (decode drops them before joining the bytes on either side).
        self._run_ids = tokenizer.byte_fallback_ids
        if self._run_ids and skip_special_tokens:
            self._run_ids = self._run_ids | tokenizer.special_ids
        context = [int(i) for i in (prompt_ids or [])][-_CONTEXT_TOKENS:]
        # Context helps only if it ends cleanly, at a character and byte-run boundary.
        if context and (context[-1] in self._run_ids
                        or self._decode(context).endswith("\ufffd")):
            context = []
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(context)
        self._text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._text

    def add(self, token_id: int) -> str:
        """Append one generated id.

        Args:
            token_id: the id.

        Returns:
            The new text (possibly "").
        """
        token_id = int(token_id)
        self._ids.append(token_id)
        if token_id in self._run_ids:
            return ""  # a byte run decodes only as a whole: wait for its end
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith("\ufffd"):
            return ""
        return self._emit(new_text)

    def flush(self) -> str:
        """Emit the text held back (an unfinished character or byte run) at the stream's end.

        Returns:
            The remaining text (possibly "").
        """
        if self._read_offset == len(self._ids):
            return ""
        return self._emit(self._decode(self._ids[self._prefix_offset:]))

    def _emit(self, new_text: str) -> str:
        if new_text.startswith(self._prefix_text):
            delta = new_text[len(self._prefix_text):]
        else:  # cannot happen with the decoders built here; keep going with the best guess
            common = 0
            for a, b in zip(new_text, self._prefix_text, strict=False):
                if a != b:
                    break
                common += 1
            delta = new_text[common:]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        self._text += delta
        return delta

