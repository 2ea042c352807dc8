"""When and what training saves: async orbax checkpoints, exact resume, preemption.

A training checkpoint is the format of `llama_jax/formats/checkpoint.py` (items
"params" and "config", so inference and fine-tuning read it directly with
`restore_params`) plus the items only training needs:

    <run_dir>/checkpoints/<step>/
      params/  config/            as llama_jax.formats.checkpoint writes them
      opt_state/                  optimizer state (moments follow params' shardings)
      data/                       the data iterator's state (grain), one file per process
      run/                        the resolved run config, as JSON
      checksums/                  a 32-bit fingerprint of every array, as JSON

Safety, and who provides it:
- A save killed halfway is never taken for a checkpoint: orbax writes a step
  under `<step>.orbax-checkpoint-tmp` and renames it when every item is
  committed. Leftovers are reported and removed when the next run starts.
- A failed save never deletes or overwrites the last good checkpoint: orbax
  deletes old steps (beyond `keep_checkpoints`) only after a newer one is
  committed, and never saves over an existing step. The failure of a
  background save is a one-line CheckpointError at the next step (with one
  process; with several, at the next save), orbax's tracebacks in a log file.
- A state holding NaN or infinite values is never saved (DivergenceError), so
  `keep_checkpoints` never deletes the last finite checkpoint for it.
- Corruption that still decodes (garbage inside a compressed chunk) would
  restore silently; the checksums item catches it. Fingerprints are wrapping
  integer sums of a hash per element, exact in any order, so they agree on
  every layout (`_fingerprint` states what they catch).
- Any failure to restore is a `CheckpointError` naming the step and the
  problem, and the previous complete step to fall back on.

Preemption: on one process, SIGTERM sets a flag; the loop saves at the
current step, waits for the save and returns. On several processes the
signal reaches hosts at different times, so a local flag would make them
disagree on the step to save at (and hang in the save's collectives).
There JAX's preemption service (started by `jax.distributed.initialize`,
which owns SIGTERM) agrees on one step across hosts, and every host
asks `reached_preemption_sync_point(step)` once per step. With the service
disabled (`jax_enable_preemption_service=False`), SIGTERM ends the processes
and the run resumes from its last periodic checkpoint.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from llama_jax.cli import first_line
from llama_jax.formats.checkpoint import (CONFIG, PARAMS, TMP_SUFFIX, CheckpointError, architecture_mismatch,
                                          latest_step, read_config)
from llama_jax.paths import user_path
from llama_jax.formats.weights import BASE
from sharding.place import abstract_arrays
from train.config import RunConfig, run_config_from_dict
from train.data.pipeline import checkpoint_restore_args, checkpoint_save_args
from train.tracking.library_logs import LibraryLogs
from train.tracking.metrics import note
from train.nonfinite import DivergenceError

OPT_STATE, DATA, RUN, CHECKSUMS = "opt_state", "data", "run", "checksums"
SCHEME_KEY, SCHEME = "scheme", "fmix32"  # the checksums item's fingerprint (no array is named that)
# Data settings that decide which rows come next; a change breaks exact resumption.
DATA_ORDER_FIELDS = ("source", "paths", "seq_len", "global_batch", "packing", "shuffle", "seed",
                     "synthetic_docs", "vocab_size", "shuffle_window")
TRAINING_ITEMS = (PARAMS, CONFIG, OPT_STATE, DATA)


def checkpoint_dir(run_dir) -> epath.Path:
    """Where a run directory keeps its checkpoints."""
    return user_path(run_dir) / "checkpoints"


class Checkpointer:
    """Saves every `checkpoint_every` steps (asynchronously) and restores the latest step.

    Every process must create one, call `restore_latest` once, then call
    `reached_preemption`, `check_saves` and `maybe_save` at every step, and
    `close` at the end. Until then orbax's logs go to `<run_dir>/orbax.log`
    (see train/tracking/library_logs.py).
    """

    def __init__(self, run: RunConfig, shardings):
        self.run = run
        self.shardings = shardings
        self.directory = checkpoint_dir(run.run_dir)
        self.preempted = False
        self.last_saved: int | None = None  # the step last restored or saved (maybe still writing)
        self._saving: int | None = None  # the step of a save not yet waited for
        self._complete: int | None = None  # the newest step known complete (restored, or a save waited for)
        self.logs = LibraryLogs(self.directory.parent / (
            "orbax.log" if jax.process_count() == 1 else f"orbax.process_{jax.process_index()}.log"))
        self._leftovers = sorted(p.name for p in self.directory.glob(f"*{TMP_SUFFIX}*"))
        # A save still writing after checkpoint_timeout fails (tensorstore would retry an
        # unreachable bucket for a quarter of an hour; orbax gives up at the timeout).
        options = ocp.CheckpointManagerOptions(max_to_keep=run.keep_checkpoints, create=True,
                                               enable_async_checkpointing=True,
                                               cleanup_tmp_directories=True,
                                               async_options=ocp.AsyncOptions(timeout_secs=run.checkpoint_timeout))
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._fingerprints = jax.jit(_fingerprints, static_argnames="scheme")
        self._all_finite = jax.jit(_all_finite)
        self._previous_handler = None
        self._sync_preemption = jax.process_count() > 1
        # Hosts notice a failed background save at different steps; only a lone
        # process may stop on it at once (several wait for the next save or close).
        self._poll_saves = jax.process_count() == 1
        if not self._sync_preemption and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self.preempted = True

    def reached_preemption(self, step: int) -> bool:
        """True once a preemption notice arrived: save at `step` and stop (same step on all hosts)."""
        if self._sync_preemption and not self.preempted:
            try:
                self.preempted = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # the preemption service is disabled
                self._sync_preemption = False
        return self.preempted

    def restore_latest(self, state, data):
        """The latest complete checkpoint's state (and data position), or `state` if none.

        Raises CheckpointError (one line) if that checkpoint was written for
        another model, lacks an item, or does not read back bit for bit.
        """
        for name in self._leftovers:
            note(f"removing {self.directory / name}: a save that never finished")
        steps = sorted(self.manager.all_steps())
        if not steps:
            return state
        step = steps[-1]
        step_dir = self.directory / str(step)
        fallback = (f"; step {steps[-2]} is the previous complete checkpoint (move {step_dir} aside "
                    "to resume from it)") if len(steps) > 1 else ""

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
            problem = _root_cause(err)
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
        self.last_saved = self._complete = step
        note(f"resuming from {step_dir}")
        self._note_data_changes(step_dir)
        step_array = jax.make_array_from_callback((), self.shardings.step, lambda _: np.int32(step))
        return state.replace(step=step_array, **arrays)

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

    def has_checkpoint(self) -> bool:
        """Whether the run directory holds a complete step to resume from."""
        return bool(self.manager.all_steps())

    def _base_item(self) -> dict:
        """A LoRA (or vision adapter) run saves only its adapters: item "base" names the weights
        they adapt, so the checkpoint loads whole (llama_jax.formats.weights.load_params) and serves as it is."""
        if self.run.model.lora is None and self.run.model.vision is None:
            return {}
        return {BASE: ocp.args.JsonSave({"path": str(user_path(self.run.init_from))})}

    def due(self, step: int, force: bool = False) -> bool:
        """Whether `maybe_save(step, ..., force)` would save."""
        return step != self.last_saved and (force or step % self.run.checkpoint_every == 0)

    def check_saves(self):
        """Raise CheckpointError as soon as the background save has failed (call every step).

        The last complete checkpoint is then still on disk, untouched. With
        several processes this waits for the next save (or `close`) instead.
        """
        if self._saving is not None and self._poll_saves and not self.manager.is_saving_in_progress():
            self._wait_for_save()

    def _wait_for_save(self):
        step, self._saving = self._saving, None
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            raise self._save_error(step, err) from None
        self._complete = step

    def maybe_save(self, step: int, state, data, force: bool = False):
        """Save at multiples of checkpoint_every (or when forced); returns without waiting.

        Raises CheckpointError if this or the previous save failed; the last
        complete checkpoint is then still on disk, untouched.
        """
        if not self.due(step, force):
            return
        if self._saving is not None:
            self._wait_for_save()
        arrays = {PARAMS: state.params, OPT_STATE: state.opt_state}
        fingerprints, finite = jax.device_get((self._fingerprints(arrays, scheme=SCHEME),
                                               self._all_finite(arrays)))
        if not finite:
            last = ("there is no earlier checkpoint" if self.last_saved is None
                    else f"step {self.last_saved} is the last good checkpoint")
            raise DivergenceError(f"step {step}: the parameters or optimizer state hold NaN or infinite "
                                  f"values, so they were not saved; {last}")
        checksums = {SCHEME_KEY: SCHEME, **{k: int(v) for k, v in fingerprints.items()}}
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
        self.last_saved = self._saving = step

    def close(self):
        """Wait for pending saves, then release the manager, the signal handler and the logs.

        Raises CheckpointError if the last save failed.
        """
        try:
            if self._saving is not None:
                self._wait_for_save()
            self.manager.close()
        finally:
            if self._previous_handler is not None:
                signal.signal(signal.SIGTERM, self._previous_handler)
                self._previous_handler = None
            self.logs.close()

    def _save_error(self, step: int, err: BaseException) -> CheckpointError:
        # From what this process saw, not a listing: the storage that failed the save may
        # not answer one either.
        last = ("no checkpoint is complete" if self._complete is None
                else f"step {self._complete} is the last complete checkpoint")
        return CheckpointError(f"{self.directory}: saving step {step} failed "
                               f"({_failure_reason(err, self.run.checkpoint_timeout)}); "
                               f"{last} (orbax's log: {self.logs.path})")

    def _stored_checksums(self, step_dir: epath.Path) -> dict | None:
        path = step_dir / CHECKSUMS / "metadata"
        if not path.exists():  # written before checksums existed
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path}: unreadable checksums ({_root_cause(err)})") from None


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
        raise CheckpointError(f"{path}: unreadable run config ({_root_cause(err)})") from None
    saved["run_dir"] = str(run_dir)
    return run_config_from_dict(saved, overrides)


def _fingerprints(trees: dict, scheme: str = SCHEME) -> dict:
    """{"item/leaf/path": uint32 fingerprint (`_fingerprint`)} for dicts of array trees."""
    out = {}
    for item, tree in trees.items():
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            keys = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
            out["/".join([item, *map(str, keys)])] = _fingerprint(x, scheme)
    return out


def _all_finite(trees) -> jax.Array:
    """True if no floating-point leaf of `trees` holds a NaN or an infinity."""
    leaves = [x for x in jax.tree.leaves(trees) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 that mixes every bit into every other."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _fingerprint(x: jax.Array, scheme: str = SCHEME) -> jax.Array:
    """A uint32 fingerprint of an array's bits: the wrapping sum over elements of a hash of
    (bits, flat index). Addition modulo 2**32 does not depend on its order, so a sharded
    array gives the same value on any mesh.

    "fmix32" (what saves write): hash = fmix32(bits ^ fmix32(index)). For a fixed index the
    hash is a bijection of the bits, so any change to one element always changes the sum;
    changes to several elements (a swap, a shifted block) go unseen only when their hashes'
    differences cancel, about one chance in 2**32. "linear" (checkpoints from before
    the scheme was recorded): hash = bits * (2 * index + 1). It also always catches a
    change to one element, but misses swaps whose differences cancel exactly: swapping
    elements that differ only in the sign bit, [1.0, -1.0] for [-1.0, 1.0], for one.
    """
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize > 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)  # adds a trailing axis
    else:
        bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
        bits = bits.astype(jnp.uint32)
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    if scheme == "linear":
        return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)
    return jnp.sum(_fmix32(bits ^ _fmix32(index)), dtype=jnp.uint32)


def _failure_reason(err: BaseException, timeout: int) -> str:
    """Why a save failed: the operating system's words when an OS error is behind it
    ("No space left on device"), not finishing within `timeout` seconds, else the
    innermost exception's first line."""
    chain = [err]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    if isinstance(err, TimeoutError):  # orbax's, at checkpoint_timeout
        return (f"not finished within checkpoint_timeout, {timeout} s: the storage stopped answering "
                "or needs a longer timeout")
    for exc in chain:
        if isinstance(exc, OSError) and exc.errno:
            return os.strerror(exc.errno)
        code = re.search(r"os_error_code='(\d+)'", str(exc))  # tensorstore's wording
        if code:
            return os.strerror(int(code.group(1)))
    return _root_cause(err)


def _root_cause(err: BaseException) -> str:
    """The first line of the innermost exception (tensorstore's message, not orbax's wrapper)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return first_line(err)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
