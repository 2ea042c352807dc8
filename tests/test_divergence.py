"""A diverging run stops (or skips the step) and never saves a non-finite state."""

from __future__ import annotations

import math
import re

import jax
import numpy as np
import pytest

from llama_jax.formats.checkpoint import restore_params
from sharding.place import Placement
from train_runs import metrics, random_batch, run_config, steps_on_disk


def _all_finite(tree) -> bool:
    return all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(tree))


def _main(run_dir, capsys, *overrides) -> tuple[int, list[str]]:
    """`python -m train` in process on the tiny run: (exit code, its `train: error:` lines)."""
    from train.__main__ import main

    capsys.readouterr()
    code = main(["--config", "tiny_cpu", "--quiet", f"run_dir={run_dir}", "chip=v4", "log_every=1",
                 *overrides])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if line.startswith("train: error: ")]


def test_diverging_run_stops_in_one_line_and_keeps_only_finite_checkpoints(tmp_path, capsys):
    """A good run saves steps 3 and 6; resumed with a learning rate of 1e9 and a save at
    every step (keeping 3), it blew up: it used to exit 0 with NaN losses, and its NaN
    checkpoints pushed the finite ones out."""
    run_dir = tmp_path / "run"
    assert _main(run_dir, capsys, "steps=6", "checkpoint_every=3")[0] == 0
    code, errors = _main(run_dir, capsys, "steps=20", "checkpoint_every=1", "keep_checkpoints=3",
                         "optimizer.learning_rate=1e9")
    assert code == 1 and len(errors) == 1, errors
    found = re.fullmatch(
        r"train: error: step (\d+): the (loss|grad norm|update norm)((, | and )(grad norm|update norm))* "
        r"(is|are) not finite, so training "
        r"stopped without applying that update or saving; the last good checkpoint is step (\d+) \((.+)\); "
        r"lower optimizer\.learning_rate \(now 1e\+09\) or check the data, or set on_nonfinite=skip to "
        r"skip such steps", errors[0])
    assert found, errors[0]
    bad, last_good = int(found.group(1)), int(found.group(7))
    assert found.group(8) == str(run_dir / "checkpoints" / str(last_good))
    on_disk = steps_on_disk(run_dir)
    assert 6 < bad < 20 and on_disk[-1] == last_good == bad - 1, (bad, on_disk)
    for step in on_disk:
        assert _all_finite(restore_params(run_dir / "checkpoints", step=step)[1]), f"step {step}"
    rows = metrics(run_dir)
    assert rows[-1]["step"] == bad - 1 and all(math.isfinite(row["loss"]) for row in rows)


def test_skip_mode_skips_nonfinite_steps_and_trains_on(tmp_path, monkeypatch):
    """Batches 2 and 3 carry NaN loss weights: those two updates are skipped and counted,
    the logged loss averages the applied steps, and parameters stay finite."""
    from train.loop import train

    global_batch = Placement.global_batch
    calls = []

    def nan_weights_in_batches_2_and_3(self, local):
        calls.append(1)
        if len(calls) in (2, 3):
            local = {**local, "loss_weights": np.full_like(local["loss_weights"], np.nan)}
        return global_batch(self, local)

    monkeypatch.setattr(Placement, "global_batch", nan_weights_in_batches_2_and_3)
    run = run_config(tmp_path / "run", on_nonfinite="skip", log_every=3)
    summary = train(run, progress=False)
    assert summary["step"] == 6
    rows = metrics(run.run_dir)
    assert [(row["step"], row["skipped_steps"]) for row in rows] == [(3, 2), (6, 2)]
    assert all(math.isfinite(row["loss"]) for row in rows)
    assert _all_finite(summary["state"].params) and _all_finite(summary["state"].opt_state)
    assert steps_on_disk(run.run_dir) == [3, 6]


def test_stop_mode_names_the_first_nonfinite_step_and_saves_nothing(tmp_path, monkeypatch):
    from train.loop import train
    from train.nonfinite import DivergenceError

    global_batch = Placement.global_batch
    calls = []

    def nan_weights_from_batch_2(self, local):
        calls.append(1)
        if len(calls) >= 2:
            local = {**local, "loss_weights": np.full_like(local["loss_weights"], np.nan)}
        return global_batch(self, local)

    monkeypatch.setattr(Placement, "global_batch", nan_weights_from_batch_2)
    run = run_config(tmp_path / "run", log_every=5)  # checked first before the save at step 3
    with pytest.raises(DivergenceError) as caught:
        train(run, progress=False)
    assert str(caught.value).startswith("step 2: the loss, grad norm and update norm are not finite, "
                                        "so training stopped without applying that update or saving; "
                                        "no checkpoint was saved; ")
    assert steps_on_disk(run.run_dir) == [] and metrics(run.run_dir) == []


def test_a_nonfinite_step_leaves_parameters_and_optimizer_state_as_they_were():
    from sharding.layout import load_layout
    from tiny import LLAMA3_LIKE
    from train.config import OptimizerConfig
    from train.optimizer import learning_rate_schedule, make_optimizer
    from train.step import init_state, jit_train_step, make_train_step

    placement = Placement.create(LLAMA3_LIKE, load_layout("fsdp"))
    config = OptimizerConfig(warmup_steps=0)
    optimizer = make_optimizer(config, 10)
    state, shardings = init_state(placement, optimizer, jax.random.key(0))
    before = jax.device_get(state)
    step = jit_train_step(make_train_step(LLAMA3_LIKE, optimizer, learning_rate_schedule(config, 10),
                                          shardings.params), placement, shardings)
    batch = random_batch(8, 16, LLAMA3_LIKE.vocab_size)
    batch["loss_weights"][3, 5] = np.nan
    with placement.activate():
        state, result = step(state, placement.global_batch(batch))
    assert int(result["nonfinite"]) == 1 | 2 | 4  # loss, grad norm and update norm
    assert int(state.step) == 1
    for got, want in zip(jax.tree.leaves(jax.device_get((state.params, state.opt_state))),
                         jax.tree.leaves((before.params, before.opt_state))):
        np.testing.assert_array_equal(got, want)


def test_checkpointer_refuses_to_save_a_nonfinite_state(tmp_path):
    from sharding.layout import load_layout
    from train.checkpoints import Checkpointer
    from train.data.pipeline import make_dataset
    from train.nonfinite import DivergenceError
    from train.optimizer import make_optimizer
    from train.step import init_state

    run = run_config(tmp_path / "run")
    placement = Placement.create(run.model, load_layout(run.layout))
    state, shardings = init_state(placement, make_optimizer(run.optimizer, run.steps), jax.random.key(0))
    norm = state.params["norm"]["scale"]
    state = state.replace(params={**state.params, "norm": {"scale": norm.at[0].set(np.inf)}})
    checkpointer = Checkpointer(run, shardings)
    try:
        with pytest.raises(DivergenceError, match=r"^step 3: the parameters or optimizer state hold NaN or "
                                                  r"infinite values, so they were not saved; there is no "
                                                  r"earlier checkpoint$"):
            checkpointer.maybe_save(3, state, make_dataset(run.data))
    finally:
        checkpointer.close()
    assert steps_on_disk(run.run_dir) == []
