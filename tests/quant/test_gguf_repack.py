"""GGUF blocks repacked into our format equal `gguf.quants.dequantize` (the oracle)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

from jaxinfer.errors import CheckpointError
from jaxinfer.quant.format import dequantize_np
from jaxinfer.quant.gguf_repack import BLOCKS, repack, unify

# Byte offsets of each type's float16 fields (d, and m / dmin where present).
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
              "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
EXPECTED = {"Q8_0": (8, 32), "Q4_0": (4, 32), "Q4_1": (4, 32), "Q5_0": (8, 32),
            "Q5_1": (8, 32), "Q4_K": (4, 32), "Q5_K": (8, 32), "Q6_K": (8, 16)}


def _oracle(raw, type_name, shape):
    return dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(shape)


def _synthetic_blocks(type_name, rows, cols, seed):
    """Random blocks: every code, scale and min random, the float16 fields finite."""
    n, nbytes = BLOCKS[type_name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // n, nbytes), dtype=np.uint8)
    for at in F16_FIELDS[type_name]:
        values = rng.uniform(-0.05, 0.05, (rows, cols // n)).astype(np.float16)
        raw[..., at:at + 2] = values[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", sorted(BLOCKS))
def test_synthetic_blocks_repack_exactly(type_name):
    shape = (3, 512)
    raw = _synthetic_blocks(type_name, *shape, seed=len(type_name) + ord(type_name[1]))
    w = repack(raw, type_name, shape)
    assert (w.bits, w.group_size) == EXPECTED[type_name]
    want = _oracle(raw, type_name, shape)
    np.testing.assert_allclose(dequantize_np(w), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_blocks_written_by_gguf_quantize(type_name):
    w = np.random.default_rng(0).standard_normal((4, 96)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[type_name])
    np.testing.assert_array_equal(dequantize_np(repack(raw, type_name, w.shape)),
                                  _oracle(raw, type_name, w.shape))


def test_unify_keeps_values():
    """Mixed types in one stacked field (Gemma's ffn_down: Q4_K and Q6_K layers) meet at
    the widest bits and the smallest group without changing a value."""
    shape = (2, 256)
    parts = [repack(_synthetic_blocks(k, *shape, seed=i), k, shape)
             for i, k in enumerate(["Q4_K", "Q6_K", "Q4_0"])]
    unified = unify(parts)
    assert {(u.bits, u.group_size, u.offset is not None) for u in unified} == {(8, 16, True)}
    for before, after in zip(parts, unified, strict=True):
        np.testing.assert_array_equal(dequantize_np(after), dequantize_np(before))


def test_unsupported_and_corrupt_tensors_are_named():
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_up.*IQ4_NL.*cannot be kept"):
        repack(np.zeros((2, 36), np.uint8), "IQ4_NL", (2, 64), "blk.0.ffn_up.weight")
    with pytest.raises(CheckpointError, match="corrupt"):
        repack(np.zeros((2, 30), np.uint8), "Q8_0", (2, 64), "blk.0.ffn_up.weight")
