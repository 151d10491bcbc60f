"""Flash attention for long packed prefill (causal, GQA, segments, sliding window, soft cap).

`flash_attention_gpu` lowers through Triton, `flash_attention_tpu` through Mosaic; both
match `flash_attention_reference` and take block sizes from `flash_tuning` by default.
"""

from pallas_kernels.flash_attention.gpu import flash_attention_gpu
from pallas_kernels.flash_attention.reference import attention_mask, flash_attention_reference
from pallas_kernels.flash_attention.tpu import flash_attention_tpu
from pallas_kernels.flash_attention.tuning import FLASH_TUNING, FlashTuning, flash_tuning

__all__ = [
    "FLASH_TUNING",
    "FlashTuning",
    "attention_mask",
    "flash_attention_gpu",
    "flash_attention_reference",
    "flash_attention_tpu",
    "flash_tuning",
]
