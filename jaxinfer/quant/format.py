"""The quantized weight format: `QuantizedWeight` (a pytree) and `QuantScheme` (what to make).

A linear weight W [..., N, K] (PyTorch layout, y = x @ W.T) is quantized in groups of
`group_size` consecutive input features:

    W[n, k] = q[n, k] * scale[n, k // g] + (offset[n, k // g] if offset is not None else 0)

bits=8 stores q as int8 [..., N, K]; bits=4 packs two values per uint8 [..., N, K // 2]
(element 2j in the low nibble of byte j, 2j+1 in the high nibble, nibble u meaning q = u - 8).
scale/offset are [..., N, K // g] in float32, float16 or bfloat16. Every leaf keeps the
weight's leading axes (the stacked layer axis L), so `jax.tree.map(lambda a: a[layer], ...)`
slices a `QuantizedWeight` like a dense weight.

Dimension legend: L layers, N output features, K input features, G = K // group_size groups.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import ConfigError

GROUP_SIZES = (16, 32, 64, 128, 256)
BITS = (4, 8)
SCALE_DTYPES = ("float32", "float16", "bfloat16")
# Quantizers: round to nearest, per-group clipping search (jaxinfer.quant.quantize).
METHODS = ("rtn", "mse")
# `quantize="gguf"`: keep a GGUF file's own quantized tensors (repacked, not expanded).
KEEP_GGUF = "gguf"


@flax.struct.dataclass
class QuantizedWeight:
    """A group-wise quantized weight [..., N, K] (see the module docstring for the format)."""

    q: Any  # int8 [..., N, K] (bits=8) or uint8 [..., N, K // 2] (bits=4)
    scale: Any  # [..., N, G]
    offset: Any = None  # [..., N, G] or None (symmetric)
    bits: int = flax.struct.field(pytree_node=False, default=8)
    group_size: int = flax.struct.field(pytree_node=False, default=32)

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (dequantized) shape [..., N, K]."""
        *lead, last = self.q.shape
        return (*lead, last * 8 // self.bits)

    @property
    def ndim(self) -> int:
        return len(self.q.shape)

    def __getitem__(self, index: Any) -> QuantizedWeight:
        """Index the leading axes (layers; `w[None]` adds one) of every leaf alike. Indexing
        the last two axes is not meaningful for packed groups and is not supported."""
        return jax.tree.map(lambda a: a[index], self)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                   for a in jax.tree.leaves(self))


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedWeight)


def check_quantized(w: QuantizedWeight, name: str = "weight") -> None:
    """Raise ConfigError unless `w`'s leaves agree with the format (shapes, dtypes, bits)."""
    if w.bits not in BITS:
        raise ConfigError(f"{name}: bits={w.bits} is not supported; use 4 or 8")
    if w.group_size not in GROUP_SIZES:
        raise ConfigError(f"{name}: group_size={w.group_size} is not one of {GROUP_SIZES}")
    want_q = "int8" if w.bits == 8 else "uint8"
    if np.dtype(w.q.dtype) != np.dtype(want_q):
        raise ConfigError(f"{name}: bits={w.bits} stores q as {want_q}, got {w.q.dtype}")
    *lead, K = w.shape
    if K % w.group_size:
        raise ConfigError(f"{name}: group_size {w.group_size} does not divide K={K}")
    groups = (*lead, K // w.group_size)
    for label, a in (("scale", w.scale), ("offset", w.offset)):
        if a is None:
            continue
        if tuple(a.shape) != groups:
            raise ConfigError(f"{name}: {label} has shape {tuple(a.shape)}, expected {groups} "
                              f"for q {tuple(w.q.shape)} with group_size {w.group_size}")
        if str(np.dtype(a.dtype)) not in SCALE_DTYPES:
            raise ConfigError(f"{name}: {label} dtype {a.dtype} is not one of {SCALE_DTYPES}")


# ----------------------------------------------------------------------------- schemes
@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """How to quantize dense weights: `bits`, `group_size`, symmetric (no offset) or
    asymmetric (with offset), and the `method` choosing each group's scale (and offset).
    Spelled `int8`, `int4-g64`, `int4-g128-asym`, `int4-rtn`.

    `method`: "mse" searches each group's clipping (and zero point) for the least squared
    error of the dequantized group; "rtn" rounds to nearest on the group's full range
    (`jaxinfer.quant.quantize`). None picks the default of `bits`: mse for 4 bits, rtn for 8.

    `head_bits` is the width of the embedding / LM head: 8 unless asked (`int4-head4`).
    llama.cpp's 4-bit files keep them at 8 bits too; on SmolLM2-135M a 4-bit embedding alone
    cost +6% perplexity (docs/quantization.md).
    """

    bits: int = 8
    group_size: int = 128
    symmetric: bool = True
    head_bits: int = 8
    method: str | None = None

    def __post_init__(self) -> None:
        if self.bits not in BITS or self.head_bits not in BITS:
            bits = self.bits if self.bits not in BITS else self.head_bits
            raise ConfigError(f"quantization bits={bits} is not supported; use 4 or 8")
        if self.group_size not in GROUP_SIZES:
            raise ConfigError(
                f"quantization group size {self.group_size} is not one of {GROUP_SIZES}")
        if self.method is None:
            object.__setattr__(self, "method", default_method(self.bits))
        if self.method not in METHODS:
            raise ConfigError(f"quantization method {self.method!r} is not one of {METHODS}")

    @property
    def name(self) -> str:
        head = f"-head{self.head_bits}" if self.head_bits != max(self.bits, 8) else ""
        method = f"-{self.method}" if self.method != default_method(self.bits) else ""
        kind = "sym" if self.symmetric else "asym"
        return f"int{self.bits}-g{self.group_size}-{kind}{method}{head}"

    @property
    def head(self) -> QuantScheme:
        """The scheme of the embedding / LM head (its bits' default method unless the head
        has the projections' bits)."""
        method = self.method if self.head_bits == self.bits else None
        return dataclasses.replace(self, bits=self.head_bits, method=method)


def default_method(bits: int) -> str:
    """The quantizer a scheme uses unless it names one: the clipping search for 4 bits
    (round to nearest costs SmolLM2 far more there), round to nearest for 8."""
    return "mse" if bits == 4 else "rtn"


_SCHEME = re.compile(r"int(?P<bits>\d+)(?:-g(?P<group>\d+))?(?:-(?P<kind>sym|asym))?"
                     r"(?:-(?P<method>rtn|mse))?(?:-head(?P<head>\d+))?")


def parse_scheme(scheme: str | QuantScheme) -> QuantScheme:
    """`"int8"`, `"int4"`, `"int4-g64"`, `"int4-g128-asym"`, `"int4-rtn"`, `"int4-head4"` ...
    -> `QuantScheme`.

    Defaults: group 128, symmetric, method mse for 4 bits / rtn for 8, embedding / LM head at
    8 bits. Raises ConfigError naming the accepted forms.
    """
    if isinstance(scheme, QuantScheme):
        return scheme
    text = str(scheme).strip().lower()
    match = _SCHEME.fullmatch(text)
    if match is None:
        raise ConfigError(
            f"unknown quantization scheme {scheme!r}; use int8 or int4, optionally with a "
            f"group size and kind: int4-g64, int8-g32-asym (groups {GROUP_SIZES}), -rtn or "
            f"-mse for the quantizer (round to nearest / clipping search), -head4 "
            f"for a 4-bit embedding / LM head, or "
            f"{KEEP_GGUF!r} to keep a GGUF file's quantized tensors")
    group = int(match["group"]) if match["group"] else 128
    bits = int(match["bits"])
    head = int(match["head"]) if match["head"] else max(bits, 8)
    return QuantScheme(bits=bits, group_size=group, symmetric=match["kind"] != "asym",
                       head_bits=head, method=match["method"])


def scheme_label(quantize: str | QuantScheme | None) -> str | None:
    """The canonical name of a `quantize` argument (None, "gguf" or a scheme name)."""
    if quantize is None:
        return None
    if isinstance(quantize, str) and quantize.strip().lower() == KEEP_GGUF:
        return KEEP_GGUF
    return parse_scheme(quantize).name


# ----------------------------------------------------------------------------- int4 packing
def pack_int4_np(q: np.ndarray) -> np.ndarray:
    """Signed 4-bit values int8 [..., K] in [-8, 7] -> packed uint8 [..., K // 2] (host)."""
    u = (q.astype(np.int16) + 8).astype(np.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << np.uint8(4))).astype(np.uint8)


def unpack_int4_np(packed: np.ndarray) -> np.ndarray:
    """Inverse of `pack_int4_np`: uint8 [..., K // 2] -> int8 [..., K] (host)."""
    low = (packed & np.uint8(0x0F)).astype(np.int8) - np.int8(8)
    high = (packed >> np.uint8(4)).astype(np.int8) - np.int8(8)
    return np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _unpack_int4(packed: jax.Array) -> jax.Array:
    low = (packed & jnp.uint8(0x0F)).astype(jnp.int8) - jnp.int8(8)
    high = (packed >> jnp.uint8(4)).astype(jnp.int8) - jnp.int8(8)
    return jnp.stack([low, high], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _reference_dequantize() -> Any:
    """The Pallas kernel package's jnp dequantize when it is present (one implementation of
    the format for kernels and model), else None."""
    try:
        from pallas_kernels.quant_matmul.reference import dequantize
    except ImportError:
        return None
    return dequantize


def dequantize(w: QuantizedWeight, dtype: Any = jnp.float32) -> jax.Array:
    """The dense weight [..., N, K] in `dtype` (computed in float32, jit-able)."""
    reference = _reference_dequantize()
    if reference is not None:
        return reference(w.q, w.scale, w.offset, bits=w.bits, group_size=w.group_size,
                         dtype=dtype)
    q = _unpack_int4(w.q) if w.bits == 4 else w.q
    *lead, K = q.shape
    G, g = K // w.group_size, w.group_size
    values = q.reshape(*lead, G, g).astype(jnp.float32) * w.scale.astype(jnp.float32)[..., None]
    if w.offset is not None:
        values = values + w.offset.astype(jnp.float32)[..., None]
    return values.reshape(*lead, K).astype(dtype)


def dequantize_np(w: QuantizedWeight) -> np.ndarray:
    """The dense weight as float32 numpy (host; for converters and tests)."""
    q = unpack_int4_np(np.asarray(w.q)) if w.bits == 4 else np.asarray(w.q)
    *lead, K = q.shape
    g = w.group_size
    values = q.reshape(*lead, K // g, g).astype(np.float32)
    values = values * np.asarray(w.scale, np.float32)[..., None]
    if w.offset is not None:
        values = values + np.asarray(w.offset, np.float32)[..., None]
    return values.reshape(*lead, K)
