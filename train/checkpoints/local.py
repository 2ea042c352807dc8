"""The local tier: frequent saves to each host's own disk (or RAM disk), through orbax's P2P manager.

`orbax.checkpoint.experimental.emergency.p2p.CheckpointManager` (orbax 0.12.8):
- every process writes the shards it holds to its own directory, and the data
  iterator positions of all processes (gathered) beside them:
      <dir>/<step>/state/ocdbt.process_<i>/...   params and opt_state
      <dir>/<step>/data_iter/pygrain_states.json
- at restore, the processes exchange what they hold (a collective) and agree on
  the newest step of which every shard is on some host;
- a process whose own copy is missing fetches it over TCP from a peer holding
  the same shards: a replica along the mesh's `data` axis (e.g. `data` across
  hosts, `fsdp` within). A layout without such replicas has no second copy of a
  host's shards: a step a host lost is not complete, and the checkpointer
  restores from the persistent tier instead.

The data position goes through grain's own orbax arguments (the P2P manager takes no
others): a local step is only ever restored by the same processes that saved it, and
the state grain writes is whatever `get_state` gives (a global position where the
source has one, train/data/position.py).

The directory also holds RUN_DIR, the run directory it belongs to, so that two
runs given one `local_checkpoints.dir` never restore each other's state.
"""

from __future__ import annotations

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.experimental.emergency.p2p import args as p2p_args
from orbax.checkpoint.experimental.emergency.p2p import checkpoint_manager as p2p
from orbax.checkpoint.experimental.emergency.p2p import options as p2p_options

from llama_jax.config import ConfigError
from llama_jax.formats.checkpoint import PARAMS, CheckpointError
from llama_jax.paths import user_path
from sharding.place import abstract_arrays
from train.checkpoints.failures import failure_reason, root_cause
from train.checkpoints.tier import AsyncSaves
from train.config import RunConfig

OPT_STATE = "opt_state"
OWNER = "RUN_DIR"  # the file naming the run directory a local directory belongs to


def claim_local_dir(run: RunConfig) -> epath.Path:
    """This process's local directory, created and marked as `run.run_dir`'s (ConfigError, one
    line, if it is another run's or cannot be written). It is `local_checkpoints.dir` with
    `{process}` replaced by the process index (for several processes on one machine, as in
    tests; on a pod each host has its own disk)."""
    directory = epath.Path(run.local_checkpoints.dir.replace("{process}", str(jax.process_index())))
    run_dir = str(user_path(run.run_dir))
    where = f"local_checkpoints.dir {directory}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        owner = directory / OWNER
        if owner.exists() and owner.read_text() != run_dir:
            raise ConfigError(f"{where}: holds the local checkpoints of run_dir {owner.read_text()}; "
                              "give each run its own directory")
        owner.write_text(run_dir)
    except OSError as err:
        raise ConfigError(f"{where}: cannot write there ({err.strerror or err})") from None
    return directory


class LocalTier(AsyncSaves):
    """Saves every `local_checkpoints.every` steps to this host's directory; restores the newest
    step complete across hosts (a missing copy fetched from a peer). Every process must make
    one and call its methods at the same steps (they exchange data)."""

    def __init__(self, run: RunConfig, directory: epath.Path, shardings, mesh, log_path):
        self.run = run
        self.shardings = shardings
        self.every = run.local_checkpoints.every
        self.directory = directory  # claim_local_dir's
        self.log_path = log_path
        self.saving: int | None = None
        self.problem: str | None = None  # why this process's last restore failed
        options = p2p_options.CheckpointManagerOptions(
            local=p2p_options.LocalCheckpointOptions(save_interval_steps=self.every,
                                                     max_to_keep=run.local_checkpoints.keep),
            replica_axis_index=mesh.axis_names.index("data"))
        self.manager = p2p.CheckpointManager(mesh, None, self.directory, None, options=options)

    def due(self, step: int) -> bool:
        """Whether `step` is one this tier saves."""
        return step % self.every == 0

    def latest_step(self) -> int | None:
        """The newest step whose every shard is on some host (the same on every process)."""
        return self.manager.latest_step()

    def restore(self, step: int, state, data) -> dict | None:
        """{"params": ..., "opt_state": ...} of `step` placed as `state`'s, and `data` at its
        position; None on every process if any process could not read or fetch its shards."""
        abstract = abstract_arrays(state, self.shardings)
        arrays = None
        try:
            restored = self.manager.restore(step, args=p2p_args.Composite(
                state=ocp.args.PyTreeRestore({PARAMS: abstract.params, OPT_STATE: abstract.opt_state}),
                data_iter=grain.checkpoint.CheckpointRestore(data)))
            arrays = dict(restored.state)
        except Exception as err:  # a peer gone, a torn file: the persistent tier still has the run
            self.problem = root_cause(err)
        failed = multihost_utils.process_allgather(np.int32(arrays is None))
        return None if np.any(failed) else arrays

    def drop_after(self, step: int | None):
        """Delete this host's local steps after `step` (all with None): the run goes on from `step`,
        and orbax never saves over an existing step."""
        for path in self.directory.iterdir():
            if path.name.isdigit() and (step is None or int(path.name) > step):
                path.rmtree()
        self.manager.reload()

    def save(self, step: int, state, data):
        """Start saving at `step` (after the previous local save finished); CheckpointError if one failed."""
        if self.saving is not None:
            self.wait()
        try:
            self.manager.save(step, args=p2p_args.Composite(
                state=ocp.args.PyTreeSave({PARAMS: state.params, OPT_STATE: state.opt_state}),
                data_iter=grain.checkpoint.CheckpointSave(data)), force=True)
        except Exception as err:
            raise self._save_error(step, err) from None
        self.saving = step

    def _save_error(self, step: int, err: BaseException) -> CheckpointError:
        return CheckpointError(f"{self.directory}: saving step {step} to the local tier failed "
                               f"({failure_reason(err, self.run.checkpoint_timeout)}); "
                               f"orbax's log: {self.log_path}")
