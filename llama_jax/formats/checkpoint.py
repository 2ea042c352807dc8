"""Our on-disk parameter format: an orbax checkpoint that training and inference share.

Layout of a checkpoint directory (managed by `orbax.checkpoint.CheckpointManager`):

    <directory>/
      <step>/                    one directory per saved step (0, 1000, ...)
        params/                  item "params": the parameter pytree in scan
                                 layout ({"embed", "layers", "norm", "output"},
                                 per-layer leaves stacked on a leading axis),
                                 one zarr array per leaf inside orbax's OCDBT
                                 store, chunked one layer per chunk
        config/metadata          item "config": JSON of ModelConfig.to_dict()
        _CHECKPOINT_METADATA     orbax's step metadata
      <step>.orbax-checkpoint-tmp*/   a save in progress (ignored)
        ...                      (on gs://, a save in progress is <step>/ without
                                 commit_success.txt, which ends every save)

Training adds its own items (optimizer state, data-iterator state) to the same
steps; readers here touch only "params" and "config". Arrays restore onto any
target shardings, so a checkpoint saved under one mesh loads under another.

Two writers produce this format: `save_params` here hands a pytree of
(sharded) arrays to orbax; `llama_jax.formats.checkpoint_io.ParamsWriter` writes it
leaf slice by leaf slice for converters, and its `ParamsReader` reads slices
back for exporters.
"""

from __future__ import annotations

import dataclasses

import json
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from llama_jax.cli import first_line
from llama_jax.config import ModelConfig
from llama_jax.params import abstract_params, stacked_layers
from llama_jax.model.trees import partition, stack_layers, unstack_layers
from llama_jax.paths import user_path

PARAMS = "params"
CONFIG = "config"
TMP_SUFFIX = ".orbax-checkpoint-tmp"
COMMIT_SUCCESS = "commit_success.txt"  # written last into every step orbax saves
# Fields that define the function a checkpoint computes and the leaves it stores
# (quantised weights are stored as such). An explicit config given to
# restore_params must agree on these; its other fields (dtypes, remat,
# attention, scan_layers, max_seq_len, kv_cache_dtype) are compute choices and win.
ARCHITECTURE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "head_dim",
                       "tie_embeddings", "rope_theta", "rope_scaling", "norm_eps", "vision", "quantize", "moe",
                       "attention_chunk_size", "nope_layer_interval", "qk_norm", "attn_temperature_tuning", "head")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the request (one-line message)."""


# ---------------------------------------------------------------- saving and restoring

def save_params(directory, config: ModelConfig, params, step: int = 0) -> None:
    """Save `params` (arrays in scan layout, or unrolled if config.scan_layers is False)
    and `config` as step `step` of the checkpoint directory `directory`.

    Arrays may be sharded across devices and hosts; every process must call this.
    Stacked per-layer leaves are chunked one layer per chunk, so exporters can
    read a layer without decoding the others.
    """
    if not config.scan_layers:
        params = stack_layers(params, stacked_layers(config))
    _check_tree(params, abstract_params(config.replace(scan_layers=True)), "params")
    params = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jax.numpy.asarray(x), params)
    save_args = jax.tree_util.tree_map_with_path(
        lambda keys, _: ocp.SaveArgs(shard_axes=(0,) if is_stacked([_key(k) for k in keys]) else ()), params)
    if step in all_steps(directory):
        raise CheckpointError(f"{directory}: step {step} already exists")
    with _manager(directory) as manager:
        saved = manager.save(step, args=ocp.args.Composite(**{
            PARAMS: ocp.args.StandardSave(params, save_args=save_args),
            CONFIG: ocp.args.JsonSave(config.to_dict())}))
        manager.wait_until_finished()
    if not saved:
        raise CheckpointError(f"{directory}: orbax did not save step {step}")


def restore_params(directory, step: int | None = None, shardings=None, config: ModelConfig | None = None,
                   only=None):
    """Restore (config, params) from a checkpoint directory.

    step: a saved step; None takes the latest complete one.
    shardings: a pytree like the params (scan layout) of jax.sharding.Sharding,
      the target placement of each leaf; None puts everything on the first
      device. The saved placement does not matter.
    config: if given, must agree with the stored config on ARCHITECTURE_FIELDS;
      its compute fields are used (param_dtype sets the restored dtype).
    only: a predicate on leaf key paths: restore just the leaves it accepts
      (a LoRA run's checkpoint holds only its adapters).
    Params come back in scan layout, or unrolled ("layers_0", ...) when the
    config has scan_layers False. Raises CheckpointError naming the problem.
    """
    step = resolve_step(directory, step)
    stored = read_config(directory, step)
    config = _reconcile(stored, config, directory, step)
    require_item(directory, step, PARAMS)
    target = abstract_params(config.replace(scan_layers=True))
    if only is not None:
        target = partition(target, only)[0]
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, target)
    _check_tree(shardings, target, "shardings", shapes=False)
    target = jax.tree_util.tree_map_with_path(_placed, target, shardings)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(_step_dir(directory, step) / PARAMS, target)
    except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise plain Exceptions for corrupt data
        raise CheckpointError(f"{_step_dir(directory, step)}: cannot restore params ({first_line(err)})") from None
    if not config.scan_layers:
        params = unstack_layers(params, stacked_layers(config))
    return config, params


def latest_step(directory) -> int | None:
    """The newest complete step in `directory`, or None if there is none (or no directory)."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


def all_steps(directory) -> list[int]:
    """Every complete step in `directory`, ascending (empty if the directory is missing).

    Steps are the directories named by a number that orbax counts as finalized:
    locally a save in progress carries a suffix (renamed when complete); on
    gs://, which cannot rename, it is written in place and finalized by its
    commit_success.txt, so a step directory without one is a save cut short.
    """
    directory = user_path(directory)
    if not directory.is_dir():
        return []
    return sorted(ocp.step.checkpoint_steps(directory))


def read_config(directory, step: int | None = None) -> ModelConfig:
    """The ModelConfig stored with a step (the latest complete step by default)."""
    step = resolve_step(directory, step)
    path = require_item(directory, step, CONFIG) / "metadata"
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable config item ({first_line(err)})") from None
    except ValueError as err:
        raise CheckpointError(f"{path}: bad config ({err})") from None


# ---------------------------------------------------------------- helpers

def _manager(directory) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(user_path(directory))


def _step_dir(directory, step: int) -> epath.Path:
    return user_path(directory) / str(step)  # absolute, as orbax wants; gs:// as it is


def resolve_step(directory, step: int | None) -> int:
    """`step` if it is a complete step of `directory`, the latest one if None; else CheckpointError."""
    if not user_path(directory).is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    steps = all_steps(directory)
    if step is None:
        if not steps:
            raise CheckpointError(f"{directory}: no complete checkpoint step")
        return steps[-1]
    if step not in steps:
        raise CheckpointError(f"{directory}: no complete step {step} (have: {', '.join(map(str, steps)) or 'none'})")
    return step


def require_item(directory, step: int, item: str) -> epath.Path:
    """The directory of item `item` ("params", "config") of a step; CheckpointError if absent."""
    path = _step_dir(directory, step) / item
    if not path.is_dir():
        raise CheckpointError(f"{_step_dir(directory, step)}: step has no {item!r} item")
    return path


def architecture_mismatch(stored: ModelConfig, given: ModelConfig) -> str | None:
    """The first field of ARCHITECTURE_FIELDS on which two configs differ, or None (the MoE
    auxiliary-loss weights are a training choice, not architecture)."""
    def value(config, name):
        if name == "moe" and config.moe is not None:
            return dataclasses.replace(config.moe, load_balance_weight=0.0, router_z_weight=0.0)
        return getattr(config, name)
    return next((name for name in ARCHITECTURE_FIELDS if value(given, name) != value(stored, name)), None)


def _reconcile(stored: ModelConfig, given: ModelConfig | None, directory, step) -> ModelConfig:
    if given is None:
        return stored
    name = architecture_mismatch(stored, given)
    if name is not None:
        raise CheckpointError(f"{_step_dir(directory, step)}: config {name} is {getattr(given, name)!r} "
                              f"but the checkpoint has {getattr(stored, name)!r}")
    return given


def _placed(keys, leaf, sharding) -> jax.ShapeDtypeStruct:
    try:
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    except ValueError as err:
        raise CheckpointError(f"shardings: {'/'.join(_key(k) for k in keys)} of shape {leaf.shape}: "
                              f"{first_line(err)}") from None


def _check_tree(tree, reference, what: str, shapes: bool = True) -> None:
    got = {path: leaf for path, leaf in named_leaves(tree)}
    for path, leaf in named_leaves(reference):
        name = "/".join(path)
        if path not in got:
            raise CheckpointError(f"{what}: missing leaf {name}")
        if shapes and tuple(np.shape(got[path])) != tuple(leaf.shape):
            raise CheckpointError(f"{what}: leaf {name} has shape {tuple(np.shape(got[path]))}, "
                                  f"expected {tuple(leaf.shape)}")
    extra = sorted(set(got) - {path for path, _ in named_leaves(reference)})
    if extra:
        raise CheckpointError(f"{what}: unexpected leaf {'/'.join(extra[0])}")


def named_leaves(tree) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path of string keys, leaf) for every leaf of a pytree, e.g. (("embed", "embedding"), array)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    for keys, leaf in flat:
        yield tuple(_key(k) for k in keys), leaf


def is_stacked(path) -> bool:
    """Whether the leaf at `path` (string keys) is stacked on a leading `layers` axis (scanned layers)."""
    return "layers" in path


def _key(key) -> str:
    return str(getattr(key, "key", getattr(key, "name", key)))
