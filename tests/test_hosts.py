"""A lost host and a resized job (`python -m train --distributed`, gloo on 127.0.0.1, 4 CPU devices a process).

- SIGKILL or SIGSTOP of process 1: process 0 ends within
  peer_timeout (plus slack for a busy machine) with exit code 3 and one line
  naming the lost process and the last complete checkpoint; the rerun of the
  killed run matches an uninterrupted two-process run bit for bit.
- The killed run's step-4 checkpoint (2 processes x 4 devices) resumes on
  1 x 8 and 4 x 2 devices (the same fsdp=8 layout) and on 4 devices (fsdp=4):
  every step after 4 trains on the same global batch as the uninterrupted run.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_data import NumberTokenizer

from llama_jax.formats.checkpoint import all_steps
from sharding.layout import LayoutError
from train.loop import train
from train.prepare import prepare
from train_runs import EXACT_METRICS, REPO, exact_metrics, finish, metrics, run_config, subprocess_env, wait_for_step
from servers import free_port

STEPS, SAVE_EVERY, PEER_TIMEOUT = 12, 4, 10
SLACK_S = 15  # a busy 2-core machine may schedule the survivor late
TIMEOUT = 300  # seconds for a group of workers
SETTINGS = {"layout": "fsdp", "steps": STEPS, "checkpoint_every": SAVE_EVERY, "data.source": "tokens",
            "data.seq_len": 16}


def _start(run_dir, logs, corpus, cache, processes=2, devices=4, steps=STEPS) -> list[subprocess.Popen]:
    """`python -m train` as `processes` processes of one job, each with `devices` CPU devices."""
    port = free_port()
    argv = ["--config", "tiny_cpu", "--quiet", f"run_dir={run_dir}", "chip=v4", "log_every=1",
            f"peer_timeout={PEER_TIMEOUT}", f"compile_cache={cache}", f"data.paths=[{corpus}]",
            *(f"{k}={v}" for k, v in {**SETTINGS, "steps": steps}.items()),
            "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes)]
    env = subprocess_env(devices=devices)
    env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return [subprocess.Popen([sys.executable, "-m", "train", *argv, "--process-id", str(i)], cwd=REPO, env=env,
                             stdout=logs[i].open("w"), stderr=subprocess.STDOUT) for i in range(processes)]


def _logs(tmp, name, n=2):
    return [tmp / f"{name}{i}.log" for i in range(n)]


def _lose(run_dir, workers, logs, sig: int, after: int, pause: float = 0) -> tuple[str, float]:
    """Send `sig` to process 1 once step SAVE_EVERY is saved and step `after` logged (the watch is
    armed once a process has finished two steps), and `pause` seconds more;
    (process 0's output, seconds from the signal to its exit). Process 1 is killed at the end."""
    try:
        wait_for_step(run_dir, after, workers[0], timeout=TIMEOUT, saved=SAVE_EVERY)
        time.sleep(pause)
        workers[1].send_signal(sig)
        sent = time.monotonic()
        workers[0].wait(timeout=PEER_TIMEOUT + SLACK_S + 60)
        elapsed = time.monotonic() - sent
    finally:
        workers[1].kill()  # a stopped process never ends by itself; SIGKILL ends it stopped or not
        outputs = finish(workers, logs, 10)
    assert workers[0].returncode == 3, f"exit {workers[0].returncode}:\n{outputs[0][-3000:]}"
    return outputs[0], elapsed


def _assert_one_line(output: str, lost: str, run_dir):
    latest = all_steps(run_dir / "checkpoints")[-1]
    lines = [line for line in output.splitlines() if line.startswith("train: error:")]
    assert lines == [f"train: error: {lost} stopped answering for {PEER_TIMEOUT} s (killed, stopped or cut off); "
                     f"last complete checkpoint: {run_dir / 'checkpoints' / str(latest)}; run the same command on "
                     "every host to resume"], output[-3000:]
    assert "Traceback" not in output and len(lines[0]) < 250


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted two-process run, and a copy of the killed run's step-SAVE_EVERY checkpoint."""
    tmp = tmp_path_factory.mktemp("hosts")
    rng = np.random.default_rng(0)
    docs = tmp / "docs.txt"
    docs.write_text("".join(" ".join(map(str, rng.integers(3, 256, 15))) + "\n" for _ in range(240)))
    prepare(NumberTokenizer(vocab_size=256), [str(docs)], tmp / "tokens", progress=False)
    corpus, cache = tmp / "tokens", tmp / "cache"
    killed = _start(tmp / "killed", _logs(tmp, "killed"), corpus, cache)
    output, elapsed = _lose(tmp / "killed", killed, _logs(tmp, "killed"), signal.SIGKILL, after=SAVE_EVERY + 1)
    saved = tmp / "saved" / "checkpoints"
    shutil.copytree(tmp / "killed" / "checkpoints" / str(SAVE_EVERY), saved / str(SAVE_EVERY))
    # after the killed run, with its compiles cached: processes that compile at very different
    # speeds (a loaded machine) can miss gloo's 30 s rendezvous at their first collective
    reference = _start(tmp / "reference", _logs(tmp, "reference"), corpus, cache)
    texts = finish(reference, _logs(tmp, "reference"), TIMEOUT)
    assert [w.returncode for w in reference] == [0, 0], texts[0][-3000:]
    return {"tmp": tmp, "corpus": corpus, "cache": cache, "killed": (output, elapsed), "saved": saved,
            "reference": exact_metrics(metrics(tmp / "reference"))}


def test_sigkill_of_one_process_ends_the_other_in_one_line_and_the_rerun_is_bit_exact(runs):
    tmp = runs["tmp"]
    output, elapsed = runs["killed"]
    assert elapsed < PEER_TIMEOUT + SLACK_S, f"{elapsed:.1f} s"
    _assert_one_line(output, "process 1 of 2", tmp / "killed")
    rerun = _start(tmp / "killed", _logs(tmp, "rerun"), runs["corpus"], runs["cache"])
    texts = finish(rerun, _logs(tmp, "rerun"), TIMEOUT)
    assert [w.returncode for w in rerun] == [0, 0], texts[0][-3000:]
    assert [row["step"] for row in runs["reference"]] == list(range(1, STEPS + 1))
    rows = exact_metrics(metrics(tmp / "killed"))
    resumed = max(i for i, row in enumerate(rows) if row["step"] == SAVE_EVERY + 1)  # the rerun's rows
    assert rows[resumed:] == runs["reference"][SAVE_EVERY:]


def test_sigstop_of_one_process_ends_the_other_in_one_line(runs):
    tmp = runs["tmp"]
    workers = _start(tmp / "stopped", _logs(tmp, "stopped"), runs["corpus"], runs["cache"], steps=1000)
    output, elapsed = _lose(tmp / "stopped", workers, _logs(tmp, "stopped"), signal.SIGSTOP, after=SAVE_EVERY + 1,
                            pause=PEER_TIMEOUT / 5 + 1)  # a round of process 0's watch, to hear process 1
    assert elapsed < PEER_TIMEOUT + SLACK_S, f"{elapsed:.1f} s"
    _assert_one_line(output, "process 1 of 2", tmp / "stopped")


def _resumed(runs, name) -> tuple:
    run_dir = runs["tmp"] / name
    shutil.copytree(runs["saved"], run_dir / "checkpoints")
    return run_dir, runs["reference"][SAVE_EVERY:]


def test_a_two_process_checkpoint_resumes_on_four_processes_on_the_same_batches(runs):
    run_dir, expected = _resumed(runs, "four")
    logs = _logs(runs["tmp"], "four", 4)
    workers = _start(run_dir, logs, runs["corpus"], runs["cache"], processes=4, devices=2)
    texts = finish(workers, logs, TIMEOUT)
    assert [w.returncode for w in workers] == [0] * 4, texts[0][-3000:]
    assert exact_metrics(metrics(run_dir)) == expected


@pytest.mark.parametrize("name, mesh", [("one", {}), ("smaller", {"mesh.fsdp": 4})])
def test_a_two_process_checkpoint_resumes_on_one_process_on_the_same_batches(runs, name, mesh):
    run_dir, expected = _resumed(runs, name)
    run = run_config(run_dir, **SETTINGS, **{"data.paths": f"[{runs['corpus']}]", "compile_cache": "off"}, **mesh)
    train(run, progress=False)
    got = exact_metrics(metrics(run_dir))
    assert [row["step"] for row in got] == [row["step"] for row in expected]
    for row, want in zip(got, expected):  # fsdp=8 on one process: only the reduction order changes
        for key in EXACT_METRICS:
            assert row[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), (row["step"], key)


def test_a_batch_that_no_longer_divides_the_mesh_is_one_line(tmp_path):
    run = run_config(tmp_path / "run", layout="fsdp", **{"data.global_batch": 12})  # 12 rows on fsdp=8
    with pytest.raises(LayoutError, match=re.escape("batch of size 12 does not divide by data x fsdp = 8")):
        train(run, progress=False)
