"""Two processes (4 CPU devices each, gloo collectives over loopback) share one sharded checkpoint.

The worker (tests/checkpoint_worker.py) trains under fsdp over both
processes, restores the checkpoint under tp on all 8 devices and on each
process's own 4, round-trips save_params/restore_params, and resumes from an
earlier step with the same losses. Every wait is bounded; a hung worker is killed.
"""

from __future__ import annotations

import json
import subprocess
import sys

from train_runs import REPO, finish, subprocess_env
from servers import free_port

TIMEOUT = 200  # seconds for both workers


def test_two_processes_save_restore_and_resume_one_sharded_checkpoint(tmp_path):
    port = free_port()
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    workers = [subprocess.Popen([sys.executable, str(REPO / "tests" / "checkpoint_worker.py"), str(i), str(port),
                                 str(tmp_path)], cwd=REPO,
                                env=subprocess_env(devices=4, compilation_cache=tmp_path / "cache"),
                                stdout=logs[i].open("w"), stderr=subprocess.STDOUT) for i in range(2)]
    outputs = finish(workers, logs, TIMEOUT)
    for i, worker in enumerate(workers):
        assert worker.returncode == 0, f"worker {i} exited {worker.returncode}:\n{outputs[i][-3000:]}"
    assert json.loads((tmp_path / "result.json").read_text()) == {"resumed_steps": [3, 4, 5, 6]}
