"""`IncrementalDetokenizer`: turns a growing list of generated token ids into text deltas
for streaming."""

from __future__ import annotations

from jaxinfer.tokenizer.core import Tokenizer

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
