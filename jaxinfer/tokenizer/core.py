"""The `Tokenizer` class: text <-> token ids, chat template and stop tokens for one checkpoint,
loaded from a Hugging Face folder or GGUF metadata."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Backend

from jaxinfer.errors import CheckpointError, InputError
from jaxinfer.tokenizer.chat import _compile_chat_template, _hf_chat_template
from jaxinfer.tokenizer.gguf_vocab import (
    _GGUF_PRE_FAMILIES,
    _NORMAL,
    _byte_level_backend,
    _sentencepiece_backend,
)
from jaxinfer.tokenizer.jsonio import _read_json

logger = logging.getLogger(__name__)

#: End-of-turn markers that may stop generation. One is a stop token only when it is the eos
#: token or the chat template writes it (so a base model never stops on, say, an
#: `<|endoftext|>` that merely exists in its vocabulary).
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


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
