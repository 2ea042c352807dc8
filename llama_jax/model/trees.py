"""Operations on parameter trees (nested dicts of arrays) that know nothing of the model."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def stack_layers(params, stacked: range):
    """Unrolled params ("layers_0", ...) to scan layout: the units of `stacked` (see
    `stacked_layers`) in one "layers" subtree, stacked; the others keep their own subtrees."""
    names = {f"layers_{i}" for i in stacked}
    rest = {k: v for k, v in params.items() if k not in names}
    return {**rest, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in stacked])}


def unstack_layers(params, stacked: range):
    """Scan layout to unrolled params ("layers_0", ...); `stacked` as for `stack_layers`."""
    rest = {k: v for k, v in params.items() if k != "layers"}
    return {**rest, **{f"layers_{i}": jax.tree.map(lambda x: x[j], params["layers"])
                       for j, i in enumerate(stacked)}}


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
