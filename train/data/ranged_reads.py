"""Byte ranges of a file, local or in an object store: what prepared token files in a
bucket are read through (memory-mapping needs a local file)."""

from __future__ import annotations

import threading

import numpy as np
from etils import epath

from llama_jax.paths import is_url, open_ranged, storage_error


class RangedFile:
    """Reads byte ranges of one file. A gs:// object keeps one open handle per process
    (each open costs a request), its seek-and-read under a lock (grain reads ahead on
    threads); a pickled copy opens its own. A local file is opened per read."""

    def __init__(self, path: epath.Path):
        self.path = path
        self._lock, self._file = threading.Lock(), None

    def read(self, offset: int, length: int) -> bytes:
        if not is_url(self.path):
            with self.path.open("rb") as f:
                f.seek(offset)
                return f.read(length)
        try:
            with self._lock:
                if self._file is None:
                    self._file = open_ranged(self.path)
                self._file.seek(offset)
                return self._file.read(length)
        except OSError as err:
            raise storage_error(err, self.path) from None

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


class RangedTokens:
    """A flat token file in an object store, sliced like an array by ranged reads:
    `tokens[a:b]` reads bytes [a * itemsize, b * itemsize) of the object, never
    the whole file (memory-mapping needs a local file)."""

    def __init__(self, path: epath.Path, dtype: np.dtype):
        self.file, self.dtype = RangedFile(path), np.dtype(dtype)
        self._size = path.stat().length // self.dtype.itemsize

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, span: slice) -> np.ndarray:
        start, stop, _ = span.indices(self._size)
        if stop <= start:
            return np.zeros(0, self.dtype)
        size = self.dtype.itemsize
        return np.frombuffer(self.file.read(start * size, (stop - start) * size), self.dtype)
