"""Per-device shard sizes from shapes alone, for the memory plans (plan.py, serve_plan.py).

No arrays and no devices: an abstract mesh of the layout's sizes is enough to
say how many elements of an array one device holds.
"""

from __future__ import annotations

import math

import flax.linen as nn
from jax.sharding import AbstractMesh, AxisType

from llama_jax.arith import ceil_div
from llama_jax.config import ModelConfig
from sharding.layout import MESH_AXES, Layout, axes_tuple
from sharding.mesh import mesh_shape
from sharding.place import rules_for, validate


def shard_elements(shape, names, rules, sizes) -> int:
    """Elements of one device's shard of an array of `shape` with logical `names`."""
    spec = tuple(nn.logical_to_mesh_axes(tuple(names), rules))
    spec = spec + (None,) * (len(shape) - len(spec))
    return math.prod(ceil_div(dim, math.prod(sizes[a] for a in axes_tuple(axes)))
                     for dim, axes in zip(shape, spec))


def placement_rules(config: ModelConfig, layout: Layout, n_devices: int, **sizes_to_check):
    """(mesh axis sizes, logical rules) of `layout` over `n_devices` abstract devices, after the
    same validation `Placement.create` does (LayoutError if the layout does not place);
    `sizes_to_check` (batch, seq_len) are checked to divide their axes too."""
    sizes = mesh_shape(layout, n_devices)
    abstract_mesh = AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                                 axis_types=(AxisType.Auto,) * len(MESH_AXES))
    validate(config, layout, abstract_mesh, **sizes_to_check)
    return sizes, rules_for(config, layout, abstract_mesh)


def format_bytes(n: float) -> str:
    """`n` bytes in the largest binary unit it reaches: "1.50 GiB", "12.00 MiB", "512 B"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"
