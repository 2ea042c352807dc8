"""Resuming training: after SIGKILL and SIGTERM, onto other layouts, and params-only for inference."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import sys

import jax
import pytest

from llama_jax.formats.checkpoint import latest_step, read_config, restore_params
from sharding.layout import load_layout
from sharding.place import Placement
from train_runs import (assert_trees_equal, cli, exact_metrics, finish, kill_at_step, metrics, restore_training_state,
                        run_config, start, steps_on_disk, wait_for_step)

TIMEOUT = 150  # seconds for one tiny run of `python -m train` on a busy 2-core machine


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """Shared by the subprocess runs below: same config and devices, so one compile serves all."""
    return tmp_path_factory.mktemp("compilation_cache")


def test_killed_run_resumes_with_the_same_losses_step_for_step(tmp_path, compilation_cache):
    """SIGKILL between saves; the same command again recomputes from the last checkpoint
    and every step's metrics equal an uninterrupted run's, bit for bit (data order included)."""
    steps = ("steps=30", "log_every=1", "checkpoint_every=5")
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    cache = compilation_cache
    reference = start(cli(reference_dir, *steps), tmp_path / "reference.log", compilation_cache=cache)
    wait_for_step(reference_dir, 1, reference)  # compiled: the other runs load its executables
    killed = start(cli(killed_dir, *steps), tmp_path / "killed.log", compilation_cache=cache)
    kill_at_step(killed_dir, 7, killed, saved=5)
    killed_at = metrics(killed_dir)[-1]["step"]
    saved = steps_on_disk(killed_dir)
    assert killed_at < 30 and saved and saved[-1] < 30, (killed_at, saved)
    resume_from = latest_step(killed_dir / "checkpoints")

    resumed = start(cli(killed_dir, *steps), tmp_path / "resumed.log", compilation_cache=cache)
    output = finish(resumed, tmp_path / "resumed.log", TIMEOUT)
    assert resumed.returncode == 0, output
    assert f"resuming from {killed_dir / 'checkpoints' / str(resume_from)}" in output
    reference_output = finish(reference, tmp_path / "reference.log", TIMEOUT)
    assert reference.returncode == 0, reference_output

    expected = exact_metrics(metrics(reference_dir))
    assert [row["step"] for row in expected] == list(range(1, 31))
    # The rows the killed run logged past its last checkpoint (usually some: it was killed
    # at step 7 or later, step 5 saved) were dropped when those steps were recomputed: the
    # file reads as one run's, where it used to hold them twice.
    assert exact_metrics(metrics(killed_dir)) == expected


def test_sigterm_saves_the_current_step_and_exits_zero(tmp_path, compilation_cache):
    run_dir = tmp_path / "run"
    process = start(cli(run_dir, "steps=30", "log_every=1", "checkpoint_every=100"), tmp_path / "log",
                    compilation_cache=compilation_cache)
    try:
        seen = wait_for_step(run_dir, 4, process)
        process.send_signal(signal.SIGTERM)
    finally:
        output = finish(process, tmp_path / "log", TIMEOUT)
    assert process.returncode == 0, output
    last = metrics(run_dir)[-1]["step"]
    assert seen <= last < 30
    assert f"preempted: saved step {last}; run the same command to resume" in output
    assert latest_step(run_dir / "checkpoints") == last
    assert steps_on_disk(run_dir) == [last]

    # Nothing else to type: the run directory alone continues the run to its 30 steps.
    process = start([sys.executable, "-m", "train", "--config", str(run_dir), "--quiet"], tmp_path / "log2",
                    compilation_cache=compilation_cache)
    output = finish(process, tmp_path / "log2", TIMEOUT)
    assert process.returncode == 0, output
    assert f"resuming from {run_dir / 'checkpoints' / str(last)}" in output
    assert [row["step"] for row in metrics(run_dir)] == list(range(1, 31))
    assert steps_on_disk(run_dir) == [last, 30]


# ---------------------------------------------------------------- in-process: layouts and params-only

@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """Six steps under fsdp on 8 devices (checkpoints at 3 and 6): (run config, final state)."""
    from train.loop import train

    run = run_config(tmp_path_factory.mktemp("fsdp") / "run", layout="fsdp")
    summary = train(run, progress=False)
    assert summary["step"] == 6
    return run, jax.device_get(summary["state"])


@pytest.mark.parametrize("devices", [4, 1])
def test_fsdp_checkpoint_restores_under_tp_on_fewer_devices(fsdp_run, devices):
    run, trained = fsdp_run
    run = dataclasses.replace(run, layout="tp")
    restored, shardings = restore_training_state(run, jax.devices()[:devices])
    assert int(restored.step) == 6
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    assert_trees_equal(restored.params, trained.params, "params")
    assert_trees_equal(restored.opt_state, trained.opt_state, "opt_state")


def test_training_checkpoint_restores_params_only_for_inference(fsdp_run):
    run, trained = fsdp_run
    directory = run.run_dir + "/checkpoints"
    assert read_config(directory) == run.model
    config, params = restore_params(directory)
    assert config == run.model
    assert_trees_equal(params, trained.params, "params")
    placement = Placement.create(run.model, load_layout("tp"), devices=jax.devices()[:4])
    _, params = restore_params(directory, shardings=placement.param_shardings())
    assert_trees_equal(params, trained.params, "params under tp")
    _, params = restore_params(directory, step=3, config=run.model.replace(scan_layers=False))
    assert set(params) == {"embed", "layers_0", "layers_1", "norm", "output"}


def test_run_directory_holds_its_run_config(fsdp_run, tmp_path):
    from train.checkpoints import resume_config

    run, _ = fsdp_run
    assert resume_config(run.run_dir) == run
    moved = tmp_path / "moved"
    shutil.copytree(run.run_dir, moved)
    assert resume_config(moved, ["steps=9"]) == dataclasses.replace(run, run_dir=str(moved), steps=9)
    faster = resume_config(moved, ["optimizer.learning_rate=0.5"]).optimizer  # one field of a section
    assert faster == dataclasses.replace(run.optimizer, learning_rate=0.5)


def test_resuming_with_other_data_settings_says_so(tmp_path, capsys):
    from train.config import load_run_config
    from train.loop import train

    base = [f"run_dir={tmp_path}", "steps=4", "checkpoint_every=2", "log_every=2"]
    train(load_run_config("tiny_cpu", base), progress=False, stop_after=2)
    capsys.readouterr()
    train(load_run_config("tiny_cpu", [*base, "data.seed=7"]), progress=False)
    err = capsys.readouterr().err
    assert "resuming from" in err
    assert "warning: data settings differ from the checkpoint's (seed 0 -> 7)" in err
    train(load_run_config("tiny_cpu", [*base[:1], "steps=6", *base[2:], "data.seed=7"]), progress=False)
    err = capsys.readouterr().err
    assert "resuming from" in err and "warning" not in err


def test_metrics_of_steps_after_the_restored_one_are_dropped(tmp_path):
    """A kill can leave rows past the last checkpoint, the last one cut short."""
    from train.tracking.metrics import MetricsWriter

    rows = [json.dumps({"step": step, "loss": 1.0 / step}) for step in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 6, "lo')
    writer = MetricsWriter(tmp_path, start=3)
    writer.write(4, {"loss": 0.5})
    writer.close()
    assert [(row["step"], row["loss"]) for row in metrics(tmp_path)] == [
        (1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.5)]
