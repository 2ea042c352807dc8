"""Helpers for the checkpoint tests: tiny training runs, in process and as `python -m train`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from servers import free_port

REPO = Path(__file__).resolve().parent.parent
# Metrics that are pure functions of the state and the batch (tokens/s and MFU are timings).
EXACT_METRICS = ("loss", "grad_norm", "accuracy", "learning_rate", "z_loss", "tokens")


def finish(processes, logs, timeout: float):
    """Wait for subprocesses (one, or a list) up to `timeout` seconds each, kill any still
    running, and return the text of their logs (one, or a list)."""
    single = isinstance(processes, subprocess.Popen)
    processes, logs = ([processes], [logs]) if single else (list(processes), list(logs))
    try:
        for process in processes:
            process.wait(timeout=timeout)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    texts = [Path(log).read_text() for log in logs]
    return texts[0] if single else texts


def random_batch(rows: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A training batch of random ids (one document a row) with uneven 0/1 loss weights."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (rows, seq + 1)).astype(np.int32)
    weights = (rng.random((rows, seq)) > 0.2).astype(np.float32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy(),
            "segment_ids": np.ones((rows, seq), np.int32), "loss_weights": weights}


def run_config(run_dir, **overrides):
    """The tiny CPU run (8 devices) writing to `run_dir`, with small steps and frequent saves."""
    from train.config import load_run_config

    settings = {"steps": 6, "log_every": 1, "checkpoint_every": 3, **overrides}
    return load_run_config("tiny_cpu", [f"run_dir={run_dir}", *(f"{k}={v}" for k, v in settings.items())])


def cli(run_dir, *overrides, config: str = "tiny_cpu") -> list[str]:
    """`python -m train` for a run config (the tiny CPU run unless told) in `run_dir`."""
    return [sys.executable, "-m", "train", "--config", config, "--quiet", f"run_dir={run_dir}",
            "chip=v4", *overrides]  # a published peak: no FLOP/s measurement at start-up


def subprocess_env(devices: int = 8, compilation_cache=None) -> dict:
    """Environment for a child JAX process on `devices` CPU devices.

    compilation_cache: a directory for JAX's persistent compilation cache, so
    runs after the first skip compiling (the same executables, the same bits).
    """
    env = dict(os.environ)
    if compilation_cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(compilation_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def start(command, log: Path, devices: int = 8, compilation_cache=None) -> subprocess.Popen:
    """Start a command with stdout and stderr to `log` (a file, so a full pipe never blocks it)."""
    return subprocess.Popen(command, cwd=REPO, env=subprocess_env(devices, compilation_cache),
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def start_pair(argv: list[str], logs, compilation_cache) -> list[subprocess.Popen]:
    """Two processes (4 CPU devices each) running `python -m train argv...` as one job
    (tests/preemption_worker.py: jax.distributed on 127.0.0.1), output to `logs[0]`, `logs[1]`."""
    port = free_port()  # for the coordinator
    env = subprocess_env(devices=4)
    env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    argv = [*argv, f"compile_cache={compilation_cache}"]
    return [subprocess.Popen([sys.executable, str(REPO / "tests" / "preemption_worker.py"), str(i), str(port), *argv],
                             cwd=REPO, env=env, stdout=Path(logs[i]).open("w"), stderr=subprocess.STDOUT)
            for i in range(2)]


def metrics(run_dir) -> list[dict]:
    """Every record of metrics.jsonl (local or gs://), in the order written (a resumed run appends)."""
    from llama_jax.paths import user_path

    path = user_path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wandb_records(run_files) -> list[dict]:
    """Every record of one offline W&B run directory (WANDB_DIR/wandb/offline-run-*), read by
    wandb's own reader of its run files, `wandb leet inspect --json`: {"type": kind, kind: {...}}."""
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_files)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def wait_for_step(run_dir, step: int, process: subprocess.Popen, timeout: float = 120.0,
                  saved: int | None = None) -> int:
    """Poll until metrics.jsonl shows `step` or later (and step `saved` is a complete
    checkpoint, if given); the latest step logged."""
    from llama_jax.formats.checkpoint import all_steps
    from llama_jax.paths import user_path

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = metrics(run_dir)
        if rows and rows[-1]["step"] >= step and (
                saved is None or saved in all_steps(user_path(run_dir) / "checkpoints")):
            return rows[-1]["step"]
        if process.poll() is not None:
            raise AssertionError(f"training exited with {process.returncode} before step {step}")
        time.sleep(0.02)
    raise AssertionError(f"no step {step} (and checkpoint {saved}) in {run_dir} after {timeout} s")


def kill_at_step(run_dir, step: int, process: subprocess.Popen, saved: int):
    """SIGKILL `process` once it has logged `step` and completed checkpoint `saved`."""
    try:
        wait_for_step(run_dir, step, process, saved=saved)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()


def exact_metrics(rows, extra: tuple[str, ...] = ()) -> list[dict]:
    """Each metrics row's step, EXACT_METRICS and the `extra` keys the run logs (a MoE's router
    losses): what a resumed run must reproduce bit for bit."""
    return [{k: row[k] for k in ("step", *EXACT_METRICS, *extra)} for row in rows]


def steps_on_disk(run_dir) -> list[int]:
    from llama_jax.paths import user_path

    directory = user_path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def tree_digest(path) -> dict[str, str]:
    """sha256 of every file under `path`, by relative name (to show a checkpoint untouched)."""
    path = Path(path)
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


def assert_trees_equal(actual, expected, what: str):
    """Every leaf bitwise equal (and the same tree), naming the first leaf that differs."""
    import jax

    flat_actual, tree_actual = jax.tree_util.tree_flatten_with_path(actual)
    flat_expected, tree_expected = jax.tree_util.tree_flatten_with_path(expected)
    assert tree_actual == tree_expected, f"{what}: tree structure differs"
    for (path, a), (_, e) in zip(flat_actual, flat_expected):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what}{jax.tree_util.keystr(path)}: dtype/shape"
        assert np.array_equal(a, e), f"{what}{jax.tree_util.keystr(path)}: values differ"


def restore_training_state(run, devices=None):
    """(state, shardings): the run's latest checkpoint restored as training would, under
    run.layout on `devices` (None: the layout's own)."""
    import jax

    from sharding.layout import load_layout
    from sharding.place import Placement
    from train.checkpoints import Checkpointer
    from train.data.pipeline import make_dataset
    from train.optimizer import make_optimizer
    from train.step import init_state

    placement = Placement.create(run.model, load_layout(run.layout), devices=devices)
    state, shardings = init_state(placement, make_optimizer(run.optimizer, run.steps), jax.random.key(7))
    checkpointer = Checkpointer(run, shardings)
    try:
        restored = checkpointer.restore_latest(state, make_dataset(run.data))
    finally:
        checkpointer.close()
    return restored, shardings
