"""Placing a model on a mesh: rules for a config, shardings, born-sharded init, batches.

Typical use (train/ and infer/ do exactly this):

    plan = Placement.create(config, load_layout("fsdp_tp"))
    params = plan.init_params(jax.random.key(0))      # born sharded
    batch = plan.global_batch(local_rows)              # from each process's rows
    with plan.activate():
        logits, _ = jitted_apply(params, batch)        # constraints use the rules
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.config import ModelConfig
from llama_jax.model import mesh_context
from llama_jax.model.kv_cache import CACHE_AXES
from llama_jax.model.pipeline import Schedule, schedule_for
from llama_jax.params import init_params, logical_axes
from sharding.layout import Layout, LayoutError, axes_tuple, load_layout
from sharding.mesh import make_mesh


def rules_for(config: ModelConfig, layout: Layout, mesh: Mesh) -> tuple:
    """The layout's rules, with kv heads replicated where the tensor axis outnumbers them.

    GQA models have few kv heads (8 for most Llama 3 sizes); with tensor = 16
    each kv head is then needed by two shards, so kv_heads is replicated
    rather than split.
    """
    rules = []
    for logical, axes in layout.rules:
        if logical == "kv_heads" and axes is not None:
            size = math.prod(mesh.shape[a] for a in axes_tuple(axes))
            if size > config.n_kv_heads and size % config.n_kv_heads == 0:
                axes = None
        rules.append((logical, axes))
    return tuple(rules)


def _spec(names, rules) -> PartitionSpec:
    return nn.logical_to_mesh_axes(tuple(names), rules)


def check_divisible(shape, spec: PartitionSpec, mesh: Mesh, what: str, names=None):
    """LayoutError naming `what` if a dimension does not divide by the mesh axes it is split on."""
    for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
        parts = math.prod(mesh.shape[a] for a in axes_tuple(axes))
        if size % parts:
            label = names[dim] if names else f"dim {dim}"
            raise LayoutError(f"{what}: {label} of size {size} does not divide by "
                              f"{' x '.join(axes_tuple(axes))} = {parts}")


def validate(config: ModelConfig, layout: Layout, mesh: Mesh, batch: int | None = None,
             seq_len: int | None = None):
    """Check, before anything compiles, that every split dimension divides its axes."""
    rules = rules_for(config, layout, mesh)
    covered = {logical for logical, _ in layout.rules}
    used = {name for names in jax.tree.leaves(logical_axes(config), is_leaf=lambda x: isinstance(x, tuple))
            for name in names if name is not None} | set(CACHE_AXES)
    for name in sorted(used - covered):
        raise LayoutError(f"layout {layout.name}: the model names logical axis {name!r}, which no rule "
                          "covers (its arrays would be silently replicated)")
    tensor_axes = layout.mesh_axes_of("kv_heads")
    kv_parts = math.prod(mesh.shape[a] for a in tensor_axes)
    if config.n_kv_heads % kv_parts and kv_parts % config.n_kv_heads:
        raise LayoutError(f"layout {layout.name}: {' x '.join(tensor_axes)} = {kv_parts} neither divides "
                          f"nor is a multiple of n_kv_heads {config.n_kv_heads}")
    sizes = [(logical, _field(logical), getattr(config, _field(logical)))
             for logical in ("heads", "kv_heads", "mlp", "vocab", "embed", "head_dim")]
    if config.moe is not None:  # the experts, and their width under the name of every FFN width
        sizes += [("expert", "moe.n_experts", config.moe.n_experts), ("mlp", "moe.ffn_dim_expert",
                                                                      config.moe.ffn_dim_expert)]
    if config.vision is not None:  # the image encoder's widths, under the same logical names
        sizes += [(logical, f"vision.{field}", getattr(config.vision, field))
                  for logical, field in (("heads", "n_heads"), ("mlp", "ffn_dim"), ("embed", "dim"))]
    for logical, field, size in sizes:
        check_divisible((size,), _spec((logical,), rules), mesh,
                        f"layout {layout.name}", names=(f"{logical} ({field})",))
    if batch is not None:
        check_divisible((batch,), _spec(("batch",), rules), mesh, f"layout {layout.name}",
                        names=("batch",))
    _validate_pipeline(config, layout, mesh, rules, batch)
    if seq_len is not None:
        check_divisible((seq_len,), _spec(("length",), rules), mesh, f"layout {layout.name}",
                        names=("sequence length",))
        parts = math.prod(mesh.shape[a] for a in axes_tuple(_spec(("length",), rules)[0]))
        if parts > 1 and seq_len % (2 * parts):
            raise LayoutError(f"layout {layout.name}: sequence length {seq_len} does not split into "
                              f"{parts} sequence shards of two halves each (context parallelism "
                              f"balances causal work with an early and a late half per shard; use a "
                              f"multiple of {2 * parts})")


def _validate_pipeline(config: ModelConfig, layout: Layout, mesh: Mesh, rules, batch: int | None):
    """LayoutError unless the layout's stages (llama_jax/model/pipeline.py) can run this model and batch."""
    stage_axes, layer_axes = (axes_tuple(_spec((name,), rules)[0]) for name in ("stage", "layers"))
    stages = math.prod(mesh.shape[a] for a in stage_axes)
    if stages == 1:
        return
    where = f"layout {layout.name}"
    if stage_axes != layer_axes:
        raise LayoutError(f"{where}: layers is split over {' x '.join(layer_axes) or 'nothing'} but stage over "
                          f"{' x '.join(stage_axes) or 'nothing'}; a pipeline splits both over the same axes")
    if not config.scan_layers or config.moe is not None:
        raise LayoutError(f"{where}: pipeline stages need scanned dense layers (scan_layers true, no moe)")
    schedule = schedule_for(stages, **layout.pipeline)
    problem = schedule.problem(len(config.stacked_layers), batch)
    if problem:
        raise LayoutError(f"{where}: {problem}")
    batch_parts = math.prod(mesh.shape[a] for a in axes_tuple(_spec(("batch",), rules)[0]))
    if batch is not None and (batch // schedule.microbatches) % batch_parts:
        raise LayoutError(f"{where}: a pipeline micro-batch of {batch // schedule.microbatches} rows does "
                          f"not divide over the batch axes ({batch_parts}); use fewer micro-batches or more rows")


def abstract_arrays(tree, shardings):
    """`tree`'s arrays (or shape-dtype structs) as `jax.ShapeDtypeStruct`s carrying `shardings`
    (a tree of the same structure): what `.lower()` and orbax's restore take."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _field(logical):
    return {"heads": "n_heads", "kv_heads": "n_kv_heads", "mlp": "ffn_dim", "vocab": "vocab_size",
            "embed": "dim", "head_dim": "head_dim"}[logical]


@dataclasses.dataclass(frozen=True)
class Placement:
    """A model config on a mesh under a layout: everything needed to place arrays."""

    config: ModelConfig
    layout: Layout
    mesh: Mesh
    rules: tuple

    @classmethod
    def create(cls, config: ModelConfig, layout: Layout, devices=None) -> "Placement":
        """Build the mesh and validate the layout against the config (LayoutError if bad)."""
        mesh = make_mesh(layout, devices)
        validate(config, layout, mesh)
        rules = rules_for(config, layout, mesh)
        if dict(rules).get("kv_heads") != dict(layout.rules).get("kv_heads"):
            axes = layout.mesh_axes_of("kv_heads")
            parts = math.prod(mesh.shape[a] for a in axes)
            logging.getLogger(__name__).warning(
                "layout %s: %s = %d outnumbers n_kv_heads %d, so each kv head is replicated "
                "on %d shards", layout.name, " x ".join(axes), parts, config.n_kv_heads,
                parts // config.n_kv_heads)
        return cls(config, layout, mesh, rules)

    def spec(self, *logical_names) -> PartitionSpec:
        return _spec(logical_names, self.rules)

    def shards_along(self, logical_name: str) -> int:
        """Into how many pieces the layout splits a dimension named `logical_name`."""
        axes = self.spec(logical_name)[0] if len(self.spec(logical_name)) else None
        return math.prod(self.mesh.shape[a] for a in axes_tuple(axes))

    def pipeline_schedule(self) -> Schedule | None:
        """The layout's pipeline schedule over this mesh (llama_jax/model/pipeline.py), None without stages."""
        return schedule_for(self.shards_along("stage"), **self.layout.pipeline)

    def sharding(self, *logical_names) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(*logical_names))

    def param_shardings(self, config: ModelConfig | None = None):
        """NamedSharding for every parameter leaf (same tree as the parameters)."""
        axes = logical_axes(config or self.config)
        return jax.tree.map(lambda names: self.sharding(*names), axes,
                            is_leaf=lambda x: isinstance(x, tuple))

    def tree_shardings(self, logical_tree):
        """NamedShardings for any tree of logical-name tuples (e.g. a KV cache's)."""
        return jax.tree.map(lambda names: self.sharding(*names), logical_tree,
                            is_leaf=lambda x: isinstance(x, tuple))

    @contextlib.contextmanager
    def activate(self):
        """Make the mesh, rules and pipeline schedule current, so the model's logical constraints apply."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules), \
                mesh_context.pipeline(**self.layout.pipeline):
            yield

    def init_params(self, rng: jax.Array):
        """Random parameters created directly in their shards (never whole on one host).

        `out_shardings` alone places them: with partitionable random numbers
        each device computes only its own shard.
        """
        return jax.jit(init_params, static_argnums=0,
                       out_shardings=self.param_shardings())(self.config, rng)

    def put(self, tree, shardings):
        """Place host arrays (the same on every process) onto the mesh."""
        return jax.tree.map(lambda x, s: jax.make_array_from_callback(
            np.shape(x), s, lambda index: np.asarray(x[index])), tree, shardings)

    def global_batch(self, local: dict) -> dict:
        """Assemble each process's local rows into global arrays sharded as (batch, length).

        Every process passes the rows its devices hold: with the batch split
        over processes (fsdp, data) that is global_batch / process_count rows
        of its own; where processes are replicas along the batch (e.g. `tp`
        across hosts) it is the same full batch on each. The result is one
        global array per key; length stays whole in every process's rows.
        A nested dict (a vision model's "images") holds per-row arrays split
        on batch only.
        """
        out = {}
        for key, rows in local.items():
            if isinstance(rows, dict):
                out[key] = {name: self._global_rows(f"{key}.{name}", part, ("batch",))
                            for name, part in rows.items()}
            else:
                out[key] = self._global_rows(key, rows, ("batch", "length")[:np.ndim(rows)])
        return out

    def _global_rows(self, key: str, rows, names: tuple[str, ...]) -> jax.Array:
        rows = np.asarray(rows)
        sharding = self.sharding(*names)
        global_shape = (rows.shape[0] * self._process_row_blocks(),) + rows.shape[1:]
        check_divisible(global_shape, sharding.spec, self.mesh, f"batch[{key!r}]", names)
        return jax.make_array_from_process_local_data(sharding, rows, global_shape)

    def process_rows(self, global_batch: int) -> int:
        """How many rows of a `global_batch` this process passes to `global_batch()`."""
        blocks = self._process_row_blocks()
        if global_batch % blocks:
            raise LayoutError(f"batch of {global_batch} rows does not split into the {blocks} "
                              "blocks the processes hold")
        return global_batch // blocks

    def _process_row_blocks(self) -> int:
        """Into how many distinct blocks of rows the processes split the batch.

        The batch is cut into one part per device group on its mesh axes; this
        process feeds the parts its own devices hold, so the global batch is
        its rows times (all parts / parts held here).
        """
        parts = math.prod(self.mesh.shape[a] for a in axes_tuple(self.spec("batch")[0]))
        indices = self.sharding("batch").devices_indices_map((parts,))
        here = {idx[0].start for device, idx in indices.items()
                if device.process_index == jax.process_index()}
        return parts // len(here)


def placement_for(config: ModelConfig, layout: str | Layout | None = None, devices=None) -> Placement:
    """`config` placed by `layout` (a name from configs/layouts or a Layout) over `devices` (None:
    all), or, without a layout, on the first device alone: how inference and evaluation run by default."""
    if layout is None:
        layout, devices = load_layout("dp"), [jax.devices()[0]]
    elif isinstance(layout, str):
        layout = load_layout(layout)
    return Placement.create(config, layout, devices)
