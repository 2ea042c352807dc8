"""The mesh and logical-axis rules in scope, as the model sees them.

`sharding/` activates a layout with `jax.set_mesh(mesh)` and
`flax.linen.logical_axis_rules(rules)` (sharding/place.py,
`Placement.activate`). Code here reads that context back, so a per-device
kernel can be wrapped in `shard_map` without `llama_jax/` importing
`sharding/`. With no mesh in scope (one device, most tests) every array is
whole: `mesh()` is None and `shards(...)` is 1.

A layout that splits the `layers` axis (over `stage`) also sets how its
pipeline runs (`pipeline(...)`, read back by `pipeline_settings()`):
llama_jax/model/pipeline.py.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import flax.linen as nn
import jax
from jax.sharding import AbstractMesh, PartitionSpec


def mesh() -> AbstractMesh | None:
    """The mesh set by `jax.set_mesh`, or None when there is none."""
    current = jax.sharding.get_abstract_mesh()
    return None if current.empty else current


def platform() -> str:
    """The platform the program is being built for: "tpu", "cpu", "gpu".

    The mesh's devices decide (compile-only TPU devices on a CPU host say
    "tpu", so ahead-of-time compiles pick TPU code); without a mesh, JAX's
    default backend.
    """
    current = mesh()
    if current is not None and current.abstract_device is not None:
        return current.abstract_device.platform
    return jax.default_backend()


def spec(*names: str | None) -> PartitionSpec:
    """The PartitionSpec the rules in scope give an array with these logical axis names."""
    rules = nn.get_logical_axis_rules()
    if mesh() is None or not rules:
        return PartitionSpec(*(None for _ in names))
    return nn.logical_to_mesh_axes(names, rules)


def axes_of(entry) -> tuple[str, ...]:
    """One PartitionSpec entry (None, a mesh axis, or several) as a tuple of axis names."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def shards(entry) -> int:
    """Into how many pieces a PartitionSpec entry splits its dimension."""
    current = mesh()
    return 1 if current is None else math.prod(current.shape[a] for a in axes_of(entry))


_PIPELINE = contextvars.ContextVar("pipeline", default=(0, 1))


@contextlib.contextmanager
def pipeline(microbatches: int, repeats: int):
    """Make (micro-batches, repeats) the pipeline settings in scope (0 micro-batches: one a stage)."""
    token = _PIPELINE.set((microbatches, repeats))
    try:
        yield
    finally:
        _PIPELINE.reset(token)


def pipeline_settings() -> tuple[int, int]:
    """(micro-batches, repeats) of the pipeline in scope: (0, 1) unless a layout set them."""
    return _PIPELINE.get()
