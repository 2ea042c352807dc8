"""Two processes with 4 CPU devices each form one 8-device mesh and agree with one process.

The processes talk over loopback only (coordinator on 127.0.0.1, gloo CPU
collectives); every wait is bounded, and a hung worker is killed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from multiprocess_worker import BATCH, LAYOUTS, N_PROCESSES, loss_and_grad_norms, make_batch
from tiny import LLAMA3_LIKE

from sharding.layout import load_layout
from sharding.place import Placement
from servers import free_port

TESTS = Path(__file__).resolve().parent
TIMEOUT_S = 240
RTOL = 1e-5


def _run_workers() -> list[dict]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent), env.get("PYTHONPATH", "")])
    workers = [subprocess.Popen([sys.executable, str(TESTS / "multiprocess_worker.py"), str(i), str(port)],
                                cwd=TESTS.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for i in range(N_PROCESSES)]
    outputs = []
    try:
        for i, worker in enumerate(workers):
            stdout, stderr = worker.communicate(timeout=TIMEOUT_S)
            assert worker.returncode == 0, f"worker {i} exited {worker.returncode}:\n{stderr[-3000:]}"
            outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait(timeout=10)
    return outputs


@pytest.fixture(scope="module")
def worker_results() -> list[dict]:
    return _run_workers()


def test_two_processes_form_one_8_device_mesh(worker_results):
    for i, result in enumerate(worker_results):
        assert result["process"] == i
        assert (result["process_count"], result["global_devices"], result["local_devices"]) == (2, 8, 4)
        assert result["fsdp"]["mesh"] == {"stage": 1, "data": 1, "fsdp": 8, "sequence": 1, "tensor": 1}
        assert result["tp"]["mesh"] == {"stage": 1, "data": 1, "fsdp": 1, "sequence": 1, "tensor": 8}


def test_fsdp_splits_rows_between_processes(worker_results):
    for i, result in enumerate(worker_results):
        fsdp = result["fsdp"]
        assert fsdp["rows_fed"] == BATCH // 2
        # this process's devices hold exactly the rows it fed, as one contiguous block
        assert fsdp["held_rows"] == list(range(i * BATCH // 2, (i + 1) * BATCH // 2))
        assert fsdp["held_rows_are_mine"], f"process {i} holds rows it did not feed"


def test_tp_processes_are_replicas_along_the_batch(worker_results):
    for result in worker_results:
        assert result["tp"]["rows_fed"] == BATCH and result["tp"]["held_rows"] == [0]
        assert result["tp"]["held_rows_are_mine"]


@pytest.mark.parametrize("name", LAYOUTS)
def test_two_processes_compute_the_same_loss_as_one_process_with_8_devices(worker_results, name):
    placement = Placement.create(LLAMA3_LIKE, load_layout(name))
    assert placement.process_rows(BATCH) == BATCH  # one process feeds everything
    params = placement.init_params(jax.random.key(0))
    tokens, positions = make_batch(LLAMA3_LIKE.vocab_size)
    want_loss, want_squares, _ = loss_and_grad_norms(placement, params, tokens, positions)
    for i, result in enumerate(worker_results):
        got = result[name]
        assert abs(got["loss"] - want_loss) <= RTOL * abs(want_loss), \
            f"{name}, process {i}: loss {got['loss']} vs one process {want_loss}"
        assert got["grad_squares"].keys() == want_squares.keys()
        for leaf, want in want_squares.items():
            value = got["grad_squares"][leaf]
            assert abs(value - want) <= RTOL * abs(want), \
                f"{name}, process {i}: |grad|^2 of {leaf} {value} vs {want}"
