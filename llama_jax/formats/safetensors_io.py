"""Reading safetensors files tensor by tensor, with clear errors for bad files.

The format is an 8-byte little-endian header length, a JSON header naming
each tensor's dtype, shape and byte range, then the raw bytes. Each tensor is
read straight into its own array, so host memory holds the tensors asked for
and nothing else (a memory map's touched pages would count as resident too),
and checking the byte ranges first turns a truncated download into one clear
line instead of garbage weights.
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from llama_jax.paths import open_ranged, user_path

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointFileError(ValueError):
    """A checkpoint file is missing, truncated or inconsistent (one-line message)."""


class SafetensorsFile:
    """Lazy access to the tensors of one `.safetensors` file."""

    def __init__(self, path: str | os.PathLike):
        self.path = user_path(path)
        if not self.path.is_file():
            raise CheckpointFileError(f"{self.path}: file not found")
        size = self.path.stat().length
        with open_ranged(self.path) as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointFileError(f"{self.path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", head)
            if 8 + header_len > size:
                raise CheckpointFileError(f"{self.path}: truncated safetensors file (header cut off)")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointFileError(f"{self.path}: not a safetensors file (bad header)") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._entries = header
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in DTYPES:
                raise CheckpointFileError(f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}")
            expected = math.prod(entry["shape"]) * np.dtype(DTYPES[entry["dtype"]]).itemsize
            if end - begin != expected:
                raise CheckpointFileError(f"{self.path}: tensor {name} has {end - begin} bytes, expected {expected}")
            if self._data_start + end > size:
                raise CheckpointFileError(
                    f"{self.path}: truncated safetensors file (tensor {name} ends past the end of the file)")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def get(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor `name` (or only its rows [start, stop)) as a new numpy array, read from the file."""
        entry = self._entries[name]
        dtype, shape, skip = DTYPES[entry["dtype"]], list(entry["shape"]), 0
        if rows is not None:
            skip = rows[0] * math.prod(shape[1:]) * np.dtype(dtype).itemsize
            shape[0] = rows[1] - rows[0]
        array = np.empty(shape, dtype)
        with open_ranged(self.path) as f:  # the byte range was checked against the file size on opening
            f.seek(self._data_start + entry["data_offsets"][0] + skip)
            f.readinto(array.reshape(-1).view(np.uint8))
        return array


class SafetensorsCheckpoint:
    """All tensors of a Hugging Face checkpoint directory: one file or an index of shards."""

    def __init__(self, directory: str | os.PathLike):
        directory = user_path(directory)
        index_path = directory / "model.safetensors.index.json"
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise CheckpointFileError(f"{index_path}: not a valid safetensors index") from None
            files = {name: SafetensorsFile(directory / name) for name in sorted(set(weight_map.values()))}
            self._where = {tensor: files[name] for tensor, name in weight_map.items()}
            for tensor, file in self._where.items():
                if tensor not in file._entries:
                    raise CheckpointFileError(f"{file.path}: missing tensor {tensor} listed in the index")
        elif (directory / "model.safetensors").is_file():
            file = SafetensorsFile(directory / "model.safetensors")
            self._where = {tensor: file for tensor in file.keys()}
        else:
            raise CheckpointFileError(f"{directory}: no model.safetensors or model.safetensors.index.json")

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def get(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        return self._file(name).get(name, rows)

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._where:
            raise CheckpointFileError(f"checkpoint is missing tensor {name}")
        return self._where[name]
