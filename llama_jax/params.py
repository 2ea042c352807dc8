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
from llama_jax.model.context_parallel import length_shards
from llama_jax.model.llama import Llama
from llama_jax.model.trees import unstack_layers
from llama_jax.vision.model import LlamaVision


def model_for(config: ModelConfig) -> Llama:
    """The model a config describes: `LlamaVision` when it has a vision section, else `Llama`."""
    return LlamaVision(config) if config.vision is not None else Llama(config)


def stacked_layers(config: ModelConfig) -> range:
    """The units stacked on the decoder's `layers` axis, by index: the decoder layers
    (all but the first and last with fp8 weights, see `ModelConfig.stacked_layers`),
    or the layer groups of a vision model."""
    if config.vision is not None:
        return range(len(config.vision.cross_attention_layers))
    return config.stacked_layers


def _init(config: ModelConfig, rng: jax.Array):
    """`model.init` on the smallest inputs that reach every parameter (an image, for vision).

    Their length splits over the sequence shards of a layout in scope (context parallelism
    needs two halves per shard), so shardings can be asked for inside `placement.activate()`.
    """
    tokens = jnp.zeros((1, 2 * length_shards()), jnp.int32)
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


def count_active_params(config: ModelConfig) -> int:
    """Parameters one token uses: all but the experts it is not routed to (top_k of n_experts
    per MoE layer); `count_params` for a model without experts."""
    total = count_params(config)
    if config.moe is None:
        return total
    moe = config.moe
    moe_layers = sum(config.layer_kind(i).moe for i in range(config.n_layers))
    return total - moe_layers * (moe.n_experts - moe.top_k) * 3 * config.dim * moe.ffn_dim_expert


def layer_location(layer: int | None, subpath: tuple[str, ...], config: ModelConfig) -> tuple[tuple[str, ...], int | None]:
    """Where a weight lives in `config`'s parameter tree: (leaf path, index along the stacked
    `layers` axis or None). `layer` indexes the stack's units (`stacked_layers`: decoder
    layers, or a vision model's layer groups); `subpath` is the weight's path below its unit
    (e.g. ("attention", "wq", "kernel")), or its whole path outside the layers (layer None)."""
    if layer is None:
        return tuple(subpath), None
    stacked = stacked_layers(config)
    if config.scan_layers and layer in stacked:
        return ("layers",) + tuple(subpath), layer - stacked.start
    return (f"layers_{layer}",) + tuple(subpath), None


def layer_of(path: tuple[str, ...], index: int | None, config: ModelConfig) -> tuple[int | None, tuple[str, ...]]:
    """The inverse of `layer_location`: (layer or None, path below the layer)."""
    if path[0] == "layers":
        return stacked_layers(config)[index], tuple(path[1:])
    if path[0].startswith("layers_"):
        return int(path[0].removeprefix("layers_")), tuple(path[1:])
    return None, tuple(path)
