"""Weight-only quantization: the packed group-wise format, quantizers, GGUF repacking and the
quantized matmul dispatch (docs/quantization.md)."""

from jaxinfer.quant.calibrate import activation_stats
from jaxinfer.quant.format import (
    KEEP_GGUF,
    QuantizedWeight,
    QuantScheme,
    dequantize,
    is_quantized,
    parse_scheme,
)
from jaxinfer.quant.quantize import dequantize_params, quantize_array, quantize_params

__all__ = [
    "KEEP_GGUF", "QuantScheme", "QuantizedWeight", "activation_stats", "dequantize",
    "dequantize_params",
    "is_quantized", "parse_scheme", "quantize_array", "quantize_params",
]
