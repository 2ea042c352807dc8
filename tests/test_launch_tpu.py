"""scripts/launch_tpu.py: the gcloud commands it builds (nothing is run: --dry-run)."""

from __future__ import annotations

import shlex
import subprocess
import sys

from train_runs import REPO

SCRIPT = REPO / "scripts" / "launch_tpu.py"


def _dry_run(*argv) -> tuple[int, list[str], str]:
    """`launch_tpu.py ACTION NAME --dry-run ...`: exit code, the printed command's argv, stderr."""
    done = subprocess.run([sys.executable, str(SCRIPT), *argv[:2], "--dry-run", *argv[2:]],
                          capture_output=True, text=True, timeout=60)
    return done.returncode, shlex.split(done.stdout), done.stderr


def test_run_on_every_host_of_one_slice():
    code, command, _ = _dry_run("run", "my-tpu", "--zone", "us-east5-a", "--", "--config",
                                "configs/runs/llama3_1_8b_v5p.yaml", "run_dir=gs://my-bucket/runs/8b", "steps=10")
    assert code == 0
    assert command == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-east5-a", "--worker=all",
                       "--command=cd llama-jax && .venv/bin/python -m train --distributed --config "
                       "configs/runs/llama3_1_8b_v5p.yaml run_dir=gs://my-bucket/runs/8b steps=10"]


def test_run_on_every_host_of_every_slice_quotes_the_remote_command():
    code, command, _ = _dry_run("run", "pod", "--zone", "us-central2-b", "--project", "proj", "--slices", "4",
                                "--repo", "/opt/my repo", "--", "--config", "big.yaml", "mesh={data: 4}")
    assert code == 0
    assert command[:10] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "pod", "--zone=us-central2-b",
                            "--project=proj", "--node=all", "--worker=all"]
    remote = command[10].removeprefix("--command=")
    assert remote == "cd '/opt/my repo' && .venv/bin/python -m train --distributed --config big.yaml 'mesh={data: 4}'"
    assert shlex.split(remote)[-1] == "mesh={data: 4}"  # one argument on the host, as typed


def test_create_one_slice_or_a_multislice_through_queued_resources():
    code, command, _ = _dry_run("create", "my-tpu", "--zone", "us-east5-a", "--accelerator", "v5p-128",
                                "--runtime-version", "v2-alpha-tpuv5", "--spot")
    assert code == 0
    assert command == ["gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu", "--zone=us-east5-a",
                       "--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5", "--node-id=my-tpu", "--spot"]
    code, command, _ = _dry_run("create", "pod", "--zone", "us-east5-a", "--accelerator", "v5p-128",
                                "--runtime-version", "v2-alpha-tpuv5", "--slices", "2")
    assert code == 0
    assert command[-2:] == ["--node-count=2", "--node-prefix=pod"] and "--node-id=pod" not in command


def test_status_and_delete():
    assert _dry_run("status", "pod", "--zone", "z")[1] == [
        "gcloud", "compute", "tpus", "queued-resources", "describe", "pod", "--zone=z"]
    assert _dry_run("delete", "pod", "--zone", "z")[1] == [
        "gcloud", "compute", "tpus", "queued-resources", "delete", "pod", "--zone=z", "--force", "--quiet"]


def test_run_without_training_arguments_is_one_line():
    code, _, err = _dry_run("run", "my-tpu", "--zone", "z")
    assert code == 1 and err.strip().splitlines() == [
        "launch_tpu: error: run: give the training arguments after --, e.g. -- --config "
        "configs/runs/llama3_1_8b_v5p.yaml"]
