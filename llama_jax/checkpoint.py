"""Our on-disk parameter format: an orbax checkpoint that training and inference share.

Layout of a checkpoint directory (managed by `orbax.checkpoint.CheckpointManager`):

    <directory>/
      <step>/                    one directory per saved step (0, 1000, ...)
        params/                  item "params": the parameter pytree in scan
                                 layout ({"embed", "layers", "norm", "output"},
                                 per-layer leaves stacked on a leading axis),
                                 one zarr array per leaf inside orbax's OCDBT
                                 store, chunked one layer per chunk
        config/metadata          item "config": JSON of ModelConfig.to_dict()
        _CHECKPOINT_METADATA     orbax's step metadata
      <step>.orbax-checkpoint-tmp*/   a save in progress (ignored)

Training adds its own items (optimizer state, data-iterator state) to the same
steps; readers here touch only "params" and "config". Arrays restore onto any
target shardings, so a checkpoint saved under one mesh loads under another.

Two writers produce this format. `save_params` hands a pytree of (sharded)
arrays to orbax. `ParamsWriter` is for converters that must never hold a
whole leaf: it creates each leaf's array with orbax's own tensorstore spec
(the same chunking `save_params` asks for) and writes layer slices into it,
then writes the metadata files orbax's standard restore reads. Host memory is
then bounded by the slice being written plus tensorstore's zstd output for it.
`ParamsReader` reads single layers back the same way, for exporters.
"""

from __future__ import annotations

import ctypes
import json
import time
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from llama_jax.config import ModelConfig
from llama_jax.params import abstract_params, stack_layers, unstack_layers

PARAMS = "params"
CONFIG = "config"
TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Fields that define the function a checkpoint computes. An explicit config given
# to restore_params must agree on these; its other fields (dtypes, remat,
# attention, scan_layers, max_seq_len) are compute choices and win.
ARCHITECTURE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "head_dim",
                       "tie_embeddings", "rope_theta", "rope_scaling", "norm_eps")


# glibc's malloc_trim, where the C library has one (Linux); see release_freed_memory.
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the request (one-line message)."""


# ---------------------------------------------------------------- saving and restoring

def save_params(directory, config: ModelConfig, params, step: int = 0) -> None:
    """Save `params` (arrays in scan layout, or unrolled if config.scan_layers is False)
    and `config` as step `step` of the checkpoint directory `directory`.

    Arrays may be sharded across devices and hosts; every process must call this.
    Stacked per-layer leaves are chunked one layer per chunk, so exporters can
    read a layer without decoding the others.
    """
    if not config.scan_layers:
        params = stack_layers(params, config.n_layers)
    _check_tree(params, abstract_params(config.replace(scan_layers=True)), "params")
    params = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jax.numpy.asarray(x), params)
    save_args = jax.tree_util.tree_map_with_path(
        lambda keys, _: ocp.SaveArgs(shard_axes=(0,) if _key(keys[0]) == "layers" else ()), params)
    if step in all_steps(directory):
        raise CheckpointError(f"{directory}: step {step} already exists")
    with _manager(directory) as manager:
        saved = manager.save(step, args=ocp.args.Composite(**{
            PARAMS: ocp.args.StandardSave(params, save_args=save_args),
            CONFIG: ocp.args.JsonSave(config.to_dict())}))
        manager.wait_until_finished()
    if not saved:
        raise CheckpointError(f"{directory}: orbax did not save step {step}")


def restore_params(directory, step: int | None = None, shardings=None, config: ModelConfig | None = None):
    """Restore (config, params) from a checkpoint directory.

    step: a saved step; None takes the latest complete one.
    shardings: a pytree like the params (scan layout) of jax.sharding.Sharding,
      the target placement of each leaf; None puts everything on the first
      device. The saved placement does not matter.
    config: if given, must agree with the stored config on ARCHITECTURE_FIELDS;
      its compute fields are used (param_dtype sets the restored dtype).
    Params come back in scan layout, or unrolled ("layers_0", ...) when the
    config has scan_layers False. Raises CheckpointError naming the problem.
    """
    step = _resolve_step(directory, step)
    stored = read_config(directory, step)
    config = _reconcile(stored, config, directory, step)
    _require_item(directory, step, PARAMS)
    target = abstract_params(config.replace(scan_layers=True))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, target)
    _check_tree(shardings, target, "shardings", shapes=False)
    target = jax.tree_util.tree_map_with_path(_placed, target, shardings)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(_step_dir(directory, step).absolute() / PARAMS, target)
    except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise plain Exceptions for corrupt data
        raise CheckpointError(f"{_step_dir(directory, step)}: cannot restore params ({first_line(err)})") from None
    if not config.scan_layers:
        params = unstack_layers(params, config.n_layers)
    return config, params


def latest_step(directory) -> int | None:
    """The newest complete step in `directory`, or None if there is none (or no directory)."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


def all_steps(directory) -> list[int]:
    """Every complete step in `directory`, ascending (empty if the directory is missing).

    Steps are the directories named by a number; saves in progress carry a
    suffix (orbax renames them when complete).
    """
    directory = epath.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def read_config(directory, step: int | None = None) -> ModelConfig:
    """The ModelConfig stored with a step (the latest complete step by default)."""
    step = _resolve_step(directory, step)
    path = _require_item(directory, step, CONFIG) / "metadata"
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable config item ({first_line(err)})") from None
    except ValueError as err:
        raise CheckpointError(f"{path}: bad config ({err})") from None


# ---------------------------------------------------------------- streaming writer and reader

class ParamsWriter:
    """Write one checkpoint step leaf slice by leaf slice, never holding a whole leaf.

    Usage:
        with ParamsWriter(directory, config, step=0) as writer:
            writer.write(("layers", "attention", "wq", "kernel"), layer, array)  # [D, H, K]
            writer.write(("embed", "embedding"), None, array)                   # [V, D]
    Arrays are cast to config.param_dtype. The step appears (atomically renamed
    from a temporary name) only when every slice of every leaf was written;
    leaving the block early raises CheckpointError and leaves only the
    temporary directory behind.
    """

    def __init__(self, directory, config: ModelConfig, step: int = 0):
        self.config = config.replace(scan_layers=True)
        self.directory = epath.Path(directory)
        self.final_dir = self.directory / str(step)
        if self.final_dir.exists():
            raise CheckpointError(f"{self.final_dir}: step {step} already exists")
        self.step_dir = self.directory / f"{step}{TMP_SUFFIX}"
        self.params_dir = self.step_dir / PARAMS
        self.params_dir.mkdir(parents=True, exist_ok=True)
        self._dtype = np.dtype(_numpy_dtype(self.config.param_dtype))
        self._leaves = {path: leaf for path, leaf in _flatten(abstract_params(self.config))}
        self._written = {path: set() for path in self._leaves}
        self._stores: dict[tuple[str, ...], Any] = {}
        self._chunks: dict[tuple[str, ...], list[int]] = {}
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=True)
        self._started = time.time_ns()

    @property
    def dtype(self) -> np.dtype:
        """The stored dtype (config.param_dtype)."""
        return self._dtype

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
        if layer is not None and not (path[0] == "layers" and 0 <= layer < shape[0]):
            raise CheckpointError(f"{'/'.join(path)}: layer {layer} out of range")
        if tuple(array.shape) != tuple(expected):
            raise CheckpointError(f"{'/'.join(path)}: got shape {tuple(array.shape)}, expected {tuple(expected)}")
        array = as_contiguous(array, self._dtype)
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
            expected = {None} if path[0] != "layers" else set(range(leaf.shape[0]))
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
                global_shape=leaf.shape, local_shape=leaf.shape, dtype=self._dtype,
                arg=ocp.SaveArgs(shard_axes=(0,) if path[0] == "layers" else ()))
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
        step = _resolve_step(directory, step)
        self.config = read_config(directory, step).replace(scan_layers=True)
        self.params_dir = _require_item(directory, step, PARAMS)
        try:
            metadata = json.loads((self.params_dir / "_METADATA").read_text())
        except (FileNotFoundError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{self.params_dir}: unreadable _METADATA ({first_line(err)})") from None
        self._use_ocdbt = bool(metadata.get("use_ocdbt", True))
        self._use_zarr3 = bool(metadata.get("use_zarr3", False))
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._use_ocdbt)
        self.leaves = dict(_flatten(abstract_params(self.config)))
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

def _manager(directory) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(epath.Path(directory).absolute())


def _step_dir(directory, step: int) -> epath.Path:
    return epath.Path(directory) / str(step)


def _resolve_step(directory, step: int | None) -> int:
    if not epath.Path(directory).is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    steps = all_steps(directory)
    if step is None:
        if not steps:
            raise CheckpointError(f"{directory}: no complete checkpoint step")
        return steps[-1]
    if step not in steps:
        raise CheckpointError(f"{directory}: no complete step {step} (have: {', '.join(map(str, steps)) or 'none'})")
    return step


def _require_item(directory, step: int, item: str) -> epath.Path:
    path = _step_dir(directory, step) / item
    if not path.is_dir():
        raise CheckpointError(f"{_step_dir(directory, step)}: step has no {item!r} item")
    return path


def architecture_mismatch(stored: ModelConfig, given: ModelConfig) -> str | None:
    """The first field of ARCHITECTURE_FIELDS on which two configs differ, or None."""
    return next((name for name in ARCHITECTURE_FIELDS if getattr(given, name) != getattr(stored, name)),
                None)


def _reconcile(stored: ModelConfig, given: ModelConfig | None, directory, step) -> ModelConfig:
    if given is None:
        return stored
    name = architecture_mismatch(stored, given)
    if name is not None:
        raise CheckpointError(f"{_step_dir(directory, step)}: config {name} is {getattr(given, name)!r} "
                              f"but the checkpoint has {getattr(stored, name)!r}")
    return given


def _placed(keys, leaf, sharding) -> jax.ShapeDtypeStruct:
    try:
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    except ValueError as err:
        raise CheckpointError(f"shardings: {'/'.join(_key(k) for k in keys)} of shape {leaf.shape}: "
                              f"{first_line(err)}") from None


def _check_tree(tree, reference, what: str, shapes: bool = True) -> None:
    got = {path: leaf for path, leaf in _flatten(tree)}
    for path, leaf in _flatten(reference):
        name = "/".join(path)
        if path not in got:
            raise CheckpointError(f"{what}: missing leaf {name}")
        if shapes and tuple(np.shape(got[path])) != tuple(leaf.shape):
            raise CheckpointError(f"{what}: leaf {name} has shape {tuple(np.shape(got[path]))}, "
                                  f"expected {tuple(leaf.shape)}")
    extra = sorted(set(got) - {path for path, _ in _flatten(reference)})
    if extra:
        raise CheckpointError(f"{what}: unexpected leaf {'/'.join(extra[0])}")


def _flatten(tree) -> Iterator[tuple[tuple[str, ...], Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    for keys, leaf in flat:
        yield tuple(_key(k) for k in keys), leaf


def _key(key) -> str:
    return str(getattr(key, "key", getattr(key, "name", key)))


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


def _numpy_dtype(name: str):
    import ml_dtypes
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def first_line(err: BaseException) -> str:
    """An exception's first line of text (its type name if it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
