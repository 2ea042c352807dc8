"""Weights & Biases logging, an optional extra (`pip install 'llama-jax[wandb]'`).

    metrics:
      wandb: {project: llama-8b, entity: my-team, name: v5p-run-1, mode: online}

Process 0 sends W&B every row it writes to metrics.jsonl, at the same step,
under TensorBoard's names (`train/loss`, `train/mfu`, `eval/loss`, ...), and
the run config as the W&B run's config. The W&B run's id is kept in
`<run_dir>/wandb.json`: a resumed training run resumes its W&B run. The steps a
resumed run recomputes after its checkpoint were already sent by the run that
stopped (the same values, bit for bit: resumption is exact), so they are not
sent again; W&B's history keeps one row per step.

wandb is imported only when a run configures it. Its local files go where W&B
puts them (`$WANDB_DIR`, else `./wandb`); `mode: offline` writes only those
(`wandb sync` uploads them later).
"""

from __future__ import annotations

import json

from llama_jax.cli import first_line
from llama_jax.config import ConfigError
from llama_jax.paths import storage_error, user_path
from train.config import WandbConfig

ID_FILE = "wandb.json"  # in the run directory: {"id": <the W&B run id>}
INSTALL = "pip install 'llama-jax[wandb]'"


def require_wandb():
    """The wandb module; ConfigError (one line) if it is not installed."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(f"metrics.wandb: the wandb package is not installed; {INSTALL} "
                          "(or remove metrics.wandb from the run config)") from None
    return wandb


class WandbRun:
    """The W&B run of a training run directory (create it on process 0 only).

    `logged_through`: the last step the run directory's earlier runs sent (the
    last step of its metrics.jsonl before this run); later calls to `log` for
    steps up to it are dropped.
    """

    def __init__(self, config: WandbConfig, run_dir, run_config: dict, logged_through: int = 0):
        wandb = require_wandb()
        id_path = user_path(run_dir) / ID_FILE
        stored = _stored_id(id_path)
        try:
            self._run = wandb.init(project=config.project, entity=config.entity, name=config.name,
                                   mode=config.mode, id=stored, resume="allow", config=run_config)
        except Exception as err:  # wandb raises its own errors (no API key, no network, ...)
            raise ConfigError(f"metrics.wandb: W&B could not start the run ({first_line(err)}); run `wandb login` "
                              "or set WANDB_API_KEY, or log offline (metrics.wandb.mode=offline)") from None
        if stored is None:
            try:
                id_path.write_text(json.dumps({"id": self._run.id}) + "\n")
            except OSError as err:
                raise storage_error(err, id_path) from None
        self._logged_through = logged_through

    def log(self, step: int, scalars: dict[str, float]):
        """Send one metrics.jsonl row's values under their TensorBoard names (train/tracking/metrics.py
        `scalar_tag`), unless an earlier run sent this step."""
        if step > self._logged_through:
            self._run.log(scalars, step=step)

    def finish(self, failed: bool = False):
        """End the W&B run (marked failed if the training run ends on an error)."""
        self._run.finish(exit_code=1 if failed else 0)


def _stored_id(path) -> str | None:
    """The W&B run id kept in the run directory (None before the first W&B run)."""
    try:
        if not path.exists():
            return None
        return json.loads(path.read_text())["id"]
    except OSError as err:
        raise storage_error(err, path) from None
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{path}: not a W&B run id file; delete it to log to a new W&B run") from None
