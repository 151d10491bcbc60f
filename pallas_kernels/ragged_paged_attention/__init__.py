"""Ragged paged attention: decode tokens, prefill chunks and mixed batches over a paged cache."""

from pallas_kernels.ragged_paged_attention.reference import (
    causal_prefill_attention_reference,
    paged_decode_attention_reference,
    ragged_paged_attention_reference,
)

__all__ = ["causal_prefill_attention_reference", "paged_decode_attention_reference",
           "ragged_paged_attention_reference"]
