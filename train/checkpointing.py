"""When and what training saves: async orbax checkpoints, exact resume, preemption.

A training checkpoint is the format of `llama_jax/checkpoint.py` (items
"params" and "config", so inference and fine-tuning read it directly) plus
the items only training needs:

    <run_dir>/checkpoints/<step>/
      params/  config/            as llama_jax.checkpoint writes them
      opt_state/                  optimizer state (moments follow params' shardings)
      data/                       the data iterator's state (grain), one file per process
      run/                        the resolved run config, as JSON

Orbax writes each step under a temporary name and renames it when complete,
so a save killed halfway is never taken for a checkpoint, and it deletes old
steps (beyond `keep_checkpoints`) only after a newer one is complete.
SIGTERM (the TPU preemption notice) sets a flag; the loop then saves at the
current step, waits for the save, and returns normally.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from llama_jax.checkpoint import CONFIG, PARAMS, CheckpointError, all_steps, read_config
from train.config import RunConfig
from train.data import checkpoint_restore_args, checkpoint_save_args

OPT_STATE, DATA, RUN = "opt_state", "data", "run"
ARCHITECTURE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size",
                       "head_dim", "tie_embeddings")


def checkpoint_dir(run: RunConfig) -> Path:
    return Path(run.run_dir).absolute() / "checkpoints"


class Checkpointer:
    """Saves every `checkpoint_every` steps (asynchronously) and restores the latest step."""

    def __init__(self, run: RunConfig, shardings):
        self.run = run
        self.shardings = shardings
        self.directory = checkpoint_dir(run)
        self.preempted = False
        self._last_saved = None
        options = ocp.CheckpointManagerOptions(max_to_keep=run.keep_checkpoints, create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._previous_handler = None
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self.preempted = True

    def restore_latest(self, state, data):
        """The latest complete checkpoint's state (and data position), or `state` if none."""
        steps = all_steps(self.directory)
        if not steps:
            return state
        step = steps[-1]
        stored = read_config(self.directory, step)
        for name in ARCHITECTURE_FIELDS:
            if getattr(stored, name) != getattr(self.run.model, name):
                raise CheckpointError(
                    f"{self.directory / str(step)}: checkpoint has {name} {getattr(stored, name)!r} but the "
                    f"run config says {getattr(self.run.model, name)!r}; use another run_dir")
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                state, self.shardings)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**{
                PARAMS: ocp.args.StandardRestore(abstract.params),
                OPT_STATE: ocp.args.StandardRestore(abstract.opt_state),
                DATA: checkpoint_restore_args(data)}))
        except (ValueError, KeyError, FileNotFoundError, TypeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CheckpointError(f"{self.directory / str(step)}: cannot restore ({first})") from None
        self._last_saved = step
        return state.replace(step=jax.numpy.asarray(step, jax.numpy.int32),
                             params=restored[PARAMS], opt_state=restored[OPT_STATE])

    def maybe_save(self, step: int, state, data, force: bool = False):
        """Save at multiples of checkpoint_every (or when forced); returns without waiting."""
        if step == self._last_saved or not (force or step % self.run.checkpoint_every == 0):
            return
        self.manager.save(step, args=ocp.args.Composite(**{
            PARAMS: ocp.args.StandardSave(state.params),
            CONFIG: ocp.args.JsonSave(self.run.model.to_dict()),
            OPT_STATE: ocp.args.StandardSave(state.opt_state),
            DATA: checkpoint_save_args(data),
            RUN: ocp.args.JsonSave(_jsonable(self.run.to_dict())),
        }), force=True)
        self._last_saved = step

    def close(self):
        """Wait for pending saves, then release the manager and the signal handler."""
        self.manager.wait_until_finished()
        self.manager.close()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
