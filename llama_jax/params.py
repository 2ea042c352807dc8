"""Creating, counting and describing parameters without surprises.

Parameters are a plain pytree of arrays. Their logical axis names (for
`sharding/`) come from abstract initialisation, so no memory is spent.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.config import ModelConfig
from llama_jax.model import Llama


def _example_inputs():
    tokens = jnp.zeros((1, 1), jnp.int32)
    return tokens, tokens


def init_params(config: ModelConfig, rng: jax.Array):
    """Random parameters (plain arrays, no partitioning boxes).

    Always drawn in scan layout (then unstacked if `config.scan_layers` is
    False), so one seed gives the same weights whichever layout runs them.
    """
    scanned = config.replace(scan_layers=True)
    params = nn.unbox(Llama(scanned).init(rng, *_example_inputs())["params"])
    return params if config.scan_layers else unstack_layers(params, config.n_layers, config.stacked_layers)


def abstract_params(config: ModelConfig):
    """Parameter shapes and dtypes as `jax.ShapeDtypeStruct`s; nothing allocated."""
    boxed = jax.eval_shape(lambda: Llama(config).init(jax.random.key(0), *_example_inputs()))
    return nn.unbox(boxed["params"])


def logical_axes(config: ModelConfig):
    """A pytree like the parameters holding each leaf's logical axis names."""
    boxed = jax.eval_shape(lambda: Llama(config).init(jax.random.key(0), *_example_inputs()))
    specs = nn.get_partition_spec(boxed["params"])
    return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def count_params(config: ModelConfig) -> int:
    """Number of parameters, from abstract shapes (tied embeddings count once)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_params(config)))


def stack_layers(params, n_layers: int, stacked: range | None = None):
    """Unrolled params ("layers_0", ...) to scan layout: the layers of `stacked` (default:
    all, see `ModelConfig.stacked_layers`) in one "layers" subtree, stacked; the others
    keep their own subtrees."""
    stacked = range(n_layers) if stacked is None else stacked
    names = {f"layers_{i}" for i in stacked}
    rest = {k: v for k, v in params.items() if k not in names}
    return {**rest, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in stacked])}


def unstack_layers(params, n_layers: int, stacked: range | None = None):
    """Scan layout to unrolled params ("layers_0", ...); `stacked` as for `stack_layers`."""
    stacked = range(n_layers) if stacked is None else stacked
    rest = {k: v for k, v in params.items() if k != "layers"}
    return {**rest, **{f"layers_{i}": jax.tree.map(lambda x: x[j], params["layers"])
                       for j, i in enumerate(stacked)}}


def layer_location(layer: int | None, subpath: tuple[str, ...], config: ModelConfig) -> tuple[tuple[str, ...], int | None]:
    """Where a weight lives in `config`'s parameter tree: (leaf path, index along the stacked
    `layers` axis or None). `subpath` is the weight's path below its layer (e.g. ("attention",
    "wq", "kernel")), or its whole path for a weight outside the layers (layer None)."""
    if layer is None:
        return tuple(subpath), None
    if config.scan_layers and layer in config.stacked_layers:
        return ("layers",) + tuple(subpath), layer - config.stacked_layers.start
    return (f"layers_{layer}",) + tuple(subpath), None


def layer_of(path: tuple[str, ...], index: int | None, config: ModelConfig) -> tuple[int | None, tuple[str, ...]]:
    """The inverse of `layer_location`: (layer or None, path below the layer)."""
    if path[0] == "layers":
        return config.stacked_layers[index], tuple(path[1:])
    if path[0].startswith("layers_"):
        return int(path[0].removeprefix("layers_")), tuple(path[1:])
    return None, tuple(path)
