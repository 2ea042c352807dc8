"""The training step: one jitted `train_step(state, batch) -> (state, metrics)`.

Gradient accumulation runs `grad_accum` micro-batches through a `lax.scan`
and sums unnormalised losses, then divides once by the batch's total loss
weight, so k micro-batches give exactly the gradient of one k-times batch.
Data-parallel replicas accumulate locally and are reduced once a step
(train/accumulate.py).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax.config import ModelConfig
from llama_jax.model import mesh_context
from llama_jax.model.lora import is_adapter
from llama_jax.params import init_params
from llama_jax.model.trees import partition
from llama_jax.vision.image import image_shapes
from llama_jax.vision.model import is_image_adapter
from sharding.place import Placement, abstract_arrays
from sharding.topology import train_compiler_options
from train.accumulate import over_replicas, replica_axes
from train.objectives.cross_entropy import cross_entropy
from train.objectives.objective import Objective

BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_weights")
# A vision model's batch also holds "images": its rows' images (llama_jax.vision.image.image_inputs).
# Bits of the "nonfinite" metric: which checked value of a step was NaN or infinite.
NONFINITE_BITS = {"loss": 1, "grad norm": 2, "update norm": 4}


@flax.struct.dataclass
class TrainState:
    """What a step carries: the step count, the trained parameters and their optimizer
    state, the frozen parameters (a LoRA run's base; empty when all train), and
    the fixed model an objective compares with (`reference`: DPO's reference
    policy or a distillation teacher; empty otherwise).

    The frozen and reference ones ride in the (donated) state so that they stay
    placed on the mesh; the step returns them untouched (XLA aliases them, no
    copy), and checkpoints hold only `params` and `opt_state`.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    frozen: Any = flax.struct.field(default_factory=dict)
    reference: Any = flax.struct.field(default_factory=dict)


def trainable(config: ModelConfig) -> Callable[[tuple[str, ...]], bool]:
    """Which parameters a run trains, by key path: the adapters with LoRA; for a vision
    model the image adapters (cross-attention layers, projector, <|image|> row: Meta's
    adapter training, text model and image encoder frozen); else all."""
    if config.lora is not None:
        return is_adapter
    if config.vision is not None:
        return is_image_adapter
    return lambda path: True


def _split_micro_batches(batch, grad_accum: int):
    """[rows, ...] -> [grad_accum, rows / grad_accum, ...], micro-batch i = rows i, i+k, i+2k, ...

    Strided rows keep every micro-batch spread over all data-parallel shards.
    """
    def split(x):
        rows = x.shape[0]
        x = x.reshape(rows // grad_accum, grad_accum, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


def make_gradients(config: ModelConfig, param_shardings, grad_accum: int = 1, z_loss: float = 0.0,
                   loss_chunk: int = 0, objective: Objective | None = None):
    """`gradients(params, batch, frozen=None, reference=None) -> (grads, sums)`.

    grads are the unnormalised (summed over tokens or pairs) gradients of the
    batch's objective (default: `cross_entropy(config, z_loss, loss_chunk)`)
    with respect to `params` (the model's parameters are `params` joined with
    `frozen`, which get no gradient, nor does `reference`), in the
    parameters' dtype, summed over `grad_accum` micro-batches; `sums` is the
    objective's dict of sums over the whole batch.
    They and the accumulation buffer are constrained to `param_shardings` (a
    tree of shardings like the parameters'): left to XLA, they may come out
    replicated, a whole model's gradients on every device.
    """
    objective = objective or cross_entropy(config, z_loss, loss_chunk)
    grad_fn = jax.value_and_grad(objective.sums, has_aux=True)

    def like_params(grads, shardings=param_shardings):
        return jax.lax.with_sharding_constraint(grads, shardings)

    def accumulated(params, batch, frozen, reference, like=like_params):
        def accumulate(carry, micro):
            grads, sums = carry
            (_, micro_sums), micro_grads = grad_fn(params, frozen, reference, micro)
            grads = like(jax.tree.map(jnp.add, grads, like(micro_grads)))
            return (grads, jax.tree.map(jnp.add, sums, micro_sums)), None

        micro_batches = _split_micro_batches(batch, grad_accum)
        first = jax.tree.map(lambda x: x[0], micro_batches)
        sum_shapes = jax.eval_shape(grad_fn, params, frozen, reference, first)[0][1]
        zeros = like(jax.tree.map(jnp.zeros_like, params))
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros, jax.tree.map(jnp.zeros_like, sum_shapes)),
                                        micro_batches)
        return grads, sums

    def gradients(params, batch, frozen=None, reference=None):
        frozen = {} if frozen is None else frozen
        reference = {} if reference is None else reference
        if grad_accum == 1:  # no zero-filled accumulator: a pass over every parameter saved
            (_, sums), grads = grad_fn(params, frozen, reference, batch)
            return like_params(grads), sums
        specs = jax.tree.map(lambda s: s.spec, param_shardings)
        axes = replica_axes(specs)
        rows = jax.tree.leaves(batch)[0].shape[0]
        if not axes or rows % (grad_accum * math.prod(mesh_context.shards(a) for a in axes)):
            # (a replica whose rows do not split into grad_accum micro-batches: reduced each one)
            return accumulated(params, batch, frozen, reference)
        # Replicas accumulate their own rows and are summed once (train/accumulate.py).
        local = functools.partial(accumulated, like=functools.partial(like_params, shardings=specs))
        return over_replicas(local, axes)(params, batch, frozen, reference)

    return gradients


def make_train_step(config: ModelConfig, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, param_shardings, grad_accum: int = 1,
                    z_loss: float = 0.0, loss_chunk: int = 0, objective: Objective | None = None):
    """`train_step(state, batch) -> (state, metrics)`, not yet jitted (see `jit_train_step`).

    `param_shardings`: the parameters' shardings (`shardings.params` of
    `init_state`), which the gradients keep. A step whose loss, gradient norm
    or update norm is not finite is not applied: parameters and optimizer
    state stay as they were, the step count advances, and the int32 metric
    "nonfinite" holds the NONFINITE_BITS of the values at fault (0 if none).
    Metrics: the objective's sums over its weight (default: cross-entropy's
    loss, z_loss and accuracy, see `Objective`), and the norms and rate.
    """
    objective = objective or cross_entropy(config, z_loss, loss_chunk)
    gradients = make_gradients(config, param_shardings, grad_accum, objective=objective)

    def train_step(state: TrainState, batch):
        grads, sums = gradients(state.params, batch, state.frozen, state.reference)
        weight = jnp.maximum(sums["weight"], 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm, update_norm = optax.tree.norm(grads), optax.tree.norm(updates)
        loss_finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in jax.tree.leaves(sums)]))
        checked = {"loss": loss_finite, "grad norm": jnp.isfinite(grad_norm),
                   "update norm": jnp.isfinite(update_norm)}
        nonfinite = sum(jnp.where(ok, 0, NONFINITE_BITS[name]) for name, ok in checked.items())
        applied = nonfinite == 0  # else params and optimizer state stay as they were
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(applied, new, old),
                                         (params, opt_state), (state.params, state.opt_state))
        metrics = {
            **{name: value / weight for name, value in sums.items() if name != "weight"},
            "grad_norm": grad_norm, "update_norm": update_norm, "learning_rate": schedule(state.step),
            objective.count: sums["weight"], "nonfinite": nonfinite,
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def state_shardings(placement: Placement, abstract_state: TrainState):
    """Shardings for the whole state: optimizer moments follow their parameters.

    An optimizer leaf whose key path ends with a parameter's path (optax's mu
    and nu mirror the parameter tree) gets that parameter's sharding; counts
    and other scalars are replicated.
    """
    by_path = {}
    for path, sharding in jax.tree_util.tree_flatten_with_path(placement.param_shardings())[0]:
        by_path[tuple(k.key for k in path)] = sharding
    replicated = NamedSharding(placement.mesh, PartitionSpec())

    def pick(path, leaf):
        keys = tuple(getattr(k, "key", None) for k in path)
        for start in range(len(keys)):
            if keys[start:] in by_path:
                return by_path[keys[start:]]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_state)


def _new_state(config: ModelConfig, optimizer, rng) -> TrainState:
    params, frozen = partition(init_params(config, rng), trainable(config))
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), frozen)


def abstract_state(placement: Placement, optimizer):
    """(the state as sharded `jax.ShapeDtypeStruct`s, its shardings); nothing allocated."""
    shapes = jax.eval_shape(lambda rng: _new_state(placement.config, optimizer, rng), jax.random.key(0))
    shardings = state_shardings(placement, shapes)
    return abstract_arrays(shapes, shardings), shardings


def init_state(placement: Placement, optimizer, rng, params=None):
    """(a TrainState born sharded, its shardings): parameters and optimizer state are
    created in their shards.

    params: placed starting values (e.g. weights a fine-tuning run starts
    from) for every frozen parameter, and for every trained one or none of
    them (a LoRA run's fresh adapters). Missing ones are drawn from `rng`;
    the optimizer state always starts fresh.
    """
    abstract, shardings = abstract_state(placement, optimizer)
    config = placement.config
    if params is None:
        create = jax.jit(lambda rng: _new_state(config, optimizer, rng), out_shardings=shardings)
        return create(rng), shardings
    given, frozen = partition(params, trainable(config))
    _check_same_leaves(frozen, abstract.frozen, "frozen")
    if not given:  # only the fresh leaves are computed: XLA drops the rest of the init
        fresh = jax.jit(lambda rng: partition(init_params(config, rng), trainable(config))[0],
                        out_shardings=shardings.params)
        given = fresh(rng)
    _check_same_leaves(given, abstract.params, "trained")
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(given)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step, given, opt_state, frozen), shardings


def _check_same_leaves(tree, reference, what: str):
    got = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    want = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(reference)}
    if got != want:
        missing = sorted(set(want) - set(got)) or sorted(k for k in want if got.get(k) != want[k])
        raise ValueError(f"starting parameters: the {what} ones do not match the model "
                         f"(first difference at {(missing or sorted(set(got) - set(want)))[0]})")


def jit_train_step(train_step, placement: Placement, shardings, row_keys: tuple[str, ...] = (),
                   token_keys: tuple[str, ...] = ()):
    """Jit with donated state and explicit shardings for state and batch (see `batch_shardings`),
    and the chip's compile options (sharding.topology.train_compiler_options)."""
    batch = batch_shardings(placement, row_keys, token_keys)
    return jax.jit(train_step, donate_argnums=0, in_shardings=(shardings, batch),
                   compiler_options=train_compiler_options(placement.mesh.devices.flat),
                   out_shardings=(shardings, None))


def batch_shardings(placement: Placement, row_keys: tuple[str, ...] = (), token_keys: tuple[str, ...] = ()) -> dict:
    """The batch's shardings: its token arrays and the values `token_keys` ([B, T], e.g. a rollout's
    log-probabilities) on (batch, length), a vision model's "images" (one entry per row, see
    `Placement.global_batch`) and the values `row_keys` ([B], one a row, e.g. a DPO pair's
    precomputed reference log-probabilities) on batch."""
    out = {key: placement.sharding("batch", "length") for key in (*BATCH_KEYS, *token_keys)}
    out.update({key: placement.sharding("batch") for key in row_keys})
    if placement.config.vision is not None:
        out["images"] = {key: placement.sharding("batch") for key in image_shapes(placement.config.vision, 1)}
    return out
