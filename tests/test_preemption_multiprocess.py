"""Preemption of a two-process run (4 CPU devices each, gloo on 127.0.0.1; tests/preemption_worker.py).

SIGTERM reaches one process only; JAX's preemption sync point makes both stop
at the same step, save it and exit 0; the same command then resumes, and the
metrics equal an uninterrupted two-process run's bit for bit.
"""

from __future__ import annotations

import signal
import subprocess

from llama_jax.formats.checkpoint import all_steps
from train_runs import exact_metrics, finish, metrics, start_pair, wait_for_step

TIMEOUT = 240  # seconds for a pair of workers on a busy 2-core machine
STEPS = 16


def _start_pair(run_dir, logs, cache) -> list[subprocess.Popen]:
    return start_pair(["--config", "tiny_cpu", "--quiet", f"run_dir={run_dir}", "chip=v4", "layout=fsdp",
                       f"steps={STEPS}", "log_every=1", "checkpoint_every=100"], logs, cache)


def test_sigterm_to_one_process_stops_both_at_one_saved_step_and_the_rerun_resumes_exactly(tmp_path):
    cache = tmp_path / "cache"
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    reference = _start_pair(reference_dir, [tmp_path / f"reference{i}.log" for i in range(2)], cache)
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    workers = _start_pair(run_dir, logs, cache)
    try:
        seen = wait_for_step(run_dir, 3, workers[0], timeout=TIMEOUT)
        workers[1].send_signal(signal.SIGTERM)  # process 1 only: process 0 hears of it from the service
    finally:
        outputs = finish(workers, logs, TIMEOUT)
    for i, worker in enumerate(workers):
        assert worker.returncode == 0, f"process {i} exited {worker.returncode}:\n{outputs[i][-3000:]}"
    saved = all_steps(run_dir / "checkpoints")
    assert len(saved) == 1 and seen <= saved[0] < STEPS, (seen, saved)
    assert f"preempted: saved step {saved[0]}; run the same command to resume" in outputs[0]
    assert [row["step"] for row in metrics(run_dir)] == list(range(1, saved[0] + 1))

    logs = [tmp_path / f"resumed{i}.log" for i in range(2)]
    resumed = _start_pair(run_dir, logs, cache)
    outputs = finish(resumed, logs, TIMEOUT) + finish(reference, [tmp_path / f"reference{i}.log" for i in range(2)],
                                                      TIMEOUT)
    assert [w.returncode for w in resumed + reference] == [0, 0, 0, 0], "\n".join(o[-2000:] for o in outputs)
    assert f"train: resuming from {run_dir / 'checkpoints' / str(saved[0])}" in outputs[0]
    expected = exact_metrics(metrics(reference_dir))
    assert [row["step"] for row in expected] == list(range(1, STEPS + 1))
    assert exact_metrics(metrics(run_dir)) == expected
    assert all_steps(run_dir / "checkpoints") == [saved[0], STEPS]
