"""Checks on the arrays a checkpoint holds: order-free fingerprints and finiteness.

Fingerprints are wrapping integer sums of a hash per element, exact in any
order, so a sharded array gives the same value on every layout (`fingerprint`
states what they catch). A save records them; a restore recomputes and compares.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SCHEME_KEY, SCHEME = "scheme", "fmix32"  # the checksums item's fingerprint (no array is named that)


def fingerprints(trees: dict, scheme: str = SCHEME) -> dict:
    """{"item/leaf/path": uint32 fingerprint (`fingerprint`)} for dicts of array trees."""
    out = {}
    for item, tree in trees.items():
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            keys = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
            out["/".join([item, *map(str, keys)])] = fingerprint(x, scheme)
    return out


def all_finite(trees) -> jax.Array:
    """True if no floating-point leaf of `trees` holds a NaN or an infinity."""
    leaves = [x for x in jax.tree.leaves(trees) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 that mixes every bit into every other."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def fingerprint(x: jax.Array, scheme: str = SCHEME) -> jax.Array:
    """A uint32 fingerprint of an array's bits: the wrapping sum over elements of a hash of
    (bits, flat index). Addition modulo 2**32 does not depend on its order, so a sharded
    array gives the same value on any mesh.

    "fmix32" (what saves write): hash = fmix32(bits ^ fmix32(index)). For a fixed index the
    hash is a bijection of the bits, so any change to one element always changes the sum;
    changes to several elements (a swap, a shifted block) go unseen only when their hashes'
    differences cancel, about one chance in 2**32. "linear" (checkpoints from before
    the scheme was recorded): hash = bits * (2 * index + 1). It also always catches a
    change to one element, but misses swaps whose differences cancel exactly: swapping
    elements that differ only in the sign bit, [1.0, -1.0] for [-1.0, 1.0], for one.
    """
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize > 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)  # adds a trailing axis
    else:
        bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
        bits = bits.astype(jnp.uint32)
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    if scheme == "linear":
        return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)
    return jnp.sum(_fmix32(bits ^ _fmix32(index)), dtype=jnp.uint32)
