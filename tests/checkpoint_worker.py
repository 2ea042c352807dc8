"""One of two processes (4 CPU devices each) training, saving and restoring one sharded checkpoint.

python tests/checkpoint_worker.py PROCESS_ID PORT WORK_DIR

Run by tests/test_checkpoint_multiprocess.py. Process 0 writes WORK_DIR/result.json.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from jax.experimental import multihost_utils  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_runs import EXACT_METRICS, assert_trees_equal, metrics, run_config  # noqa: E402


def gathered(tree):
    """Every leaf whole on this host (the arrays span both processes' devices)."""
    return jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), tree)


def main(process_id: int, port: int, work_dir: Path):
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=60)
    assert jax.device_count() == 8 and jax.local_device_count() == 4

    from llama_jax.formats.checkpoint import restore_params, save_params
    from sharding.layout import load_layout
    from sharding.place import Placement
    from train.loop import train

    # Train 6 steps under fsdp over both processes: checkpoints at 2, 4 and 6.
    run = run_config(work_dir / "run", layout="fsdp", checkpoint_every=2)
    summary = train(run, progress=False)
    trained = gathered(summary["state"].params)
    checkpoints = work_dir / "run" / "checkpoints"

    # Restore the params under fsdp_tp over all 8 devices, and under tp on each process's own 4.
    for layout, devices in (("fsdp_tp", jax.devices()), ("tp", jax.local_devices())):
        placement = Placement.create(run.model, load_layout(layout), devices=devices)
        _, params = restore_params(checkpoints, shardings=placement.param_shardings())
        assert_trees_equal(gathered(params) if len(devices) == 8 else jax.device_get(params), trained,
                           f"params under {layout} on {len(devices)} devices")

    # save_params from a sharded tree, restore_params back under another layout.
    save_params(work_dir / "params_only", run.model, summary["state"].params, step=6)
    placement = Placement.create(run.model, load_layout("dp"))
    _, params = restore_params(work_dir / "params_only", shardings=placement.param_shardings())
    assert_trees_equal(gathered(params), trained, "save_params -> restore_params")

    # Resume from step 2 (each process restores its own data position): steps 3..6 again.
    multihost_utils.sync_global_devices("before deleting")
    if process_id == 0:
        for step in (4, 6):
            shutil.rmtree(checkpoints / str(step))
    multihost_utils.sync_global_devices("deleted")
    first = {row["step"]: {k: row[k] for k in EXACT_METRICS} for row in metrics(run.run_dir)}
    summary = train(run, progress=False)
    assert summary["step"] == 6
    assert_trees_equal(gathered(summary["state"].params), trained, "params after resuming")
    if process_id == 0:
        # Rows 3..6 were logged again: the file holds each step once, as recomputed.
        rows = metrics(run.run_dir)
        assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6], rows
        for row in rows:
            assert {k: row[k] for k in EXACT_METRICS} == first[row["step"]], f"step {row['step']}"
        resumed = [row["step"] for row in rows if row["step"] > 2]
        (work_dir / "result.json").write_text(json.dumps({"resumed_steps": resumed}))
    multihost_utils.sync_global_devices("done")
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
