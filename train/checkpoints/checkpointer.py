"""When training saves, and which tier it resumes from: exact resume, preemption, two tiers.

Two tiers (docs/tpu.md, "Multi-tier checkpoints"):
- persistent (persistent.py): `<run_dir>/checkpoints`, every `checkpoint_every`
  steps, at the last step and at a preemption; what inference reads.
- local (local.py, with `local_checkpoints` set): each host's own disk, every
  `local_checkpoints.every` steps; lost with the host, but fast to write and read.
A resume takes the newest complete step of either tier (the local one when both
have it); if the local tier cannot give it back, the persistent tier's newest.

Both tiers hold the parameters, the optimizer state (the step count rides in
it, and the step's random keys derive from it) and every process's data position.
A state holding NaN or infinite values is saved to neither (DivergenceError), so
`keep_checkpoints` never deletes the last finite checkpoint for it. The failure
of a background save is a one-line CheckpointError at the next step (with one
process; with several, at the next save), orbax's tracebacks in a log file.

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

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from llama_jax.formats.checkpoint import PARAMS
from train.checkpoints.fingerprints import SCHEME, SCHEME_KEY, all_finite, fingerprints
from train.checkpoints.local import LocalTier, claim_local_dir
from train.checkpoints.persistent import OPT_STATE, PersistentTier, checkpoint_dir
from train.config import RunConfig
from train.tracking.library_logs import LibraryLogs
from train.tracking.metrics import note
from train.nonfinite import DivergenceError


class Checkpointer:
    """Saves to the persistent tier (and the local one, if configured) and restores the newest step.

    Every process must create one, call `restore_latest` once, then call
    `reached_preemption`, `check_saves` and `maybe_save` at every step, and
    `close` at the end. Until then orbax's logs go to `<run_dir>/orbax.log`
    (see train/tracking/library_logs.py).
    """

    def __init__(self, run: RunConfig, shardings):
        self.run = run
        self.shardings = shardings
        self.preempted = False
        self.last_saved: int | None = None  # the step last restored or saved (maybe still writing)
        self._where: dict[int, str] = {}  # step -> where it was restored from or saved to
        # another run's local directory stops this one before anything is written
        local_dir = None if run.local_checkpoints is None else claim_local_dir(run)
        self.logs = LibraryLogs(self._log_path())
        self.persistent = PersistentTier(run, shardings, self.logs.path)
        self.directory = self.persistent.directory
        self.local = None
        if local_dir is not None:
            self.local = LocalTier(run, local_dir, shardings, shardings.step.mesh, self.logs.path)
        self._fingerprints = jax.jit(fingerprints, static_argnames="scheme")
        self._all_finite = jax.jit(all_finite)
        self._previous_handler = None
        self._sync_preemption = jax.process_count() > 1
        # Hosts notice a failed background save at different steps; only a lone
        # process may stop on it at once (several wait for the next save or close).
        self._poll_saves = jax.process_count() == 1
        self._local_latest: int | None = None
        if self.local is not None:  # asked once, now, on every process (the hosts exchange their steps)
            self._local_latest = self.local.latest_step()
        if not self._sync_preemption and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _log_path(self):
        name = "orbax.log" if jax.process_count() == 1 else f"orbax.process_{jax.process_index()}.log"
        return checkpoint_dir(self.run.run_dir).parent / name

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

    def has_checkpoint(self) -> bool:
        """Whether either tier holds a complete step to resume from."""
        return self._local_latest is not None or bool(self.persistent.steps())

    def restore_latest(self, state, data):
        """The newest complete checkpoint's state (and data position), or `state` if none.

        The local tier's step when it is at least as new as the persistent one's
        and every host can read or fetch its shards; else the persistent tier's.
        Raises CheckpointError (one line) if that checkpoint was written for
        another model, lacks an item, or does not read back bit for bit.
        """
        self.persistent.report_leftovers()
        steps = self.persistent.steps()
        persistent = self.persistent.complete = steps[-1] if steps else None
        arrays, step = None, self._local_latest
        if step is not None and (persistent is None or step >= persistent):
            arrays = self.local.restore(step, state, data)
            if arrays is None:
                note(f"local tier: step {step} could not be restored ("
                     f"{self.local.problem or 'on another process'}); using {self.directory}")
            else:
                self._where[step] = f"{self.local.directory / str(step)} (local tier)"
        if self.local is not None:  # a step newer than the one resumed would block its save
            self.local.drop_after(step if arrays is not None else persistent)
        if arrays is None:
            if persistent is None:
                return state
            step = persistent
            arrays = self.persistent.restore(step, state, data)
            self._where[step] = str(self.directory / str(step))
        self.last_saved = step
        note(f"resuming from {self._where[step]}")
        step_array = jax.make_array_from_callback((), self.shardings.step, lambda _: np.int32(step))
        return state.replace(step=step_array, **arrays)

    def location(self, step: int) -> str:
        """Where step `step` was saved to or restored from (for messages)."""
        return self._where.get(step, str(self.directory / str(step)))

    def due(self, step: int, force: bool = False) -> bool:
        """Whether `maybe_save(step, ..., force)` would save (to either tier)."""
        return step != self.last_saved and (self._persistent_due(step, force)
                                            or (self.local is not None and self.local.due(step)))

    def _persistent_due(self, step: int, force: bool) -> bool:
        return force or step % self.run.checkpoint_every == 0

    def check_saves(self):
        """Raise CheckpointError as soon as the background save has failed (call every step).

        The last complete checkpoint is then still on disk, untouched. With
        several processes this waits for the next save (or `close`) instead.
        """
        if self._poll_saves:
            self.persistent.poll()

    def maybe_save(self, step: int, state, data, force: bool = False):
        """Save at multiples of checkpoint_every (or when forced), and of local_checkpoints.every
        to the local tier; returns without waiting.

        Raises CheckpointError if this or the previous save failed; the last
        complete checkpoint is then still on disk, untouched.
        """
        if not self.due(step, force):
            return
        arrays = {PARAMS: state.params, OPT_STATE: state.opt_state}
        fingerprints_, finite = jax.device_get((self._fingerprints(arrays, scheme=SCHEME),
                                                self._all_finite(arrays)))
        if not finite:
            last = ("there is no earlier checkpoint" if self.last_saved is None
                    else f"step {self.last_saved} is the last good checkpoint")
            raise DivergenceError(f"step {step}: the parameters or optimizer state hold NaN or infinite "
                                  f"values, so they were not saved; {last}")
        if self.local is not None and self.local.due(step):
            self.local.save(step, state, data)
            self._where[step] = f"{self.local.directory / str(step)} (local tier)"
        if self._persistent_due(step, force):
            if self.local is not None and self.local.saving is not None:
                self.local.wait()  # quick (local storage); keeps the two tiers' saves from starting together
            checksums = {SCHEME_KEY: SCHEME, **{k: int(v) for k, v in fingerprints_.items()}}
            self.persistent.save(step, state, data, checksums)
            self._where[step] = str(self.directory / str(step))
        self.last_saved = step

    def close(self):
        """Wait for pending saves, then release the managers, the signal handler and the logs.

        Raises CheckpointError if the last save failed.
        """
        try:
            try:
                self.persistent.close()
            finally:
                if self.local is not None:
                    self.local.close()
        finally:
            if self._previous_handler is not None:
                signal.signal(signal.SIGTERM, self._previous_handler)
                self._previous_handler = None
            self.logs.close()
