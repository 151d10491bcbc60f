"""Ragged paged attention: decode tokens, prefill chunks and mixed batches over a paged cache."""

from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference

__all__ = ["ragged_paged_attention_reference"]
