"""Weight-only quantized matmul (W8A16 / W4A16) over group-quantized, packed weights.

`reference.py` holds the format's checks, int4 packing, `dequantize` and the pure-jnp
oracle `quant_matmul_reference`; `gpu.py` the Pallas kernel lowered to Triton; `tpu.py`
the Pallas kernel lowered to Mosaic; `tuning.py` their block sizes and memory estimates.
"""

from pallas_kernels.quant_matmul.gpu import quant_matmul_gpu, to_halves_layout
from pallas_kernels.quant_matmul.reference import (
    dequantize,
    pack_int4,
    quant_matmul_reference,
    unpack_int4,
)
from pallas_kernels.quant_matmul.tpu import quant_matmul_tpu
from pallas_kernels.quant_matmul.tuning import gpu_tuning, tpu_tuning

__all__ = ["dequantize", "gpu_tuning", "pack_int4", "quant_matmul_gpu",
           "quant_matmul_reference", "quant_matmul_tpu", "to_halves_layout", "tpu_tuning",
           "unpack_int4"]
