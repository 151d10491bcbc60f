"""Ragged paged attention: decode tokens, prefill chunks and mixed batches over a paged cache.

`reference.py` is the pure-jnp oracle (and the XLA path); `gpu.py` the Pallas kernel lowered to
Triton; `tpu.py` the Pallas kernel lowered to Mosaic; `tuning.py` their block sizes.
"""

from pallas_kernels.ragged_paged_attention.gpu import ragged_paged_attention_gpu
from pallas_kernels.ragged_paged_attention.reference import (
    causal_prefill_attention_reference,
    paged_decode_attention_reference,
    ragged_paged_attention_reference,
)
from pallas_kernels.ragged_paged_attention.tpu import ragged_paged_attention_tpu

__all__ = ["causal_prefill_attention_reference", "paged_decode_attention_reference",
           "ragged_paged_attention_gpu", "ragged_paged_attention_reference",
           "ragged_paged_attention_tpu"]
