"""x [T, K] times one layer of a stacked quantized weight [L, N, K]: the kernel dispatch.

  * `matmul_impl == "cpu"`, float32 and T <= `quant_linear_max_rows()`: the native CPU kernel
    (`jaxinfer.cpu_kernels.quant_linear`), which reads the layer's packed weights in place.
  * `attention_impl` "pallas_gpu" / "pallas_tpu": the Pallas W4A16 / W8A16 kernels
    (`pallas_kernels.quant_matmul`; the interpreter on a CPU backend, as the attention does).
  * otherwise XLA: dequantize the layer's weight, then one dot (`layers.linear`).
Each kernel is used only when its module is present, so the XLA path is always the fallback.

Dimension legend: T tokens, N output features, K input features, L layers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxinfer import cpu_kernels
from jaxinfer.config import ModelConfig
from jaxinfer.errors import ConfigError
from jaxinfer.model.layers import linear
from jaxinfer.quant.calibrate import ActivationProbe
from jaxinfer.quant.format import QuantizedWeight, dequantize

_PALLAS_FUNCTIONS = {"pallas_gpu": ("gpu", "quant_matmul_gpu"),
                     "pallas_tpu": ("tpu", "quant_matmul_tpu")}
_PALLAS_BACKENDS = {"pallas_gpu": ("gpu", "cuda"), "pallas_tpu": ("tpu",)}


def native_max_rows() -> int:
    """Most rows the native quantized kernel takes (0: the kernel is not there)."""
    rows = getattr(cpu_kernels, "quant_linear_max_rows", None)
    if rows is None or not hasattr(cpu_kernels, "quant_linear"):
        return 0
    return int(rows())


def pallas_kernel(impl: str) -> Any:
    """The Pallas quantized matmul for `impl` ("pallas_gpu"/"pallas_tpu"), or None when the
    kernel package is not installed."""
    if impl not in _PALLAS_FUNCTIONS:
        return None
    module, name = _PALLAS_FUNCTIONS[impl]
    try:
        package = __import__(f"pallas_kernels.quant_matmul.{module}", fromlist=[name])
    except ImportError:
        return None
    return getattr(package, name, None)


def xla_quant_linear(x: jax.Array, w: QuantizedWeight, layer: jax.Array | int) -> jax.Array:
    """The XLA path: dequantize layer `layer` of w [L, N, K] in x's dtype, then x @ W.T."""
    return linear(x, dequantize(w[layer], x.dtype))


def quant_dense(cfg: ModelConfig, x: jax.Array, w: QuantizedWeight,
                layer: jax.Array | int) -> jax.Array:
    """x [T, K] times layer `layer` of w [L, N, K] -> [T, N] in x's dtype.

    Raises:
      ConfigError: x's width is not the weight's K.
    """
    if isinstance(w, ActivationProbe):  # calibration (jaxinfer.quant.calibrate): dense weight
        return w.apply(x, layer)
    K = w.shape[-1]
    if x.shape[-1] != K:
        raise ConfigError(f"input width {x.shape[-1]} does not match the quantized weight's "
                          f"K={K} (weight shape {w.shape})")
    rows, N = x.shape[0], w.shape[-2]
    # The native kernel vectorizes 32 input features at a time.
    if (cfg.matmul_impl == "cpu" and x.dtype == jnp.float32 and rows <= native_max_rows()
            and K % 32 == 0):
        cpu_kernels.require_cpu_backend("matmul_impl")
        return cpu_kernels.quant_linear(x, w.q, w.scale, w.offset, layer, bits=w.bits,
                                        group_size=w.group_size)
    kernel = pallas_kernel(cfg.attention_impl)
    if kernel is not None:
        backend = jax.default_backend()
        interpret = backend == "cpu"
        # Compiled kernels tile N in blocks of 16 (Triton dots) / 128 lanes (Mosaic, or N).
        tiles = N % 16 == 0 if cfg.attention_impl == "pallas_gpu" else (
            N % 128 == 0 or N <= 128)
        if interpret or (backend in _PALLAS_BACKENDS[cfg.attention_impl] and tiles):
            return kernel(x, w.q, w.scale, w.offset, bits=w.bits, group_size=w.group_size,
                          layer=layer, out_dtype=x.dtype, interpret=interpret)
    return xla_quant_linear(x, w, layer)
