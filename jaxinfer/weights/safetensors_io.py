"""Hugging Face safetensors (single file or sharded index), read with full validation.

The header is checked against the file before any tensor is touched, so a truncated or
corrupt file fails with the file and tensor named instead of reading garbage.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxinfer.errors import CheckpointError

DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One `.safetensors` file, memory-mapped; `read(name)` returns a numpy array."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"safetensors file not found: {self.path}")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path} is truncated: {size} bytes, no header")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise CheckpointError(
                    f"{self.path} is truncated or not a safetensors file: header claims "
                    f"{header_len} bytes, the file has {size}")
            raw = f.read(header_len)
        try:
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path} has a corrupt header ({e})") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        self.entries: dict[str, tuple[Any, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(
                    f"{self.path}: header entry for tensor {name!r} is malformed or has an "
                    f"unsupported dtype: {info!r}") from None
            expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if end - begin != expected or begin < 0:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} spans {end - begin} bytes but shape {shape} "
                    f"of {info['dtype']} needs {expected}; the file is corrupt")
            if end > data_size:
                raise CheckpointError(
                    f"{self.path} is truncated: tensor {name!r} ends at byte "
                    f"{self._data_start + end}, the file has {size} bytes")
            self.entries[name] = (dtype, shape, begin, end)
        self._mmap: np.ndarray | None = None

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy array in its stored dtype."""
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        dtype, shape, begin, end = self.entries[name]
        raw = self._mmap[self._data_start + begin:self._data_start + end]
        return raw.view(dtype).reshape(shape)


class SafetensorsCheckpoint:
    """All tensors of a Hugging Face folder: `model.safetensors` or a sharded index."""

    def __init__(self, folder: str | os.PathLike[str]):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index} is corrupt ({e})") from None
            for name, fname in weight_map.items():
                if fname not in self.files:
                    path = folder / fname
                    if not path.is_file():
                        raise CheckpointError(
                            f"{index} lists shard {fname!r} (for tensor {name!r}) but "
                            f"{path} is missing")
                    self.files[fname] = SafetensorsFile(path)
                if name not in self.files[fname].entries:
                    raise CheckpointError(
                        f"{index} places tensor {name!r} in {fname}, which does not contain it")
                self.where[name] = fname
        else:
            shards = sorted(folder.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(
                    f"no weights in {folder}: expected model.safetensors or "
                    "model.safetensors.index.json")
            for path in shards:
                f = SafetensorsFile(path)
                self.files[path.name] = f
                for name in f.names():
                    self.where[name] = path.name

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[self.where[name]].shape(name)

    def read(self, name: str) -> np.ndarray:
        return self.files[self.where[name]].read(name)

    def describe(self, name: str) -> str:
        return f"{name!r} in {self.files[self.where[name]].path}"
