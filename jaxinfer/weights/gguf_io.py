"""GGUF files: open with clear errors, read metadata, dequantize tensors (host side, numpy)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxinfer.errors import CheckpointError

GGUF_MAGIC = b"GGUF"


class GGUFFile:
    """A parsed GGUF file: `metadata` (key -> Python value) and tensors by name."""

    def __init__(self, path: str | os.PathLike[str]):
        import gguf  # imported lazily: it is only needed for GGUF models

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"GGUF file not found: {self.path}")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise CheckpointError(
                f"{self.path} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r}); "
                "pass a .gguf file or a Hugging Face folder with config.json"
            )
        try:
            self._reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # the reader only raises bare ValueErrors on bad files
            raise CheckpointError(
                f"{self.path} ({size} bytes) is truncated or corrupt and cannot be parsed "
                f"({type(e).__name__}: {e}); re-download or re-convert the file"
            ) from None
        self.tensors = {t.name: t for t in self._reader.tensors}
        last = max(self._reader.tensors, key=lambda t: int(t.data_offset), default=None)
        if last is not None and int(last.data_offset) + int(last.n_bytes) > size:
            raise CheckpointError(
                f"{self.path} is truncated: tensor {last.name!r} ends at byte "
                f"{int(last.data_offset) + int(last.n_bytes)} but the file has {size} bytes"
            )
        self._metadata: dict[str, Any] | None = None

    @property
    def metadata(self) -> dict[str, Any]:
        """All key/value metadata as plain Python values (arrays become lists)."""
        if self._metadata is None:
            meta: dict[str, Any] = {}
            for key, field in self._reader.fields.items():
                try:
                    meta[key] = field.contents()
                except Exception as e:
                    raise CheckpointError(
                        f"{self.path}: metadata field {key!r} is corrupt ({e})") from None
            self._metadata = meta
        return self._metadata

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Shape in numpy (row-major, PyTorch) order, i.e. ggml's order reversed."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def tensor_type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def read(self, name: str, dtype: Any = np.float32) -> np.ndarray:
        """Dequantize tensor `name` to `dtype` with its numpy-order shape."""
        from gguf.quants import dequantize

        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        t = self.tensors[name]
        try:
            array = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} ({t.tensor_type.name}) cannot be decoded ({e})"
            ) from None
        shape = self.tensor_shape(name)
        if array.size != int(np.prod(shape)):
            raise CheckpointError(
                f"{self.path}: tensor {name!r} holds {array.size} values, expected shape {shape}")
        array = array.reshape(shape)
        if not np.isfinite(array).all():
            raise CheckpointError(
                f"{self.path}: tensor {name!r} contains NaN or Inf after decoding; "
                "the file is corrupt"
            )
        return array.astype(dtype, copy=False)


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Metadata of a GGUF file as a dict of plain Python values."""
    return GGUFFile(path).metadata
