"""GGUF quantized blocks -> our group-wise format, exactly (host side, numpy).

Each ggml type is a block of 32 (or 256 for K-quants) values with its own scales. All of
them are `value = scale * q + offset` per group of 16 or 32, so they repack without loss:

  type   block bytes  ->  bits group  q                 scale     offset
  Q8_0   32     34        8    32     int8 as stored    d         -
  Q4_0   32     18        4    32     u - 8             d         -
  Q4_1   32     20        4    32     u - 8             d         m + 8d
  Q5_0   32     22        8    32     u - 16            d         -
  Q5_1   32     24        8    32     u                 d         m
  Q4_K   256    144       4    32     u - 8             d*sc      8*d*sc - dmin*m
  Q5_K   256    176       8    32     u                 d*sc      -dmin*m
  Q6_K   256    210       8    16     u - 32            d*sc      -

(u: the unsigned code in the block; sc/m: 6-bit sub-block scale and min of K-quants.) Scales
and offsets stay float16 when every value is a float16 (Q8_0's d), else float32 (m + 8d is
rarely a float16). Tensors of mixed types inside one stacked field are brought to a common
(bits, group) by `unify`: int4 unpacks to int8, a group splits by repeating its scale.

Dimension legend: N rows (output features), K input features, B blocks per row.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxinfer.errors import CheckpointError
from jaxinfer.quant.format import QuantizedWeight, pack_int4_np, unpack_int4_np

# type name -> (values per block, bytes per block)
BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22),
          "Q5_1": (32, 24), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
DENSE_TYPES = ("F32", "F16", "BF16")


def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes per entry (last axis) as float32 values of the stored float16."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles_split(qs: np.ndarray) -> np.ndarray:
    """Legacy 32-blocks: byte j holds element j (low nibble) and j + 16 (high nibble)."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: bit j of the little-endian 32-bit word is element j's fifth bit."""
    word = np.ascontiguousarray(qh).view("<u4")  # [..., 1]
    return ((word >> np.arange(32, dtype=np.uint32)) & np.uint32(1)).astype(np.uint8)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit (scale, min) pairs packed in 12 bytes of a Q4_K / Q5_K super-block.
    Sub-blocks 0-3 use the low 6 bits of bytes 0-3 (scale) and 4-7 (min); sub-blocks 4-7
    take 4 bits from bytes 8-11 and their top 2 bits from the top of bytes 0-3 / 4-7."""
    s = s.astype(np.uint8)
    lo_sc, lo_m, packed = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo_sc & 63, (packed & 15) | ((lo_sc >> 6) << 4)], axis=-1)
    m = np.concatenate([lo_m & 63, (packed >> 4) | ((lo_m >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), m.astype(np.float32)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: 4 chunks of 32 bytes; chunk c holds elements 64c + i (low nibble) and
    64c + 32 + i (high nibble). Returns [..., 256] codes."""
    chunks = qs.reshape(*qs.shape[:-1], 4, 32)
    both = np.stack([chunks & np.uint8(0x0F), chunks >> np.uint8(4)], axis=-2)  # [..., 4, 2, 32]
    return both.reshape(*qs.shape[:-1], 256)


def _decode(blocks: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, Any, int, int]:
    """blocks [N, B, bytes] -> (q int8 [N, B, n], scale [N, B, gpb], offset, bits, group)."""
    if kind == "Q8_0":
        return blocks[..., 2:].view(np.int8), _f16(blocks[..., 0:2])[..., None], None, 8, 32
    if kind in ("Q4_0", "Q4_1"):
        d = _f16(blocks[..., 0:2])[..., None]
        start = 2 if kind == "Q4_0" else 4
        q = _nibbles_split(blocks[..., start:start + 16]).astype(np.int8) - np.int8(8)
        offset = None if kind == "Q4_0" else _f16(blocks[..., 2:4])[..., None] + 8 * d
        return q, d, offset, 4, 32
    if kind in ("Q5_0", "Q5_1"):
        d = _f16(blocks[..., 0:2])[..., None]
        start = 2 if kind == "Q5_0" else 4
        u = _nibbles_split(blocks[..., start + 4:start + 20]) | (
            _high_bits(blocks[..., start:start + 4]) << np.uint8(4))
        if kind == "Q5_0":
            return u.astype(np.int8) - np.int8(16), d, None, 8, 32
        return u.astype(np.int8), d, _f16(blocks[..., 2:4])[..., None], 8, 32
    if kind in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blocks[..., 0:2])[..., None], _f16(blocks[..., 2:4])[..., None]
        sc, m = _k_scales(blocks[..., 4:16])
        scale, low = d * sc, dmin * m  # [N, B, 8]
        if kind == "Q4_K":
            u = _k_low_nibbles(blocks[..., 16:144])
            return u.astype(np.int8) - np.int8(8), scale, 8 * scale - low, 4, 32
        qh = blocks[..., 16:48]  # element 32j + i has its fifth bit at bit j of byte i
        high = (qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & np.uint8(1)
        u = _k_low_nibbles(blocks[..., 48:176]) | (
            high.reshape(*qh.shape[:-1], 256) << np.uint8(4))
        return u.astype(np.int8), scale, -low, 8, 32
    if kind == "Q6_K":
        ql, qh = blocks[..., 0:128], blocks[..., 128:192]
        scales = blocks[..., 192:208].view(np.int8).astype(np.float32)
        d = _f16(blocks[..., 208:210])[..., None]
        # Two halves of 128 values. In half h, value r has its low nibble in byte 64h + r % 64
        # (low nibble for r < 64, high for r >= 64) and its top 2 bits in byte 32h + r % 32 at
        # bit 2 * (r // 32).
        lead = blocks.shape[:-1]
        ql = ql.reshape(*lead, 2, 1, 64)
        low = (ql >> np.array([0, 4], np.uint8)[:, None]) & np.uint8(0x0F)  # [.., 2, 2, 64]
        qh = qh.reshape(*lead, 2, 1, 32)
        top = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & np.uint8(3)  # [.., 2, 4, 32]
        u = low.reshape(*lead, 256) | (top.reshape(*lead, 256) << np.uint8(4))
        return u.astype(np.int8) - np.int8(32), d * scales, None, 8, 16
    raise AssertionError(kind)


def _compact(a: np.ndarray) -> np.ndarray:
    """float16 when every value survives the round trip, else float32."""
    a = a.astype(np.float32)
    f16 = a.astype(np.float16)
    return f16 if np.array_equal(f16.astype(np.float32), a) else a


def repack(raw: np.ndarray, type_name: str, shape: tuple[int, int],
           where: str = "tensor") -> QuantizedWeight:
    """Repack one GGUF tensor's raw blocks into a `QuantizedWeight` of numpy arrays.

    Args:
      raw: the tensor's bytes, uint8 [N, B * block bytes] (`GGUFReader` tensor `.data`).
      type_name: the ggml type ("Q4_1", "Q6_K", ...; see `BLOCKS`).
      shape: the tensor's numpy-order shape (N, K).
      where: the tensor's name, for errors.

    Raises:
      CheckpointError: the type is not supported or the bytes do not fit the shape.
    """
    if type_name not in BLOCKS:
        raise CheckpointError(
            f"{where} is stored as {type_name}, which cannot be kept quantized (supported: "
            f"{', '.join(BLOCKS)}); load it without quantize='gguf' to dequantize it, or "
            "quantize it with quantize='int8' / 'int4'")
    n, nbytes = BLOCKS[type_name]
    N, K = shape
    if K % n or raw.size != N * (K // n) * nbytes:
        raise CheckpointError(
            f"{where}: {raw.size} bytes of {type_name} do not make a [{N}, {K}] tensor "
            f"({n} values per {nbytes}-byte block); the file is corrupt")
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(N, K // n, nbytes)
    q, scale, offset, bits, group = _decode(blocks, type_name)
    q = q.reshape(N, K)
    q = pack_int4_np(q) if bits == 4 else np.ascontiguousarray(q, dtype=np.int8)
    scale = _compact(scale.reshape(N, K // group))
    if offset is not None:
        offset = _compact(offset.reshape(N, K // group))
    return QuantizedWeight(q=q, scale=scale, offset=offset, bits=bits, group_size=group)


def convert_to(w: QuantizedWeight, bits: int, group_size: int, with_offset: bool,
               dtype: Any) -> QuantizedWeight:
    """The same values in a format at least as wide: 4 -> 8 bits (unpack), a group split
    into `group_size` pieces (scales repeated), a zero offset added, scales cast to `dtype`
    (only widening casts are exact; `unify` picks them)."""
    q = w.q
    if w.bits != bits:  # only 4 -> 8 is exact
        if (w.bits, bits) != (4, 8):
            raise ValueError(f"cannot convert {w.bits}-bit weights to {bits} bits exactly")
        q = unpack_int4_np(q)
    repeat = w.group_size // group_size
    scale = np.repeat(np.asarray(w.scale), repeat, axis=-1).astype(dtype)
    offset = None
    if with_offset:
        base = np.zeros_like(w.scale) if w.offset is None else np.asarray(w.offset)
        offset = np.repeat(base, repeat, axis=-1).astype(dtype)
    return QuantizedWeight(q=q, scale=scale, offset=offset, bits=bits, group_size=group_size)


def unify(parts: list[QuantizedWeight]) -> list[QuantizedWeight]:
    """Bring weights to one format (the widest bits, the smallest group, an offset if any
    has one, float32 scales unless all are float16) without changing a value."""
    bits = max(p.bits for p in parts)
    group = min(p.group_size for p in parts)
    with_offset = any(p.offset is not None for p in parts)
    dtypes = {np.dtype(a.dtype) for p in parts for a in (p.scale, p.offset) if a is not None}
    dtype = np.float16 if dtypes == {np.dtype(np.float16)} else np.float32
    return [convert_to(p, bits, group, with_offset, dtype) for p in parts]


def map_rows(w: QuantizedWeight, fn: Any) -> QuantizedWeight:
    """Apply a row transform (permutation, reshuffle; axis 0) to q, scale and offset alike."""
    return QuantizedWeight(q=fn(w.q), scale=fn(w.scale),
                           offset=None if w.offset is None else fn(w.offset),
                           bits=w.bits, group_size=w.group_size)


def combine(parts: list[QuantizedWeight], join: Any) -> QuantizedWeight:
    """Join several weights row-wise with `join(list_of_arrays) -> array` (e.g. the fused
    QKV or gate/up layouts), after bringing them to one format."""
    parts = unify(parts)
    first = parts[0]
    return QuantizedWeight(
        q=join([p.q for p in parts]), scale=join([p.scale for p in parts]),
        offset=None if first.offset is None else join([p.offset for p in parts]),
        bits=first.bits, group_size=first.group_size)


def stack(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack per-layer weights on a new leading L axis (after `unify`)."""
    return combine(parts, np.stack)
