"""Host-side tokenizer (Hugging Face `tokenizers`) built from a HF folder or GGUF metadata.

Also renders chat templates in a Jinja sandbox and streams text deltas. Never imports jax."""

from jaxinfer.tokenizer.core import END_OF_TURN_TOKENS, Tokenizer
from jaxinfer.tokenizer.streaming import IncrementalDetokenizer

__all__ = ["END_OF_TURN_TOKENS", "IncrementalDetokenizer", "Tokenizer"]
