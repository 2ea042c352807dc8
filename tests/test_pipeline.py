"""Pipeline parallelism (llama_jax/model/pipeline.py): stages over the `stage` mesh axis compute
what one device computes, really split the layers, and validate their schedule in one line.

8 emulated CPU devices; a 4-layer LLAMA3_LIKE (tests/tiny.py) so 2 stages with 1 or 2 repeats
and 4 stages all divide the stack.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
from tiny import LLAMA3_LIKE
from train_runs import (assert_trees_equal, cli, exact_metrics, finish, kill_at_step, metrics, random_batch,
                        restore_training_state, run_config, start)

from llama_jax import init_params
from llama_jax.model.pipeline import Schedule
from sharding.comms import parse_collectives
from sharding.layout import LayoutError, load_layout
from sharding.mesh import make_mesh
from sharding.place import Placement, placement_for, validate
from train.step import make_gradients

CONFIG = LLAMA3_LIKE.replace(n_layers=4, remat="full")
ROWS, LENGTH = 16, 16
RTOL = 1e-5


def _layout(stage_ici: int = 1, microbatches: int = 4, repeats: int = 1, **ici):
    """The shipped `pipeline` layout (2 stages over the emulated DCN x fsdp) with more stages
    (stage_ici x 2) or other ICI sizes, and the given schedule."""
    layout = load_layout("pipeline", stage=stage_ici, **ici)
    return dataclasses.replace(layout, pipeline={"microbatches": microbatches, "repeats": repeats})


@functools.cache
def _batch():
    return random_batch(ROWS, LENGTH, CONFIG.vocab_size)


@functools.cache
def _reference():
    """Unnormalised loss sums and gradients on one device."""
    params = init_params(CONFIG, jax.random.key(0))
    one = placement_for(CONFIG)  # the first device alone
    with one.activate():
        grads, sums = jax.jit(make_gradients(CONFIG, one.param_shardings()))(params, _batch())
    return params, jax.device_get(sums), jax.device_get(grads)


def _gradients(layout, grad_accum: int = 1):
    """(loss sums, gradients, compiled program) under `layout`, from the reference parameters."""
    params, _, _ = _reference()
    placement = Placement.create(CONFIG, layout)
    validate(CONFIG, layout, placement.mesh, batch=ROWS // grad_accum)
    shardings = placement.param_shardings()
    sharded = placement.put(params, shardings)
    batch = placement.global_batch(_batch())
    with placement.activate():
        step = jax.jit(make_gradients(CONFIG, shardings, grad_accum))
        compiled = step.lower(sharded, batch).compile()
        grads, sums = step(sharded, batch)
    return jax.device_get(sums), jax.device_get(grads), compiled, placement


CASES = {  # name: (layout, grad_accum)
    "2 stages x fsdp 4": (_layout(), 1),
    "2 stages x data 4, 2 repeats": (_layout(microbatches=2, repeats=2, fsdp=1, data=4), 1),
    "4 stages x fsdp 2, grad_accum 2": (_layout(stage_ici=2, microbatches=4), 2),
}


@pytest.mark.parametrize("name", CASES)
def test_pipeline_matches_one_device_loss_and_gradients(name):
    layout, grad_accum = CASES[name]
    _, want_sums, want_grads = _reference()
    sums, grads, compiled, placement = _gradients(layout, grad_accum)
    for key in ("loss", "weight"):
        assert abs(sums[key] - want_sums[key]) <= RTOL * abs(want_sums[key]), (name, key, sums[key])
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
        err = float(np.abs(got - want).max() / np.abs(want).max())
        assert err <= RTOL, f"{name}: gradient {jax.tree_util.keystr(path)} differs by {err:.2e}"
    # The stages really hold their own layers, and activations move between them.
    stages = placement.mesh.shape["stage"]
    wq = placement.put(_reference()[0], placement.param_shardings())["layers"]["attention"]["wq"]["kernel"]
    assert {s.data.shape[0] for s in wq.addressable_shards} == {CONFIG.n_layers // stages}
    permutes = [c for c in parse_collectives(compiled.as_text(), placement.mesh)
                if c.kind == "collective-permute" and c.axes == ("stage",)]
    assert permutes, f"{name}: no collective-permute over stage in the compiled program"


def test_bubble_is_the_circular_schedules_idle_fraction():
    # 2 stages, 4 micro-batches, 1 repeat: 5 ticks, one of them idle per stage.
    assert Schedule(2, 1, 4).ticks == 5 and Schedule(2, 1, 4).bubble == pytest.approx(1 / 5)
    assert Schedule(4, 2, 4).bubble == pytest.approx(3 / 11)  # (S - 1) / (M R + S - 1)


@pytest.mark.parametrize("layout, batch, message", [
    (_layout(stage_ici=2, repeats=2), 16, r"4 stacked layers do not split into stages 4 x repeats 2 = 8"),
    (_layout(stage_ici=2, microbatches=2), 16, r"pipeline.microbatches 2 is fewer than the 4 stages"),
    (_layout(microbatches=3), 16, r"batch of 16 rows does not split into 3 pipeline micro-batches"),
    (_layout(microbatches=8), 16, r"a pipeline micro-batch of 2 rows does not divide over the batch axes \(4\)"),
])
def test_a_schedule_the_model_cannot_run_is_one_clear_error(layout, batch, message):
    with pytest.raises(LayoutError, match=r"^layout pipeline: " + message):
        validate(CONFIG, layout, make_mesh(layout), batch=batch)


def test_layers_and_stage_on_different_axes_is_an_error():
    layout = _layout()
    rules = tuple((name, None) if name == "layers" else (name, axes) for name, axes in layout.rules)
    with pytest.raises(LayoutError, match=r"layers is split over nothing but stage over stage"):
        Placement.create(CONFIG, dataclasses.replace(layout, rules=rules))


# ---------------------------------------------------------------- checkpoints of a pipelined run

# tiny_cpu: 2 layers on 2 stages, 8 micro-batches of 4 rows over fsdp 4
STEPS = ("steps=12", "log_every=1", "checkpoint_every=4", "layout=pipeline", "data.global_batch=32")


def test_killed_pipelined_run_resumes_bit_exactly_and_restores_without_stages(tmp_path):
    """SIGKILL after the step-4 save, with steps past it logged; the same command resumes from
    step 4 and recomputes those steps bit for bit, then finishes. Its checkpoint holds the layers
    in their one order: restored under fsdp (no stages) the state equals the one restored under
    stages."""
    run_dir, cache = tmp_path / "run", tmp_path / "compilation_cache"  # the resumed run loads the first's programs
    killed = start(cli(run_dir, *STEPS), tmp_path / "killed.log", compilation_cache=cache)
    kill_at_step(run_dir, 5, killed, saved=4)
    before = exact_metrics(metrics(run_dir))
    assert 5 <= before[-1]["step"] < 12, before[-1]
    resumed = start(cli(run_dir, *STEPS), tmp_path / "resumed.log", compilation_cache=cache)
    output = finish(resumed, tmp_path / "resumed.log", 150)
    assert resumed.returncode == 0, output
    assert f"resuming from {run_dir / 'checkpoints' / '4'}" in output
    after = exact_metrics(metrics(run_dir))
    assert [row["step"] for row in after] == list(range(1, 13))
    assert after[:len(before)] == before  # steps 5.. computed again from the checkpoint: the same bits

    run = run_config(run_dir, **dict(item.split("=") for item in STEPS))
    staged, shardings = restore_training_state(run)
    assert shardings.params["layers"]["attention"]["wq"]["kernel"].spec[0] == "stage"
    flat, _ = restore_training_state(dataclasses.replace(run, layout="fsdp"))
    assert int(flat.step) == int(staged.step) == 12
    assert_trees_equal(jax.device_get(flat.params), jax.device_get(staged.params), "params")
    assert_trees_equal(jax.device_get(flat.opt_state), jax.device_get(staged.opt_state), "opt_state")
