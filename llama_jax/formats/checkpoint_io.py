"""Array I/O for our checkpoint format: leaf slices in and out, never a whole model.

`llama_jax.formats.checkpoint` describes the format and saves and restores whole
pytrees through orbax. This module is for converters and exporters, which
must never hold a whole model (or, for the largest leaves, a whole leaf):

- `ParamsWriter` creates each leaf's array with orbax's own tensorstore spec
  (the same chunking `save_params` asks for), writes layer slices into it,
  then writes the metadata files orbax's standard restore reads. Host memory
  is bounded by the slice being written plus tensorstore's zstd output for it.
- `ParamsReader` reads single leaves or layers back the same way.
- `as_contiguous` casts and lays out a (transposed) slice for either.
"""

from __future__ import annotations

import ctypes
import json
import time
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from llama_jax.cli import first_line
from llama_jax.formats.checkpoint import (COMMIT_SUCCESS, CONFIG, PARAMS, TMP_SUFFIX, CheckpointError,
                                          is_stacked, named_leaves, read_config, require_item, resolve_step)
from llama_jax.config import ModelConfig, numpy_dtype
from llama_jax.params import abstract_params
from llama_jax.paths import user_path

# glibc's malloc_trim, where the C library has one (Linux); see release_freed_memory.
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)


class ParamsWriter:
    """Write one checkpoint step leaf slice by leaf slice, never holding a whole leaf.

    Usage:
        with ParamsWriter(directory, config, step=0) as writer:
            writer.write(("layers", "attention", "wq", "kernel"), layer, array)  # [D, H, K]
            writer.write(("embed", "embedding"), None, array)                   # [V, D]
    Arrays are cast to their leaf's dtype (config.param_dtype; int8 / float8 and
    float32 for a quantised config's kernels and scales). The step appears (atomically renamed
    from a temporary name) only when every slice of every leaf was written;
    leaving the block early raises CheckpointError and leaves only the
    temporary directory behind.
    """

    def __init__(self, directory, config: ModelConfig, step: int = 0):
        self.config = config.replace(scan_layers=True)
        self.directory = user_path(directory)
        self.final_dir = self.directory / str(step)
        if self.final_dir.exists():
            raise CheckpointError(f"{self.final_dir}: step {step} already exists")
        self.step_dir = self.directory / f"{step}{TMP_SUFFIX}"
        self.params_dir = self.step_dir / PARAMS
        self.params_dir.mkdir(parents=True, exist_ok=True)
        self._dtype = numpy_dtype(self.config.param_dtype)
        self._leaves = {path: leaf for path, leaf in named_leaves(abstract_params(self.config))}
        self._written = {path: set() for path in self._leaves}
        self._stores: dict[tuple[str, ...], Any] = {}
        self._chunks: dict[tuple[str, ...], list[int]] = {}
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=True)
        self._started = time.time_ns()

    @property
    def dtype(self) -> np.dtype:
        """The stored dtype of unquantised leaves (config.param_dtype)."""
        return self._dtype

    def leaf_dtype(self, path: tuple[str, ...]) -> np.dtype:
        """The stored dtype of leaf `path`."""
        return np.dtype(self._leaves[tuple(path)].dtype)

    def write(self, path: tuple[str, ...], layer: int | None, array: np.ndarray) -> None:
        """Write `array` as leaf `path` (layer None) or as its slice `layer` of the stacked leaf.

        Memory: tensorstore encodes straight from `array` once it is
        C-contiguous in the stored dtype (otherwise from such a copy), into a
        zstd buffer about as large. Pass `as_contiguous(array, writer.dtype)`
        and keep no other reference to the source, and the peak is two copies
        of the slice. The encoder's freed buffers go back to the OS after each
        write, so they do not add to the next one.
        """
        path = tuple(path)
        if path not in self._leaves:
            raise CheckpointError(f"{'/'.join(path)}: not a parameter of this config")
        shape = self._leaves[path].shape
        expected = shape if layer is None else shape[1:]
        if layer is not None and not (is_stacked(path) and 0 <= layer < shape[0]):
            raise CheckpointError(f"{'/'.join(path)}: layer {layer} out of range")
        if tuple(array.shape) != tuple(expected):
            raise CheckpointError(f"{'/'.join(path)}: got shape {tuple(array.shape)}, expected {tuple(expected)}")
        array = as_contiguous(array, self.leaf_dtype(path))
        store = self._store(path)
        # Letting tensorstore reference `array` spares it a copy of the whole
        # slice. It may keep the reference after the commit, but only in its
        # cache, which this writer never reads: the bytes on disk are final.
        target = store if layer is None else store[layer]
        target.write(array, can_reference_source_data_indefinitely=True).result()
        self._written[path].add(layer)
        del array
        release_freed_memory()

    def close(self) -> None:
        """Check completeness, write orbax's metadata files and publish the step."""
        for path, leaf in self._leaves.items():
            expected = set(range(leaf.shape[0])) if is_stacked(path) else {None}
            missing = sorted(expected - self._written[path], key=lambda x: -1 if x is None else x)
            if missing:
                where = "" if missing[0] is None else f" layer {missing[0]}"
                raise CheckpointError(f"{'/'.join(path)}{where}: never written")
        self._stores.clear()
        _write_params_metadata(self.params_dir, self._leaves, self._chunks)
        (self.step_dir / CONFIG).mkdir(exist_ok=True)
        (self.step_dir / CONFIG / "metadata").write_text(json.dumps(self.config.to_dict()))
        (self.step_dir / "_CHECKPOINT_METADATA").write_text(json.dumps({
            "item_handlers": {PARAMS: _qualname(ocp.StandardCheckpointHandler),
                              CONFIG: _qualname(ocp.JsonCheckpointHandler)},
            "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": self._started,
            "commit_timestamp_nsecs": time.time_ns(), "custom_metadata": {}}))
        # orbax's mark of a finished save: on gs:// (no atomic rename) the only one it reads.
        (self.step_dir / COMMIT_SUCCESS).write_text(f"Checkpoint commit was successful to {self.final_dir}")
        self.step_dir.rename(self.final_dir)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.close()
        self._stores.clear()

    def _store(self, path):
        if path not in self._stores:
            leaf = self._leaves[path]
            spec = ocp.type_handlers.get_json_tspec_write(
                _param_info(self.params_dir, path, self._context), use_ocdbt=True,
                global_shape=leaf.shape, local_shape=leaf.shape, dtype=np.dtype(leaf.dtype),
                arg=ocp.SaveArgs(shard_axes=(0,) if is_stacked(path) else ()))
            self._stores[path] = ts.open(spec, create=True, open=False, context=self._context).result()
            self._chunks[path] = list(self._stores[path].chunk_layout.write_chunk.shape)
        return self._stores[path]


class ParamsReader:
    """Read single leaves or layer slices of a checkpoint step as numpy arrays.

    For exporters: memory is one read plus the chunks it decodes (one layer per
    chunk for checkpoints written by save_params or ParamsWriter; orbax caps
    any chunk at 2 GiB).
    """

    def __init__(self, directory, step: int | None = None):
        step = resolve_step(directory, step)
        self.config = read_config(directory, step).replace(scan_layers=True)
        self.params_dir = require_item(directory, step, PARAMS)  # absolute (or gs://), as orbax wants
        try:
            metadata = json.loads((self.params_dir / "_METADATA").read_text())
        except (FileNotFoundError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{self.params_dir}: unreadable _METADATA ({first_line(err)})") from None
        self._use_ocdbt = bool(metadata.get("use_ocdbt", True))
        self._use_zarr3 = bool(metadata.get("use_zarr3", False))
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._use_ocdbt)
        self.leaves = dict(named_leaves(abstract_params(self.config)))
        self._stores: dict[tuple[str, ...], Any] = {}

    def read(self, path: tuple[str, ...], layers: int | slice | None = None) -> np.ndarray:
        """Leaf `path` whole (layers None), or one layer / a slice of layers of a stacked leaf."""
        store = self._store(tuple(path))
        return (store if layers is None else store[layers]).read().result()

    def layers_per_chunk(self, path: tuple[str, ...]) -> int:
        """How many layers one stored chunk of a stacked leaf spans (read them together)."""
        return int(self._store(tuple(path)).chunk_layout.read_chunk.shape[0])

    def _store(self, path):
        if path not in self._stores:
            if path not in self.leaves:
                raise CheckpointError(f"{'/'.join(path)}: not a parameter of this config")
            info = _param_info(self.params_dir, path, self._context, use_zarr3=self._use_zarr3)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._use_ocdbt)
            try:
                self._stores[path] = ts.open(spec, open=True, context=self._context).result()
            except ValueError as err:
                raise CheckpointError(f"{self.params_dir}: cannot open {'.'.join(path)} "
                                      f"({first_line(err)})") from None
        return self._stores[path]


def as_contiguous(array: np.ndarray, dtype) -> np.ndarray:
    """A C-contiguous copy of `array` in `dtype` (no copy if it already is one).

    Transposed views (HF's [out, in] seen as our [in, out]) are copied a block
    of source rows at a time: numpy's element-wise strided copy is several
    times slower on large 2-byte arrays.
    """
    dtype = np.dtype(dtype)
    if array.flags.c_contiguous:
        return array.astype(dtype, copy=False)
    axis = int(np.argmax(np.abs(array.strides)))  # the source's outermost (row) axis
    out = np.empty(array.shape, dtype)
    for start in range(0, array.shape[axis], 256):
        block = (slice(None),) * axis + (slice(start, start + 256),)
        out[block] = array[block]
    return out


def release_freed_memory() -> None:
    """Return the C heap's free pages to the OS (glibc's malloc_trim; nothing elsewhere).

    tensorstore's encoder threads allocate their zstd buffers from glibc
    arenas, which keep the freed space: without this, the buffer of one large
    tensor (about its size) stays resident while the next tensor is read.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# ---------------------------------------------------------------- helpers

def _param_info(params_dir, path, context, use_zarr3: bool = False):
    return ocp.type_handlers.ParamInfo(name=".".join(path), parent_dir=epath.Path(params_dir),
                                       use_zarr3=use_zarr3, use_compression=True, ts_context=context)


def _write_params_metadata(params_dir: epath.Path, leaves, chunks) -> None:
    """The two JSON files orbax writes next to a pytree's arrays, as orbax 0.12 writes them."""
    tree, arrays = {}, []
    for path, leaf in leaves.items():
        tree[str(path)] = {
            "key_metadata": [{"key": key, "key_type": 2} for key in path],  # 2: dict key
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                               "write_shape": list(leaf.shape)}}
        arrays.append({"array_metadata": {"param_name": ".".join(path), "write_shape": list(leaf.shape),
                                          "chunk_shape": chunks[path], "ext_metadata": None}})
    (params_dir / "_METADATA").write_text(json.dumps({
        "tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False,
        "store_array_data_equal_to_fill_value": True, "custom_metadata": None}))
    (params_dir / "array_metadatas").mkdir(exist_ok=True)
    (params_dir / "array_metadatas" / "process_0").write_text(json.dumps({"array_metadatas": arrays}))


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
