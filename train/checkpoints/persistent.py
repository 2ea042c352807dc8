"""The persistent tier: `<run_dir>/checkpoints/<step>` (local or gs://), every item a run needs.

A step is the format of `llama_jax/formats/checkpoint.py` (items "params" and
"config", so inference and fine-tuning read it directly with `restore_params`)
plus the items only training needs:

    <run_dir>/checkpoints/<step>/
      params/  config/            as llama_jax.formats.checkpoint writes them
      opt_state/                  optimizer state (moments follow params' shardings)
      data/                       the data iterator's state (grain), one file per process
      run/                        the resolved run config, as JSON
      checksums/                  a 32-bit fingerprint of every array, as JSON (fingerprints.py)
      base/                       a LoRA or vision run: the path of the weights it adapts

Safety, and who provides it:
- A save killed halfway is never taken for a checkpoint: orbax writes a step
  under `<step>.orbax-checkpoint-tmp` and renames it when every item is
  committed. Leftovers are reported and removed when the next run starts.
- A failed save never deletes or overwrites the last good checkpoint: orbax
  deletes old steps (beyond `keep_checkpoints`) only after a newer one is
  committed, and never saves over an existing step.
- Corruption that still decodes (garbage inside a compressed chunk) would
  restore silently; the checksums item catches it.
- Any failure to restore is a `CheckpointError` naming the step and the
  problem, and the previous complete step to fall back on.
"""

from __future__ import annotations

import dataclasses
import gc
import json

import jax
import orbax.checkpoint as ocp
from etils import epath

from llama_jax.formats.checkpoint import (CONFIG, PARAMS, TMP_SUFFIX, CheckpointError, architecture_mismatch,
                                          latest_step, read_config)
from llama_jax.formats.weights import BASE
from llama_jax.paths import user_path
from sharding.place import abstract_arrays
from train.checkpoints.failures import failure_reason, root_cause
from train.checkpoints.fingerprints import SCHEME_KEY, fingerprints
from train.checkpoints.tier import AsyncSaves
from train.config import RunConfig, run_config_from_dict
from train.data.pipeline import checkpoint_restore_args, checkpoint_save_args
from train.tracking.metrics import note

OPT_STATE, DATA, RUN, CHECKSUMS = "opt_state", "data", "run", "checksums"
# Data settings that decide which rows come next; a change breaks exact resumption.
DATA_ORDER_FIELDS = ("source", "paths", "seq_len", "global_batch", "packing", "shuffle", "seed",
                     "synthetic_docs", "vocab_size", "shuffle_window")
TRAINING_ITEMS = (PARAMS, CONFIG, OPT_STATE, DATA)


def checkpoint_dir(run_dir) -> epath.Path:
    """Where a run directory keeps its checkpoints."""
    return user_path(run_dir) / "checkpoints"


class PersistentTier(AsyncSaves):
    """Saves (asynchronously) to and restores from the run directory's checkpoints.

    `log_path`: where orbax's logs go (named in save errors). Restores check the
    architecture against `run.model` and every array against its checksum.
    """

    def __init__(self, run: RunConfig, shardings, log_path):
        self.run = run
        self.shardings = shardings
        self.directory = checkpoint_dir(run.run_dir)
        self.log_path = log_path
        self.saving: int | None = None  # the step of a save not yet waited for
        self.complete: int | None = None  # the newest step known complete (restored, or a save waited for)
        self._leftovers = sorted(p.name for p in self.directory.glob(f"*{TMP_SUFFIX}*"))
        # A save still writing after checkpoint_timeout fails (tensorstore would retry an
        # unreachable bucket for a quarter of an hour; orbax gives up at the timeout).
        # Beside a local tier, the step's directories are made before save() returns: made in
        # the background, the other hosts learn of them by signals keyed by per-process
        # operation ids, which the local tier's saves also advance, and two-process runs saw
        # a host write its data file before the directory existed.
        async_options = ocp.AsyncOptions(timeout_secs=run.checkpoint_timeout,
                                         create_directories_asynchronously=run.local_checkpoints is None)
        options = ocp.CheckpointManagerOptions(max_to_keep=run.keep_checkpoints, create=True,
                                               enable_async_checkpointing=True,
                                               cleanup_tmp_directories=True, async_options=async_options)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._fingerprints = jax.jit(fingerprints, static_argnames="scheme")

    def steps(self) -> list[int]:
        """The complete steps on storage, oldest first."""
        return sorted(self.manager.all_steps())

    def report_leftovers(self):
        """Say which unfinished saves orbax removed when this tier opened."""
        for name in self._leftovers:
            note(f"removing {self.directory / name}: a save that never finished")

    def restore(self, step: int, state, data) -> dict:
        """{"params": ..., "opt_state": ...} of `step`, placed as `state`'s; `data` moves to its position.

        Raises CheckpointError (one line) if that step was written for another
        model, lacks an item, or does not read back bit for bit.
        """
        steps = self.steps()
        step_dir = self.directory / str(step)
        earlier = [s for s in steps if s < step]
        fallback = (f"; step {earlier[-1]} is the previous complete checkpoint (move {step_dir} aside "
                    "to resume from it)") if earlier else ""

        def fail(problem):
            return CheckpointError(f"{step_dir}: {problem}{fallback}")

        present = [item for item in TRAINING_ITEMS if (step_dir / item).is_dir()]
        if len(present) < len(TRAINING_ITEMS):
            missing = next(item for item in TRAINING_ITEMS if item not in present)
            raise fail(f"not a complete training checkpoint (no {missing!r} item)")
        try:
            stored = read_config(self.directory, step)
        except CheckpointError as err:
            raise fail(str(err)) from None
        name = architecture_mismatch(stored, self.run.model)
        if name is not None:
            raise CheckpointError(
                f"{step_dir}: checkpoint has {name} {getattr(stored, name)!r} but the run config "
                f"says {getattr(self.run.model, name)!r}; use another run_dir")
        abstract = abstract_arrays(state, self.shardings)
        problem = None
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**{
                PARAMS: ocp.args.StandardRestore(abstract.params),
                OPT_STATE: ocp.args.StandardRestore(abstract.opt_state),
                DATA: checkpoint_restore_args(data)}))
        except Exception as err:  # orbax and tensorstore raise many types; all mean "unreadable"
            problem = root_cause(err)
        if problem is not None:
            # The reads orbax abandoned complain ("Event loop is closed") when collected:
            # collect them now, while their complaints go to the log file.
            gc.collect()
            raise fail(f"cannot restore ({problem})")
        arrays = {PARAMS: restored[PARAMS], OPT_STATE: restored[OPT_STATE]}
        expected = self._stored_checksums(step_dir)
        if expected is not None:
            # checkpoints written before the scheme was recorded used the linear one
            scheme = expected.pop(SCHEME_KEY, "linear")
            actual = jax.device_get(self._fingerprints(arrays, scheme=scheme))
            for name in sorted(expected):
                if actual.get(name) != expected[name]:
                    raise fail(f"{name} does not match its checksum (a corrupt file?)")
        self.complete = step
        self._note_data_changes(step_dir)
        return arrays

    def _note_data_changes(self, step_dir: epath.Path):
        """Say so when the data settings differ from the checkpoint's: the saved
        position then no longer names the same rows (allowed, e.g. to change data mid-run)."""
        try:
            saved = json.loads((step_dir / RUN / "metadata").read_text()).get("data", {})
        except (OSError, ValueError):
            return
        current = _jsonable(dataclasses.asdict(self.run.data))
        changed = [f"{key} {saved[key]!r} -> {current[key]!r}" for key in DATA_ORDER_FIELDS
                   if key in saved and saved[key] != current.get(key)]
        if changed:
            note("warning: data settings differ from the checkpoint's (" + ", ".join(changed)
                  + "); training continues, but not on the rows the original run would have seen")

    def _base_item(self) -> dict:
        """A LoRA (or vision adapter) run saves only its adapters: item "base" names the weights
        they adapt, so the checkpoint loads whole (llama_jax.formats.weights.load_params) and serves as it is."""
        if self.run.model.lora is None and self.run.model.vision is None:
            return {}
        return {BASE: ocp.args.JsonSave({"path": str(user_path(self.run.init_from))})}

    def save(self, step: int, state, data, checksums: dict):
        """Start saving `state` and `data`'s position at `step` (after the previous save finished).

        Raises CheckpointError if this or the previous save failed."""
        if self.saving is not None:
            self.wait()
        try:
            self.manager.save(step, args=ocp.args.Composite(**{
                PARAMS: ocp.args.StandardSave(state.params),
                CONFIG: ocp.args.JsonSave(self.run.model.to_dict()),
                OPT_STATE: ocp.args.StandardSave(state.opt_state),
                DATA: checkpoint_save_args(data),
                RUN: ocp.args.JsonSave(_jsonable(self.run.to_dict())),
                CHECKSUMS: ocp.args.JsonSave(checksums),
                **self._base_item(),
            }), force=True)
        except Exception as err:
            raise self._save_error(step, err) from None
        self.saving = step

    def poll(self):
        """Raise CheckpointError if the background save has ended in failure (never waits)."""
        if self.saving is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def _saved(self, step: int) -> None:
        self.complete = step

    def _save_error(self, step: int, err: BaseException) -> CheckpointError:
        # From what this process saw, not a listing: the storage that failed the save may
        # not answer one either.
        last = ("no checkpoint is complete" if self.complete is None
                else f"step {self.complete} is the last complete checkpoint")
        return CheckpointError(f"{self.directory}: saving step {step} failed "
                               f"({failure_reason(err, self.run.checkpoint_timeout)}); "
                               f"{last} (orbax's log: {self.log_path})")

    def _stored_checksums(self, step_dir: epath.Path) -> dict | None:
        path = step_dir / CHECKSUMS / "metadata"
        if not path.exists():  # written before checksums existed
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path}: unreadable checksums ({root_cause(err)})") from None


def resume_config(run_dir, overrides: list[str] = ()) -> RunConfig:
    """The run config saved with a run directory's latest checkpoint, plus key=value overrides.

    `run_dir` becomes the directory given (it may have moved since), so
    `python -m train --config <run_dir> [steps=...]` continues that run.
    """
    directory = checkpoint_dir(run_dir)
    step = latest_step(directory)
    if step is None:
        raise CheckpointError(f"{run_dir}: no complete checkpoint to resume (give a run config instead)")
    path = directory / str(step) / RUN / "metadata"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable run config ({root_cause(err)})") from None
    saved["run_dir"] = str(run_dir)
    return run_config_from_dict(saved, overrides)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
