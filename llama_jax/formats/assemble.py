"""Building a parameter tree one weight at a time: cast or quantise it, then place it.

    builder = ParamsBuilder(config, shardings)        # shardings None: numpy leaves
    for path, index, array in weights:                 # e.g. llama_jax.formats.hf.read_hf_tensors
        builder.add(path, index, array)
    params = builder.params()

Readers hand over one host array at a time (a Hugging Face tensor, a layer
slice of our checkpoint) at its place in `config`'s tree (`path`, and the
index along the stacked `layers` axis for stacked leaves, see
`llama_jax.params.layer_location`). The builder stores it in the leaf's
dtype: param_dtype, or, where the config quantises that kernel
(`ModelConfig.quantize_for`), quantised per output channel with its `scale`
written beside it; values that are already quantised (a quantised
checkpoint) are taken as they are. With `shardings` every leaf is placed as
it arrives, and a stacked leaf is created on its devices and filled a layer
at a time in place, so host memory never holds more than the weight at hand
(plus, on a CPU "device", the placed model itself).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax.formats.checkpoint import CheckpointError, is_stacked, named_leaves
from llama_jax.config import ModelConfig
from llama_jax.params import abstract_params
from llama_jax.model.quantize import quantize_kernel
from llama_jax.formats.checkpoint import architecture_mismatch
from llama_jax.formats.checkpoint_io import ParamsReader
from llama_jax.params import layer_location, layer_of

QUANTISED_DTYPES = ("int8", "float8_e4m3fn")


class ParamsBuilder:
    """Collect the weights of one model config into a (placed) parameter tree."""

    def __init__(self, config: ModelConfig, shardings=None):
        self.config = config
        self.leaves = dict(named_leaves(abstract_params(config)))
        self.shardings = None if shardings is None else dict(named_leaves(shardings))
        self._values: dict[tuple[str, ...], object] = {}
        self._written: dict[tuple[str, ...], set] = {path: set() for path in self.leaves}

    def add(self, path: tuple[str, ...], index: int | None, array) -> None:
        """Store `array` as leaf `path` (index None) or as slice `index` of a stacked leaf.

        A float kernel whose leaf is quantised is quantised here (its `scale`
        leaf is written too). CheckpointError (one line) for a path the config
        does not have, a wrong shape, or quantised values for a float leaf.
        """
        for piece in self.pieces(path, index, array):
            self._set(*piece)

    def pieces(self, path: tuple[str, ...], index: int | None, array) -> list[tuple[tuple[str, ...], int | None, np.ndarray]]:
        """What `add` stores for one weight, without storing it: [(path, index, array in the leaf's
        dtype)], two entries (kernel values and scale) for a kernel quantised here."""
        path = tuple(path)
        leaf = self._leaf(path)
        expected = leaf.shape if index is None else leaf.shape[1:]
        if tuple(np.shape(array)) != tuple(expected):
            raise CheckpointError(f"{'/'.join(path)}: got shape {tuple(np.shape(array))}, expected {tuple(expected)}")
        stored = np.dtype(array.dtype).name
        target = np.dtype(leaf.dtype).name
        if target in QUANTISED_DTYPES and stored != target:
            if stored in QUANTISED_DTYPES:
                raise CheckpointError(f"{'/'.join(path)}: stored as {stored}, but the config wants {target} "
                                      "(quantise from the unquantised weights instead)")
            scale_path = quantised_scale_path(path)
            experts = path[-1] != "kernel"  # a mixture's expert weights [experts, in, out]
            n_in = array.ndim - (len(self._leaf(scale_path).shape) - (index is not None))
            with jax.default_device(jax.devices("cpu")[0]):
                values, scale = quantize_kernel(array, self.config.quantize, n_in, experts=experts)
            return [(path, index, np.asarray(values)), (scale_path, index, np.asarray(scale))]
        if stored in QUANTISED_DTYPES and target != stored:
            raise CheckpointError(f"{'/'.join(path)}: stored quantised ({stored}) but the config has a "
                                  f"{target} leaf here (load it with the checkpoint's quantize setting)")
        return [(path, index, np.asarray(array).astype(leaf.dtype, copy=False))]

    def params(self):
        """The finished tree; CheckpointError naming the first leaf (or layer) never written."""
        for path, leaf in self.leaves.items():
            if None in self._written[path]:  # written whole
                continue
            expected = set(range(leaf.shape[0])) if is_stacked(path) else {None}
            missing = sorted(expected - self._written[path], key=lambda x: -1 if x is None else x)
            if missing:
                where = "" if missing[0] is None else f" layer {missing[0]}"
                raise CheckpointError(f"{'/'.join(path)}{where}: missing from the checkpoint")
        tree: dict = {}
        for path, value in self._values.items():
            node = tree
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
        return tree

    # ------------------------------------------------------------ helpers

    def _leaf(self, path):
        if path not in self.leaves:
            raise CheckpointError(f"{'/'.join(path)}: not a parameter of this model config")
        return self.leaves[path]

    def _set(self, path, index, array):
        leaf = self.leaves[path]
        if self.shardings is None:
            if index is None:
                self._values[path] = array
            else:
                if path not in self._values:
                    self._values[path] = np.zeros(leaf.shape, leaf.dtype)
                self._values[path][index] = array
        else:
            sharding = self.shardings[path]
            if index is None:
                self._values[path] = _place(array, sharding)
            else:
                if path not in self._values:
                    self._values[path] = jax.jit(lambda: jnp.zeros(leaf.shape, leaf.dtype), out_shardings=sharding)()
                self._values[path] = _write_layer(self._values[path], _place(array, _without_layers(sharding)),
                                                  index)
        self._written[path].add(index)


def _place(array: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(array.shape, sharding, lambda where: array[where])


def _without_layers(sharding):
    """The sharding of one layer slice of a stacked leaf placed with `sharding`."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
    return sharding


_write_layer = jax.jit(lambda stack, layer, index: jax.lax.dynamic_update_index_in_dim(stack, layer, index, 0),
                       donate_argnums=0)


def load_checkpoint_params(directory, config: ModelConfig, shardings=None, step: int | None = None):
    """Read our checkpoint into `config`'s tree one leaf or layer slice at a time.

    config: the target (dtypes, quantize, scan_layers); shardings as for
    `ParamsBuilder`. Returns the params; CheckpointError (one line) on a
    mismatch (see `checkpoint_weights`).
    """
    builder = ParamsBuilder(config, shardings)
    for path, index, array in checkpoint_weights(directory, config, step):
        builder.add(path, index, array)
        del array
    return builder.params()


def checkpoint_weights(directory, config: ModelConfig, step: int | None = None):
    """Every weight of our checkpoint as (path, index, host array) at its place in `config`'s tree,
    one leaf or layer slice at a time.

    config's architecture must be the stored one's. A stored unquantised
    checkpoint may go to a quantised config (the builder quantises); a
    quantised one only to its own quantize setting. CheckpointError (one
    line) otherwise.
    """
    reader = ParamsReader(directory, step)
    stored = reader.config
    name = architecture_mismatch(stored, config.replace(quantize=stored.quantize))
    if name is not None:
        raise CheckpointError(f"{directory}: config {name} is {getattr(config, name)!r} but the checkpoint "
                              f"has {getattr(stored, name)!r}")
    if stored.quantize is not None and config.quantize != stored.quantize:
        raise CheckpointError(f"{directory}: the checkpoint stores {stored.quantize} weights, but "
                              f"{config.quantize or 'unquantised'} ones were asked for (load it with quantize "
                              f"{stored.quantize}, or quantise from the unquantised checkpoint)")
    yield from _relocated(reader.leaves, reader.read, stored, config)


def converted_params(params, stored: ModelConfig, config: ModelConfig, shardings=None):
    """`params` (a tree in `stored`'s form, host or device arrays) in `config`'s form: cast,
    quantised and stacked or unrolled as `config` says, one leaf or layer slice at a time."""
    leaves = dict(named_leaves(params))
    builder = ParamsBuilder(config, shardings)
    read = lambda path, index: np.asarray(leaves[path] if index is None else leaves[path][index])  # noqa: E731
    for path, index, array in _relocated(leaves, read, stored, config):
        builder.add(path, index, array)
    return builder.params()


def _relocated(leaves: dict, read, stored: ModelConfig, config: ModelConfig):
    """(path, index, array) in `config`'s tree for every leaf (and layer slice) of `stored`'s
    tree, whose leaves (with shapes) are `leaves` and whose slices `read(path, index)` gives."""
    for path, leaf in leaves.items():
        for index in (range(leaf.shape[0]) if path[0] == "layers" else [None]):
            layer, below = layer_of(path, index, stored)
            yield (*layer_location(layer, below, config), read(path, index))


def quantised_scale_path(path: tuple[str, ...]) -> tuple[str, ...]:
    """Where a quantised kernel's scale lives: `.../scale` beside a Linear's `kernel`, `.../w1_scale`
    beside a mixture's expert weights `.../w1` (llama_jax/model/moe.py)."""
    return path[:-1] + ("scale",) if path[-1] == "kernel" else path[:-1] + (path[-1] + "_scale",)
