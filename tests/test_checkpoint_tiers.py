"""Two checkpoint tiers (train/checkpoints/): each host's local directory, and the run directory.

Two processes (4 CPU devices each, gloo on 127.0.0.1; tests/preemption_worker.py)
train with `data` across the hosts and `fsdp` within, so each host holds a
whole replica. Both are SIGKILLed after a local save newer than the last
persistent one, and one host's local directory is deleted: the rerun resumes
from the local step (the host that lost its copy fetches the shards from its
peer, orbax's P2P manager) and its metrics equal an uninterrupted run's bit
for bit. Without a peer (one process) a lost local tier means the persistent step.
"""

from __future__ import annotations

import shutil
import signal
import time

import pytest

from llama_jax.config import ConfigError
from llama_jax.formats.checkpoint import all_steps
from train_runs import exact_metrics, finish, metrics, run_config, start_pair

TIMEOUT = 480  # seconds for a pair of workers (compiling beside the reference pair) on a busy 2-core machine
STEPS = 10


def _argv(run_dir, local_dir) -> list[str]:
    return ["--config", "tiny_cpu", "--quiet", f"run_dir={run_dir}", "chip=v4", "layout=fsdp", "mesh.data=2",
            f"steps={STEPS}", "log_every=1", "checkpoint_every=4",
            f"local_checkpoints.dir={local_dir}/process_{{process}}", "local_checkpoints.every=1"]


def _local_steps(directory) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def test_killed_run_resumes_from_a_local_step_newer_than_persistent_with_one_host_tier_lost(tmp_path):
    cache = tmp_path / "cache"
    reference_logs = [tmp_path / f"reference{i}.log" for i in range(2)]
    reference = start_pair(_argv(tmp_path / "reference", tmp_path / "reference_local"), reference_logs, cache)
    run_dir, local = tmp_path / "run", tmp_path / "local"
    hosts = [local / "process_0", local / "process_1"]
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    workers = start_pair(_argv(run_dir, local), logs, cache)
    try:  # kill both once each host has committed local step 5 (persistent: step 4)
        deadline = time.monotonic() + TIMEOUT
        while min(max(_local_steps(h), default=0) for h in hosts) < 5:
            assert time.monotonic() < deadline and all(w.poll() is None for w in workers), \
                "\n".join(log.read_text()[-2000:] for log in logs)
            time.sleep(0.02)
    except BaseException:
        for worker in reference:
            worker.kill()
        raise
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGKILL)
        finish(workers, logs, TIMEOUT)
    persistent = all_steps(run_dir / "checkpoints")
    local_step = max(_local_steps(hosts[0]))
    assert persistent and local_step > persistent[-1], (persistent, local_step)
    shutil.rmtree(hosts[1])  # host 1 lost its local disk

    logs = [tmp_path / f"resumed{i}.log" for i in range(2)]
    resumed = start_pair(_argv(run_dir, local), logs, cache)
    outputs = finish(resumed, logs, TIMEOUT) + finish(reference, reference_logs, TIMEOUT)
    assert [w.returncode for w in resumed + reference] == [0, 0, 0, 0], "\n".join(o[-2000:] for o in outputs)
    assert f"train: resuming from {hosts[0] / str(local_step)} (local tier)" in outputs[0]
    # host 1 started with nothing, so its shards of that local step came from host 0
    assert f"Local scan: No steps found in {hosts[1]}" in (run_dir / "orbax.process_1.log").read_text()
    assert "could not be restored" not in outputs[0]
    expected = exact_metrics(metrics(tmp_path / "reference"))
    assert [row["step"] for row in expected] == list(range(1, STEPS + 1))
    assert exact_metrics(metrics(run_dir)) == expected


def test_a_local_step_that_does_not_read_back_falls_back_to_the_persistent_step(tmp_path, capsys):
    """One process: local steps 4 and 5, persistent 3 (step 5's persistent save lost); local
    step 5's array files gone. The rerun says why and resumes from persistent step 3, and
    recomputes steps 4 and 5 bit for bit."""
    from train.loop import train

    run_dir, local = tmp_path / "run", tmp_path / "local"
    tiers = {"checkpoint_every": 3, "local_checkpoints.dir": local, "local_checkpoints.every": 1}
    train(run_config(run_dir, **tiers), progress=False, stop_after=5)
    first = exact_metrics(metrics(run_dir))
    assert [int(p.name) for p in sorted(local.glob("[0-9]*"))] == [4, 5] and all_steps(run_dir / "checkpoints") == [3, 5]
    shutil.rmtree(run_dir / "checkpoints" / "5")
    for chunk in (local / "5" / "state").rglob("d/*"):
        chunk.unlink()
    capsys.readouterr()

    train(run_config(run_dir, **tiers), progress=False)
    err = capsys.readouterr().err
    assert "train: local tier: step 5 could not be restored (" in err, err
    assert f"train: resuming from {run_dir / 'checkpoints' / '3'}\n" in err, err
    resumed = exact_metrics(metrics(run_dir))
    assert [row["step"] for row in resumed] == list(range(1, 7)) and resumed[:5] == first

    with pytest.raises(ConfigError, match=f"local_checkpoints.dir {local}: holds the local checkpoints of "
                                          f"run_dir {run_dir}; give each run its own directory$"):
        train(run_config(tmp_path / "other", **tiers), progress=False)
    assert not (tmp_path / "other" / "checkpoints").exists()


@pytest.mark.parametrize("override, line", [
    ("local_checkpoints.every=5", "local_checkpoints.dir: must be a directory on each host, got None"),
    ("local_checkpoints.dir=gs://bucket/local", "local_checkpoints.dir: must be a directory on each host, "
                                                "got 'gs://bucket/local'"),
    ("local_checkpoints={dir: /tmp/l, every: 0}", "local_checkpoints.every: must be a positive integer, got 0"),
    ("local_checkpoints={dir: /tmp/l, keep: two}", "local_checkpoints.keep: must be a positive integer, got 'two'"),
])
def test_bad_local_checkpoint_settings_are_one_line(override, line):
    from train.config import load_run_config

    with pytest.raises(ConfigError) as err:
        load_run_config("tiny_cpu", [override])
    assert str(err.value) == line


def test_without_local_checkpoints_a_run_config_has_no_local_tier():
    from train.config import load_run_config

    assert load_run_config("tiny_cpu").local_checkpoints is None
    tier = load_run_config("tiny_cpu", ["local_checkpoints.dir=/tmp/l"]).local_checkpoints
    assert (tier.dir, tier.every, tier.keep) == ("/tmp/l", 10, 2)
