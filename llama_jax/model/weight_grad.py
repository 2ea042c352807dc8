"""Weight gradients that leave the backward pass already in their parameter's shards.

A weight's gradient is a sum over every token: einsum("btd,btf->df", x, dy).
With the batch split over devices (data parallel, FSDP) each device holds a
partial sum, and left to itself XLA all-reduces the whole [d, f] gradient
inside the backward layer loop and then keeps a slice of it (measured on
XLA:CPU and XLA:TPU alike; a sharding constraint on the gradient does not
change that). `weight_gradient` computes the partial sum per device inside
`shard_map` and reduce-scatters it over the mesh axes that split both the
tokens and the parameter: each device sends (n-1)/n of the gradient instead
of 2(n-1)/n. Over token axes the parameter is not split on (pure data
parallelism) it is an all-reduce, as it must be.

`project` is an einsum of an activation with a weight whose weight gradient
goes through `weight_gradient`. Letters follow the model's naming
convention (llama.py): b batch, t time, d embed, h heads, n kv heads,
k head_dim, f ffn hidden, v vocab; the mesh and rules in scope
(mesh_context) give each letter's sharding. Without a mesh, or where an
array's shape does not split evenly, it is a plain einsum.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llama_jax.model import mesh_context

LETTER_NAMES = {"b": "batch", "t": "length", "d": "embed", "h": "heads", "n": "kv_heads", "k": "head_dim",
                "f": "mlp", "v": "vocab"}


def weight_gradient(equation: str, x, dy):
    """`einsum(equation, x, dy)` for a weight's gradient (e.g. "btd,btf->df"), reduced over the
    devices that split its contracted letters and left split as the weight is."""
    plan = _plan(equation, x.shape, dy.shape)
    if plan is None:
        return jnp.einsum(equation, x, dy)
    x_spec, dy_spec, out_spec, scatters, sums = plan

    def per_device(x, dy):
        g = jnp.einsum(equation, x, dy)
        for dim, axes in scatters:
            g = jax.lax.psum_scatter(g, axes, scatter_dimension=dim, tiled=True)
        return jax.lax.psum(g, sums) if sums else g

    return jax.shard_map(per_device, mesh=mesh_context.mesh(), in_specs=(x_spec, dy_spec),
                         out_specs=out_spec, check_vma=False)(x, dy)


def _plan(equation: str, x_shape, dy_shape):
    """(in specs, out spec, [(out dim, axes to reduce-scatter over)], axes to psum), or None
    when there is no mesh, a letter is unknown, or a split does not divide a dimension."""
    if mesh_context.mesh() is None or not nn.get_logical_axis_rules():
        return None
    ins, out = equation.split("->")
    x_letters, dy_letters = ins.split(",")
    if any(letter not in LETTER_NAMES for letter in x_letters + dy_letters):
        return None
    contracted = "".join(dict.fromkeys(c for c in x_letters + dy_letters if c not in out))
    # The token letters' sharding as the activations have it (the rules' fallbacks decided jointly).
    contracted_spec = dict(zip(contracted, mesh_context.spec(*(LETTER_NAMES[c] for c in contracted))))
    token_axes = {a for entry in contracted_spec.values() for a in mesh_context.axes_of(entry)
                  if mesh_context.shards(a) > 1}
    out_spec = mesh_context.spec(*(LETTER_NAMES[c] for c in out))
    kept, scatters = {}, []
    for dim, (letter, entry) in enumerate(zip(out, out_spec)):
        axes = tuple(a for a in mesh_context.axes_of(entry) if mesh_context.shards(a) > 1)
        reduced = tuple(a for a in axes if a in token_axes)
        if reduced and reduced != axes:
            return None  # a dimension split over token and other axes at once: left to XLA
        if reduced:
            scatters.append((dim, reduced))
        kept[letter] = None if reduced else (axes or None)
    scattered = {a for _, axes in scatters for a in axes}
    sums = tuple(sorted(token_axes - scattered, key=list(mesh_context.mesh().axis_names).index))

    def operand_spec(letters, shape):
        entries = [contracted_spec[c] if c in contracted else kept[c] for c in letters]
        if any(size % mesh_context.shards(e) for size, e in zip(shape, entries)):
            raise _Uneven
        return P(*entries)

    try:
        x_spec, dy_spec = operand_spec(x_letters, x_shape), operand_spec(dy_letters, dy_shape)
    except _Uneven:
        return None
    return x_spec, dy_spec, out_spec, scatters, sums


class _Uneven(Exception):
    pass


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def project(equation: str, x, w):
    """`einsum(equation, x, w)` (x an activation, w a weight, e.g. "btd,df->btf") whose weight
    gradient is reduce-scattered into w's shards (`weight_gradient`)."""
    return jnp.einsum(equation, x, w)


def _project_fwd(equation, x, w):
    return jnp.einsum(equation, x, w), (x, w)


def _project_bwd(equation, residuals, dy):
    x, w = residuals
    ins, out = equation.split("->")
    x_letters, w_letters = ins.split(",")
    _, x_vjp = jax.vjp(lambda x: jnp.einsum(equation, x, w), x)
    (dx,) = x_vjp(dy)
    dw = weight_gradient(f"{x_letters},{out}->{w_letters}", x, dy.astype(x.dtype))
    return dx, dw.astype(w.dtype)


project.defvjp(_project_fwd, _project_bwd)
