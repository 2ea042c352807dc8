"""Test set-up: 8 emulated CPU devices, set before JAX is first imported."""

import os
import shutil

import pytest

DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
if DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):  # pytest-xdist workers inherit it
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + DEVICES_FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def gcs():
    """One Cloud Storage emulator on 127.0.0.1 for the whole session (tests/gcs_emulator.py)."""
    from gcs_emulator import Emulator

    with Emulator() as emulator:
        yield emulator


@pytest.fixture(scope="session")
def trained_guard(tmp_path_factory, worker_id):
    """A tiny Llama Guard trained here to answer "unsafe\nS1" when the judged turn holds the
    marker word, "safe" otherwise (tests/guard_tiny.py): trained once a session, as tests/test_guard.py
    and tests/test_serve_vision.py both judge with it. Under pytest-xdist the first worker to ask
    trains it into the session's shared temporary root (a file lock keeps the others waiting),
    since the two files may land on different workers and training costs about two minutes."""
    import filelock
    import guard_tiny as gt

    if worker_id == "master":
        directory = tmp_path_factory.mktemp("tiny_guard")
        gt.make_guard(directory)
        return directory
    directory = tmp_path_factory.getbasetemp().parent / "tiny_guard"  # shared by this session's workers
    with filelock.FileLock(f"{directory}.lock"):
        if not (directory / "done").exists():
            shutil.rmtree(directory, ignore_errors=True)  # a worker that died half-way
            directory.mkdir()
            gt.make_guard(directory)
            (directory / "done").touch()
    return directory
