"""One train step (train/program.py): train.compile plans for the program train.loop runs."""

from sharding.layout import load_layout
from sharding.place import Placement
from train import loop
from train.compile.aot import train_program
from train.config import load_run_config


def test_the_loop_runs_the_step_train_compile_lowers(tmp_path, monkeypatch):
    """The jitted step `train.loop.train` runs, lowered on the state it made and a batch of
    its own data, is the program `train_program` lowers from abstract inputs, text for text:
    the same objective, optimizer, accumulation, shardings, donation and batch layout."""
    run = load_run_config("tiny_cpu", [f"run_dir={tmp_path}", "grad_accum=2", "z_loss=1e-4", "steps=4"])
    lowered = {}

    def lower_instead_of_stepping(run, state, data, placement, step_fn, *args, **kwargs):
        lowered["loop"] = step_fn.lower(state, placement.global_batch(next(data))).as_text()
        return state, int(state.step), {}

    monkeypatch.setattr(loop, "_run_steps", lower_instead_of_stepping)
    loop.train(run, progress=False)
    placement = Placement.create(run.model, load_layout(run.layout, **run.mesh))
    step, (state, batch) = train_program(run, placement)
    with placement.activate():  # as the loop's steps run, and train.compile compiles
        compiled_text = step.lower(state, batch).as_text()
    assert "loop" in lowered, "train.loop.train never reached its steps"
    assert lowered["loop"] == compiled_text
