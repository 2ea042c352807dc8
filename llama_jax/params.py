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
    return params if config.scan_layers else unstack_layers(params, config.n_layers)


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


def stack_layers(params, n_layers: int):
    """Unrolled params ("layers_0", ...) to scan layout (one "layers" subtree, stacked)."""
    layers = [params[f"layers_{i}"] for i in range(n_layers)]
    rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
    return {**rest, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def unstack_layers(params, n_layers: int):
    """Scan layout to unrolled params ("layers_0", ...)."""
    rest = {k: v for k, v in params.items() if k != "layers"}
    return {**rest, **{f"layers_{i}": jax.tree.map(lambda x: x[i], params["layers"]) for i in range(n_layers)}}
