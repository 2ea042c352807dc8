"""AdamW with a weight-decay mask, warm-up then decay, and global-norm clipping.

Moments are float32 whatever the parameters' dtype. optax keeps the second
moment (and the first, unless told otherwise) in the parameter dtype, and a
bfloat16 second moment of squared gradients loses most small updates; so
the whole chain runs on float32 views of gradients and parameters
(`in_float32`) and its float32 updates are cast back to each parameter's
dtype by `optax.apply_updates`. `sharding.plan` counts the moments as
2 x float32 per parameter on the same shards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from train.config import OptimizerConfig


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to the peak, then cosine/linear decay to min_lr_ratio x peak."""
    peak, floor = config.learning_rate, config.learning_rate * config.min_lr_ratio
    decay_steps = max(total_steps - config.warmup_steps, 1)
    if config.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.min_lr_ratio)
    elif config.decay == "linear":
        decay = optax.linear_schedule(peak, floor, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    warmup = optax.linear_schedule(0.0, peak, config.warmup_steps)
    return optax.join_schedules([warmup, decay], [config.warmup_steps])


def decay_mask(params):
    """True for matrices (decayed), False for norm scales and other vectors.

    Stacked layers add a leading axis, so a norm scale [layers, dim] has two
    dimensions; decide by the leaf's name, not its rank.
    """
    def decays(path, leaf):
        return getattr(path[-1], "key", None) in ("kernel", "embedding")
    return jax.tree_util.tree_map_with_path(decays, params)


def in_float32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` initialised and updated on float32 views of parameters and gradients.

    Its state (e.g. Adam's moments) is therefore float32 for parameters of any
    floating dtype, and so are the updates it returns.
    """
    def init(params):
        return inner.init(optax.tree.cast(params, jnp.float32))

    def update(updates, state, params=None):
        params = None if params is None else optax.tree.cast(params, jnp.float32)
        return inner.update(optax.tree.cast(updates, jnp.float32), state, params)

    return optax.GradientTransformation(init, update)


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Clipping then AdamW with the warm-up/decay schedule, all in float32 (see the module docstring)."""
    schedule = learning_rate_schedule(config, total_steps)
    steps = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm else []
    steps.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                             weight_decay=config.weight_decay, mask=decay_mask))
    return in_float32(optax.chain(*steps))
