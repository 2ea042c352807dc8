"""Context parallelism: the order of a sequence whose length is split over devices.

With the length of every activation split into P shards, causal attention
gives the shard holding the last tokens P times the work of the first. The
model therefore feeds attention a load-balanced order: shard i keeps the
early half of its own chunk and takes the late half of chunk P-1-i, so every
shard holds one early and one late quarter-chunk of work (Llama 3's
all-gather context parallelism; the paper's "2 x CP chunks").

The reorder is its own inverse (applied twice it is the identity), and it is
a reshape plus a `reverse` along the split axis, which XLA turns into one
collective permute of half of each shard: once per step for the tokens at the
start and once for the hidden states at the end, never per layer.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from llama_jax.model import mesh_context


def length_shards() -> int:
    """Into how many pieces the layout in scope splits the `length` axis of activations."""
    return mesh_context.shards(mesh_context.spec("batch", "length", "embed")[1])


def check_length(t: int, shards: int):
    """ValueError (one line) unless `t` tokens split into `shards` shards of two equal halves."""
    if t % (2 * shards):
        raise ValueError(f"sequence length {t} does not split into {shards} sequence shards of two "
                         f"halves each (context parallelism needs a multiple of {2 * shards})")


def balance(x, shards: int, axis: int = 1):
    """Swap the late half of shard i with the late half of shard `shards-1-i` along `axis`.

    Works on numpy and JAX arrays; `balance(balance(x)) == x`.
    """
    if shards == 1:
        return x
    xp = np if isinstance(x, np.ndarray) else jnp
    t = x.shape[axis]
    check_length(t, shards)
    halves = xp.reshape(x, x.shape[:axis] + (shards, 2, t // (2 * shards)) + x.shape[axis + 1:])
    early = xp.take(halves, np.array([0]), axis=axis + 1)
    late = xp.flip(xp.take(halves, np.array([1]), axis=axis + 1), axis=axis)
    return xp.reshape(xp.concatenate([early, late], axis=axis + 1), x.shape)


def balanced_order(t: int, shards: int) -> np.ndarray:
    """int32 [t]: the original row of each position in the balanced order."""
    return balance(np.arange(t, dtype=np.int32), shards, axis=0)
