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
from llama_jax.vision.model import LlamaVision


def model_for(config: ModelConfig) -> Llama:
    """The model a config describes: `LlamaVision` when it has a vision section, else `Llama`."""
    return LlamaVision(config) if config.vision is not None else Llama(config)


def stacked_layers(config: ModelConfig) -> int:
    """Length of the decoder stack's `layers` axis: layers, or layer groups for a vision model."""
    return len(config.vision.cross_attention_layers) if config.vision is not None else config.n_layers


def _init(config: ModelConfig, rng: jax.Array):
    """`model.init` on the smallest inputs that reach every parameter (an image, for vision)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    if config.vision is None:
        return Llama(config).init(rng, tokens, tokens)
    vis = config.vision
    tiles = jnp.ones((1, 1, vis.max_tiles), jnp.int32)
    images = {"pixels": jnp.zeros((1, 1, vis.max_tiles, 3, vis.image_size, vis.image_size), jnp.float32),
              "aspect_ratio_ids": jnp.ones((1, 1), jnp.int32), "aspect_ratio_mask": tiles,
              "tile_from": 0 * tiles, "tile_until": tiles}
    return LlamaVision(config).init(rng, tokens, tokens, images=images)


def init_params(config: ModelConfig, rng: jax.Array):
    """Random parameters (plain arrays, no partitioning boxes).

    Always drawn in scan layout (then unstacked if `config.scan_layers` is
    False), so one seed gives the same weights whichever layout runs them.
    """
    params = nn.unbox(_init(config.replace(scan_layers=True), rng)["params"])
    return params if config.scan_layers else unstack_layers(params, stacked_layers(config))


def abstract_params(config: ModelConfig):
    """Parameter shapes and dtypes as `jax.ShapeDtypeStruct`s; nothing allocated."""
    boxed = jax.eval_shape(lambda: _init(config, jax.random.key(0)))
    return nn.unbox(boxed["params"])


def logical_axes(config: ModelConfig):
    """A pytree like the parameters holding each leaf's logical axis names."""
    boxed = jax.eval_shape(lambda: _init(config, jax.random.key(0)))
    specs = nn.get_partition_spec(boxed["params"])
    return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def count_params(config: ModelConfig) -> int:
    """Number of parameters, from abstract shapes (tied embeddings count once)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_params(config)))


def stack_layers(params, n_layers: int):
    """Unrolled params ("layers_0", ...) to scan layout (one "layers" subtree, stacked)."""
    layers = [params[f"layers_{i}"] for i in range(n_layers)]
    rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
    return {**rest, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def unstack_layers(params, n_layers: int):
    """Scan layout to unrolled params ("layers_0", ...)."""
    rest = {k: v for k, v in params.items() if k != "layers"}
    return {**rest, **{f"layers_{i}": jax.tree.map(lambda x: x[i], params["layers"]) for i in range(n_layers)}}


def partition(params, selected) -> tuple[dict, dict]:
    """(the leaves whose key path `selected(path)` accepts, the rest): two trees of the
    same nesting as `params` (a tree of nested dicts); `path` is a tuple of key names."""
    chosen, rest = {}, {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = tuple(k.key for k in keys)
        node = chosen if selected(names) else rest
        for key in names[:-1]:
            node = node.setdefault(key, {})
        node[names[-1]] = leaf
    return chosen, rest


def join(*trees) -> dict:
    """One tree holding every leaf of `trees` (nested dicts whose leaves do not overlap)."""
    out: dict = {}
    for tree in trees:
        for key, value in tree.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = join(out[key], value)
            elif key in out:
                raise ValueError(f"join: leaf {key!r} is in two trees")
            else:
                out[key] = value
    return out
