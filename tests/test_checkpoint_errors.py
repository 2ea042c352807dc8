"""Bad checkpoints end in one line naming the problem, and never cost the last good checkpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from llama_jax.formats.checkpoint import TMP_SUFFIX
from train_runs import metrics, run_config, steps_on_disk, tree_digest


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A run directory with complete checkpoints at steps 3 and 6."""
    from train.loop import train

    run = run_config(tmp_path_factory.mktemp("good") / "run")
    train(run, progress=False)
    assert steps_on_disk(run.run_dir) == [3, 6]
    return Path(run.run_dir)


@pytest.fixture
def run_dir(good_run, tmp_path):
    """A copy of the good run to damage; on exit, step 3 must be byte for byte as it was."""
    copy = tmp_path / "run"
    shutil.copytree(good_run, copy)
    before = tree_digest(copy / "checkpoints" / "3")
    yield copy
    assert tree_digest(copy / "checkpoints" / "3") == before, "the last good checkpoint changed"


def _largest_array_file(step_dir: Path) -> Path:
    return max((step_dir / "params").rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)


def _cli_error(run_dir, capsys, *overrides) -> str:
    """Run `python -m train` in process on run_dir; its one error line (exit code 2 asserted)."""
    from train.__main__ import main

    capsys.readouterr()
    code = main(["--config", "tiny_cpu", "--quiet", f"run_dir={run_dir}", "steps=8", "log_every=1",
                 "checkpoint_every=3", *overrides])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("train: error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _restored_state(run_dir):
    """The latest checkpoint of run_dir restored as training restores it."""
    import jax

    from sharding.layout import load_layout
    from sharding.place import Placement
    from train.checkpoints import Checkpointer
    from train.data.pipeline import make_dataset
    from train.optimizer import make_optimizer
    from train.step import init_state

    run = run_config(run_dir)
    placement = Placement.create(run.model, load_layout(run.layout))
    state, shardings = init_state(placement, make_optimizer(run.optimizer, run.steps), jax.random.key(0))
    checkpointer = Checkpointer(run, shardings)
    try:
        return checkpointer.restore_latest(state, make_dataset(run.data))
    finally:
        checkpointer.close()


def _restore(run_dir, capsys) -> tuple[int, str]:
    """Restore the latest checkpoint as training does; (restored step, stderr notes)."""
    capsys.readouterr()
    state = _restored_state(run_dir)
    return int(state.step), capsys.readouterr().err


def test_garbage_bytes_in_an_array_file_are_caught(run_dir, capsys):
    target = _largest_array_file(run_dir / "checkpoints" / "6")
    data = bytearray(target.read_bytes())
    data[100:2000] = np.random.default_rng(0).integers(0, 256, 1900, dtype=np.uint8).tobytes()
    target.write_bytes(bytes(data))
    line = _cli_error(run_dir, capsys)
    assert line.startswith(f"train: error: {run_dir / 'checkpoints' / '6'}: ")
    assert "does not match its checksum" in line or "cannot restore" in line
    assert line.endswith(f"step 3 is the previous complete checkpoint (move {run_dir / 'checkpoints' / '6'} "
                         "aside to resume from it)")


def test_truncated_array_file_is_caught(run_dir, capsys):
    target = _largest_array_file(run_dir / "checkpoints" / "6")
    os.truncate(target, target.stat().st_size // 2)
    line = _cli_error(run_dir, capsys)
    assert f"{run_dir / 'checkpoints' / '6'}: cannot restore (OUT_OF_RANGE: " in line
    assert "step 3 is the previous complete checkpoint" in line


def test_half_written_save_is_never_taken_for_a_checkpoint(run_dir, capsys):
    """A save killed halfway (here: of step 9, with its optimizer state unwritten) leaves a
    temporary directory; the run resumes from step 6 and the leftover goes."""
    leftover = run_dir / "checkpoints" / f"9{TMP_SUFFIX}"
    shutil.copytree(run_dir / "checkpoints" / "6", leftover)
    shutil.rmtree(leftover / "opt_state")
    step, notes = _restore(run_dir, capsys)
    assert step == 6
    assert f"train: removing {leftover}: a save that never finished" in notes
    assert f"train: resuming from {run_dir / 'checkpoints' / '6'}" in notes
    assert not leftover.exists()


def test_checkpoint_of_another_model_is_refused(run_dir, capsys):
    before = tree_digest(run_dir / "checkpoints" / "6")
    line = _cli_error(run_dir, capsys, "model_overrides.ffn_dim=96")
    assert line == (f"train: error: {run_dir / 'checkpoints' / '6'}: checkpoint has ffn_dim 128 but the run "
                    "config says 96; use another run_dir")
    assert tree_digest(run_dir / "checkpoints" / "6") == before


@pytest.mark.parametrize("item", ["opt_state", "data"])
def test_checkpoint_missing_an_item_is_refused(run_dir, capsys, item):
    shutil.rmtree(run_dir / "checkpoints" / "6" / item)
    line = _cli_error(run_dir, capsys)
    assert f"{run_dir / 'checkpoints' / '6'}: not a complete training checkpoint (no {item!r} item)" in line


def test_failed_save_is_one_line_before_the_next_save_and_keeps_the_last_good_checkpoint(
        tmp_path, monkeypatch, capfd):
    """The save of step 20 fails as it is committed (disk full); with keep_checkpoints=1,
    step 10 would have been deleted had it succeeded. The run stops with one line (orbax's
    tracebacks, once ~80 lines, go to orbax.log) before the next save, where the failure
    used to surface; step 10 stays, and the same command resumes from it."""
    from orbax.checkpoint._src.path import atomicity

    from train.__main__ import main

    commit = atomicity.AtomicRenameTemporaryPath.finalize

    async def disk_full_at_step_20(self, *args, **kwargs):
        if self.get_final().name == "20":
            raise OSError(28, "No space left on device")
        return await commit(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full_at_step_20)
    run_dir = tmp_path / "run"
    command = ["--config", "tiny_cpu", "--quiet", f"run_dir={run_dir}", "chip=v4", "steps=40", "log_every=1",
               "checkpoint_every=10", "keep_checkpoints=1"]
    capfd.readouterr()
    assert main(command) == 2
    err = capfd.readouterr().err
    assert err == (f"train: error: {run_dir / 'checkpoints'}: saving step 20 failed (No space left on "
                   f"device); step 10 is the last complete checkpoint (orbax's log: {run_dir / 'orbax.log'})\n")
    assert 20 <= metrics(run_dir)[-1]["step"] < 30
    assert steps_on_disk(run_dir) == [10]
    assert "OSError: [Errno 28] No space left on device" in (run_dir / "orbax.log").read_text()

    monkeypatch.undo()
    assert main(command) == 0
    assert f"train: resuming from {run_dir / 'checkpoints' / '10'}" in capfd.readouterr().err
    assert steps_on_disk(run_dir) == [40]


def test_fingerprint_sees_swapped_elements_the_linear_sum_missed():
    """[1, -1, 0.5] and [-1, 1, 0.5] differ by a swap of elements that differ only in the sign bit:
    the old linear sum gave both one value; the mixed hash tells them apart."""
    import jax.numpy as jnp

    from train.checkpoints.fingerprints import fingerprint

    a, b = jnp.array([1.0, -1.0, 0.5]), jnp.array([-1.0, 1.0, 0.5])
    assert int(fingerprint(a, "linear")) == int(fingerprint(b, "linear"))
    assert int(fingerprint(a)) != int(fingerprint(b))


def test_fingerprint_changes_with_every_single_bit_and_not_with_the_layout():
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from train.checkpoints.fingerprints import fingerprint

    x = np.random.default_rng(0).standard_normal((16, 24)).astype(np.float32)
    base = int(fingerprint(jnp.asarray(x)))
    bits = x.view(np.uint32)
    for flat, bit in [(0, 0), (7, 31), (100, 5), (383, 22)]:
        flipped = bits.copy().reshape(-1)
        flipped[flat] ^= np.uint32(1 << bit)
        assert int(fingerprint(jnp.asarray(flipped.view(np.float32).reshape(x.shape)))) != base
    mesh = jax.make_mesh((8,), ("fsdp",))
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, "fsdp")))
    assert int(jax.jit(fingerprint)(sharded)) == base


def test_checkpoint_with_linear_checksums_from_before_the_scheme_still_resumes(run_dir, capsys):
    """A checkpoint written before checksums named their scheme (linear fingerprints, no
    "scheme" key) is verified with the linear sum and resumes."""
    import json

    import jax

    from train.checkpoints.fingerprints import SCHEME_KEY, fingerprints
    from train.checkpoints.persistent import CHECKSUMS, OPT_STATE, PARAMS

    step_dir = run_dir / "checkpoints" / "6"
    meta = step_dir / CHECKSUMS / "metadata"
    stored = json.loads(meta.read_text())
    assert stored.pop(SCHEME_KEY) == "fmix32"
    restored = _restored_state(run_dir)  # verifies the mixed fingerprints
    assert int(restored.step) == 6
    linear = jax.device_get(fingerprints({PARAMS: restored.params, OPT_STATE: restored.opt_state}, "linear"))
    assert set(linear) == set(stored) and any(int(linear[k]) != stored[k] for k in stored)
    meta.write_text(json.dumps({k: int(v) for k, v in linear.items()}))
    step, _ = _restore(run_dir, capsys)
    assert step == 6
    meta.write_text(json.dumps({k: int(v) ^ 1 for k, v in linear.items()}))  # and it still checks
    line = _cli_error(run_dir, capsys)
    assert "does not match its checksum" in line
