"""Gradient accumulation that reduces across data-parallel replicas once a step.

Accumulating micro-batch gradients in one sharded buffer makes XLA reduce
every micro-batch's gradient across the devices that hold different rows:
`grad_accum` k moves k times the gradient bytes. Over the axes where the
parameters are replicated (pure data parallelism: `data`, e.g. across slices)
that reduction can wait: `over_replicas` runs the whole accumulation inside
`shard_map`, manual over those axes only, so each replica sums its own rows'
gradients locally and they are summed across replicas once, at the end. Axes
that split parameters (FSDP) still reduce-scatter inside each micro-batch's
backward pass (llama_jax/model/weight_grad.py): deferring that would hold a
whole model's unreduced gradient on every device.

Inside, the logical-axis rules lose the replica axes, so the model's
constraints see the replica's own rows as the whole batch.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from llama_jax.model import mesh_context


def replica_axes(param_specs) -> tuple[str, ...]:
    """Mesh axes (of more than one device) that split the batch but no parameter."""
    if mesh_context.mesh() is None or not nn.get_logical_axis_rules():
        return ()
    used = {a for spec in jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P))
            for entry in spec for a in mesh_context.axes_of(entry)}
    return tuple(a for a in mesh_context.axes_of(mesh_context.spec("batch")[0])
                 if a not in used and mesh_context.shards(a) > 1)


@contextlib.contextmanager
def _rules_without(axes: tuple[str, ...]):
    rules = []
    for logical, mesh_axes in nn.get_logical_axis_rules():
        kept = tuple(a for a in mesh_context.axes_of(mesh_axes) if a not in axes)
        rules.append((logical, kept[0] if len(kept) == 1 else (kept or None)))
    with nn.logical_axis_rules(rules):
        yield


def over_replicas(local_gradients, axes: tuple[str, ...]):
    """`local_gradients(params, batch, frozen, reference) -> (grads, sums)` run on each replica's
    rows (the batch's leading axis split over `axes`), its grads and sums summed across
    replicas once."""
    def per_replica(params, batch, frozen, reference):
        with _rules_without(axes):
            grads, sums = local_gradients(params, batch, frozen, reference)
        return jax.lax.psum((grads, sums), axes)

    def gradients(params, batch, frozen, reference):
        rows = P(axes)
        return jax.shard_map(per_replica, in_specs=(P(), rows, P(), P()), out_specs=P(), axis_names=set(axes),
                             check_vma=False)(params, batch, frozen, reference)

    return gradients
