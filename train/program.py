"""A run's train step, built in one place: what `train.loop.train` runs,
`train.compile` compiles ahead of time and bench/train_throughput.py times.

`build_train_step(run, placement, teacher)` makes, from the run config, the
optimizer and learning-rate schedule, the objective (cross-entropy, DPO,
distillation, a reward model or GRPO: train/objectives/run.py; a GRPO step is
`grpo.updates` optimizer steps on one batch of rollouts, `repeated_step`), the
state's abstract shapes and shardings (with DPO's frozen reference or the distillation teacher riding in
`TrainState.reference`), one global batch's abstract shapes, and the step
jitted with the state donated and every input's sharding explicit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from llama_jax.params import abstract_params
from llama_jax.vision.image import image_shapes
from sharding.place import Placement, abstract_arrays
from train.config import RunConfig
from train.objectives.objective import Objective
from train.objectives.run import batch_row_keys, batch_token_keys, reference_shardings, run_objective
from train.optimizer import learning_rate_schedule, make_optimizer
from train.step import BATCH_KEYS, TrainState, abstract_state, batch_shardings, jit_train_step, make_train_step


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """One run's jitted step and what it is built from.

    step: `train_step(state, batch) -> (state, metrics)`, jitted, the state donated.
    optimizer: the optax transformation whose state `TrainState.opt_state` holds.
    objective: what the step minimises (an evaluator of the same objective shares it).
    shardings: the state's shardings, a TrainState of NamedShardings (`reference`:
      the fixed model's, {} when the objective has none).
    state: the state as sharded `jax.ShapeDtypeStruct`s, reference included.
    batch: one global batch as sharded `jax.ShapeDtypeStruct`s: what
      `Placement.global_batch` makes of the run's data.
    """

    step: Callable
    optimizer: optax.GradientTransformation
    objective: Objective
    shardings: TrainState
    state: TrainState
    batch: dict[str, Any]


def build_train_step(run: RunConfig, placement: Placement, teacher: Placement | None = None) -> TrainProgram:
    """The run's train step on `placement` (the run's model on its layout).

    teacher: the distillation teacher's placement (train.objectives.run.teacher_placement,
    on the same devices); None for other objectives. Nothing is allocated or compiled.
    """
    updates = run.grpo.updates if run.grpo is not None else 1  # optimizer steps a run step takes
    optimizer = make_optimizer(run.optimizer, run.steps * updates)
    schedule = learning_rate_schedule(run.optimizer, run.steps * updates)
    state, shardings = abstract_state(placement, optimizer)
    fixed = reference_shardings(run, shardings.params, teacher)
    if fixed:
        shardings = shardings.replace(reference=fixed)
        state = state.replace(reference=abstract_arrays(abstract_params((teacher or placement).config), fixed))
    objective = run_objective(run, teacher)
    row_keys, token_keys = batch_row_keys(run), batch_token_keys(run)
    step = make_train_step(run.model, optimizer, schedule, shardings.params, run.grad_accum, objective=objective)
    rows, seq_len, _ = step_shape(run)
    if run.grpo is not None:  # a batch of rollouts: the prompts' answers after them
        step = repeated_step(step, updates)
    step = jit_train_step(step, placement, shardings, row_keys=row_keys, token_keys=token_keys)
    batch = abstract_batch(placement, rows, seq_len, row_keys, token_keys)
    return TrainProgram(step, optimizer, objective, shardings, state, batch)


def step_shape(run: RunConfig) -> tuple[int, int, int]:
    """(rows, row length, passes) of what one run step trains on: the batch, once; for GRPO, the
    rollouts (prompts x group rows, each prompt plus answer) once for each of grpo.updates
    optimizer steps. Tokens/s and MFU count rows x length x passes (for GRPO the updates'
    work, not the sampling's)."""
    if run.grpo is None:
        return run.data.global_batch, run.data.seq_len, 1
    return (run.data.global_batch * run.grpo.group, run.data.seq_len + run.grpo.max_new_tokens,
            run.grpo.updates)


def repeated_step(train_step: Callable, updates: int) -> Callable:
    """`step(state, batch) -> (state, metrics)`: `updates` optimizer steps of `train_step` on one batch
    (an RL run's several updates on each batch of rollouts) as one run step: the state's step
    advances by 1, the optimizer's count (and the learning-rate schedule, over steps x updates)
    by `updates`. Metrics are the means over the updates; "nonfinite" their bits together."""
    def step(state: TrainState, batch):
        start = state.step
        state, metrics = jax.lax.scan(lambda st, _: train_step(st, batch), state.replace(step=start * updates),
                                      None, length=updates)
        metrics = {name: (jnp.bitwise_or.reduce(value) if name == "nonfinite" else jnp.mean(value, axis=0))
                   for name, value in metrics.items()}
        return state.replace(step=start + 1), metrics
    return step


def abstract_batch(placement: Placement, rows: int, seq_len: int, row_keys: tuple[str, ...] = (),
                   token_keys: tuple[str, ...] = ()) -> dict:
    """A batch of `rows` rows as `jax.ShapeDtypeStruct`s on train.step's `batch_shardings`:
    the token arrays int32 [rows, seq_len] (loss_weights and the `token_keys` float32), the
    `row_keys` float32 [rows], and a vision model's "images" (llama_jax.vision.image.image_shapes)."""
    shapes = {key: jax.ShapeDtypeStruct((rows, seq_len), jnp.float32 if key == "loss_weights" else jnp.int32)
              for key in BATCH_KEYS}
    shapes.update({key: jax.ShapeDtypeStruct((rows, seq_len), jnp.float32) for key in token_keys})
    shapes.update({key: jax.ShapeDtypeStruct((rows,), jnp.float32) for key in row_keys})
    if placement.config.vision is not None:
        shapes["images"] = {name: jax.ShapeDtypeStruct(shape, dtype)
                            for name, (shape, dtype) in image_shapes(placement.config.vision, rows).items()}
    return abstract_arrays(shapes, batch_shardings(placement, row_keys, token_keys))
