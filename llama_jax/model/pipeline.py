"""Pipeline parallelism over the stacked layers, chosen by the layout, not by the model.

When the rules in scope split the logical `stage` axis, and with it the
`layers` axis of the stacked parameters, over mesh axes (a layout's
`[stage, stage]` and `[layers, stage]` rules), the devices along them are
stages, each holding its own layers. The model's layer scan then becomes the
circular (interleaved) schedule of MaxText and torchtitan's "interleaved"
pipelines, written with sharded arrays (GSPMD), so FSDP and tensor
parallelism inside a stage come from the same rules as without stages:

- The `n` stacked units (layers, or blocks of a Llama 4 pattern) are `R`
  repeats x `S` stages x `L` units: unit `(r * S + s) * L + l` belongs to
  stage `s`. Stage `s` runs `L` consecutive units, hands its output to stage
  `s + 1` (a collective-permute over `stage`), and the last stage's output
  comes back to stage 0 for the next repeat.
- The batch is cut into `M` micro-batches (rows m, m + M, m + 2M, ..., so
  each stays spread over the data axes). At tick `t`, stage `s` works on item
  `k = t - s`: micro-batch `k % M` in repeat `k // M`, if `0 <= k < M * R`.
  All stages run in lockstep (one `vmap` over the stage axis), so a stage
  with no item computes on filler that is never used. Micro-batches waiting
  for stage 0 (fresh ones, and those back from the last stage before their
  next repeat) sit in a buffer on stage 0; the last micro-batches out of the
  last repeat are the result, broadcast over `stage` once (the output head
  and loss run on every stage, as the embedding does).
- Ticks: `M * R + S - 1`, of which each stage is busy `M * R`. The bubble
  (the fraction of stage time spent on filler, forward and backward alike) is
  `(S - 1) / (M * R + S - 1)`. `M >= S` lets a micro-batch leaving the last
  stage wait for its next repeat instead of colliding with a newer one.

Storage: the parameters keep their one canonical order (checkpoints restore
onto any layout), and the layout shards `layers` contiguously over `stage`.
With `R = 1` that is exactly the stages' split (nothing moves); with `R > 1`
stage `s` needs units that another stage stores, so each step moves
(R - 1) / R of the stacked weights over `stage` (an all-to-all) and their
gradients back. Repeats trade that for a bubble R times smaller.

Letters: b batch, t time, d embed; S stages, M micro-batches, R repeats,
L units per stage and repeat.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llama_jax.model import mesh_context


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A circular pipeline: `stages` x `repeats` groups of units, `microbatches` through them."""

    stages: int
    repeats: int
    microbatches: int

    @property
    def ticks(self) -> int:
        return self.microbatches * self.repeats + self.stages - 1

    @property
    def bubble(self) -> float:
        """Fraction of each stage's time spent on filler: (S - 1) / (M * R + S - 1)."""
        return (self.stages - 1) / self.ticks

    def problem(self, units: int, rows: int | None = None) -> str | None:
        """Why `units` stacked units and a batch of `rows` rows cannot run this schedule (None: they can)."""
        groups = self.stages * self.repeats
        if units % groups:
            return (f"{units} stacked layers do not split into stages {self.stages} x repeats "
                    f"{self.repeats} = {groups} equal groups")
        if self.microbatches < self.stages:
            return (f"pipeline.microbatches {self.microbatches} is fewer than the {self.stages} stages "
                    "(the circular schedule needs one micro-batch a stage at least)")
        if rows is not None and rows % self.microbatches:
            return f"batch of {rows} rows does not split into {self.microbatches} pipeline micro-batches"
        return None


def schedule_for(stages: int, microbatches: int, repeats: int) -> Schedule | None:
    """The schedule of `stages` stages (None for one: no pipeline); 0 micro-batches means one a stage."""
    return None if stages == 1 else Schedule(stages, repeats, microbatches or stages)


def stage_axes():
    """The mesh axes the rules in scope split the logical `stage` axis over (None: no pipeline).

    `stage` names the pipeline's own dimension (the stages' weights and the
    micro-batches in flight); a layout splits it over the same mesh axes as
    `layers` (sharding.place.validate), so each stage holds its units.
    """
    return mesh_context.spec("stage")[0] if mesh_context.mesh() is not None else None


def schedule_in_scope() -> Schedule | None:
    """The schedule the mesh and layout in scope ask for, or None without stages."""
    return schedule_for(mesh_context.shards(stage_axes()), *mesh_context.pipeline_settings())


def _micro(x, m: int):
    """[B, ...] -> [M, B / M, ...]: micro-batch i holds rows i, i + M, i + 2M, ..."""
    return jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)


def _unmicro(x):
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def run(apply_unit, params, x_btd, side, schedule: Schedule, first_unit: int = 0):
    """The stacked units applied in order to x_btd [b, t, d], as the circular schedule runs them.

    apply_unit(unit_params, x_btd, unit_index, side) -> x_btd applies one unit
    (its parameters: one slice of `params` along the leading axis). params:
    the stacked units' parameters, leading axis n (canonical order, unit i at
    index i). side: a pytree of per-row inputs (leading axis b) or None
    leaves, handed to each unit for its own micro-batch's rows. first_unit:
    the index of params' unit 0 in the model.
    """
    s_count, r_count, m_count = schedule.stages, schedule.repeats, schedule.microbatches
    n = jax.tree.leaves(params)[0].shape[0]
    problem = schedule.problem(n, x_btd.shape[0])
    if problem:
        raise ValueError(f"pipeline: {problem}")
    per = n // (s_count * r_count)
    axes = stage_axes()

    def by_stage(a):  # [n, ...] -> [R, S, L, ...], S on the stage axes
        a = a.reshape(r_count, s_count, per, *a.shape[1:])
        return jax.lax.with_sharding_constraint(a, P(None, axes, *(P.UNCONSTRAINED,) * (a.ndim - 2)))

    weights = jax.tree.map(by_stage, params)
    side_m = jax.tree.map(lambda a: _micro(a, m_count), side)

    def stage(w_rl, x, stage_id, item):
        """One stage's L units on its current item (micro-batch item % M in repeat item // M)."""
        repeat = jnp.clip(item // m_count, 0, r_count - 1)
        w_l = jax.tree.map(lambda a: a[repeat], w_rl)
        rows = jax.tree.map(lambda a: a[item % m_count], side_m)
        first = first_unit + (repeat * s_count + stage_id) * per

        def unit(x, p_i):
            p, i = p_i
            return apply_unit(p, x, first + i, rows), None

        return jax.lax.scan(unit, x, (w_l, jnp.arange(per)))[0]

    stages = jax.vmap(stage, in_axes=(1, 0, 0, 0), spmd_axis_name=axes)
    stage_ids = jnp.arange(s_count)
    first = (stage_ids == 0)[:, None, None, None]
    state_names = ("stage", "batch", "length", "embed")
    buffer_names = ("stage", None, "batch", "length", "embed")

    def tick(carry, t):
        # state [S, b/M, t, d]: what each stage works on at tick t (stage 0's comes from the buffer).
        # buffer [S, M, b/M, t, d]: the micro-batches waiting for stage 0, its row on stage 0 (the
        # other rows are never read): only elementwise updates and slices of unsplit axes, so
        # nothing but the shift between stages moves.
        state, buffer = carry
        state = jnp.where(first, buffer[:, t % m_count], state)
        done = stages(weights, state, stage_ids, t - stage_ids)
        shifted = nn.with_logical_constraint(jnp.roll(done, 1, axis=0), state_names)  # shifted[0]: the last stage's
        item = t - (s_count - 1)  # the last stage's item: kept once it is a real one
        write = (jnp.arange(m_count) == item % m_count) & (item >= 0) & (item < m_count * r_count)
        buffer = jnp.where(write[None, :, None, None, None], shifted[:, None], buffer)
        return (shifted, nn.with_logical_constraint(buffer, buffer_names)), None

    micro = _micro(x_btd, m_count)
    buffer = nn.with_logical_constraint(jnp.broadcast_to(micro, (s_count, *micro.shape)), buffer_names)
    state = nn.with_logical_constraint(jnp.zeros((s_count, *micro.shape[1:]), x_btd.dtype), state_names)
    (_, buffer), _ = jax.lax.scan(tick, (state, buffer), jnp.arange(schedule.ticks))
    return _unmicro(buffer[0])
