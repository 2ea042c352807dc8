"""Runs that live in Cloud Storage, against a real GCS API server on 127.0.0.1 (tests/gcs_emulator.py).

One module-scoped bucket holds a tokenizer, prepared tokens and a run; the
tests then train, kill, resume, generate and export from it, drop the
connection during a save (those runs also log to W&B and profile a step),
and check that nothing of the bucket path appears on the local disk.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from gcs_emulator import CuttingProxy, ForbiddenServer, closed_url
from llama_jax.formats.checkpoint import latest_step
from train_runs import (EXACT_METRICS, REPO, exact_metrics, finish, kill_at_step, metrics, subprocess_env,
                        wait_for_step, wandb_records)

TIMEOUT = 150  # seconds for one tiny run of `python -m train` on a busy 2-core machine
TEXTS = ["the quick brown fox jumps over the lazy dog", "packing rows of tokens for training",
         "a bucket holds the run and its checkpoints", "every host reads the same directory"]


def _train_command(run_dir: str, tokens: str) -> list[str]:
    return [sys.executable, "-m", "train", "--config", "tiny_cpu", "--quiet", f"run_dir={run_dir}", "chip=v4",
            "data.source=tokens", f"data.paths=[{tokens}]", "steps=20", "log_every=1", "checkpoint_every=5"]


def _start(command, cwd, log, cache, **environ) -> subprocess.Popen:
    """A training process in `cwd` (an empty directory, to see that nothing lands in it),
    with `environ` added to its environment."""
    env = {**subprocess_env(compilation_cache=cache), **environ}
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """Shared by the training runs below: the same config and devices, so one compile serves all."""
    return tmp_path_factory.mktemp("compile_cache")


@pytest.fixture(scope="module")
def bucket(gcs):
    """gs://storage-run holding tok/tokenizer.model and tokens/ (written by `python -m train.prepare`)."""
    import io

    import sentencepiece as spm

    from llama_jax.paths import user_path
    from train.prepare import main as prepare

    url = gcs.bucket("storage-run")
    model = io.BytesIO()  # a SentencePiece model small enough for the tiny model's 256 ids (no byte pieces)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 10), model_writer=model, vocab_size=100,
                                   hard_vocab_limit=False, model_type="bpe", minloglevel=2,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    (user_path(url) / "tok" / "tokenizer.model").write_bytes(model.getvalue())
    corpus = user_path(url) / "corpus" / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{TEXTS[i % 4]} {i}"}) + "\n" for i in range(200)))
    assert prepare(["--tokenizer", f"{url}/tok", "--input", f"{url}/corpus/*.jsonl",
                    "--output", f"{url}/tokens", "--quiet"]) == 0
    return url


def test_prepare_writes_tokens_to_the_bucket_and_reads_them_back_by_range(bucket):
    from llama_jax.paths import user_path
    from llama_jax.text.tokenizer import load_tokenizer
    from train.data.ranged_reads import RangedTokens
    from train.data.sources import TokenDocuments

    names = sorted(p.name for p in (user_path(bucket) / "tokens").iterdir())
    assert names == ["index.npy", "meta.json", "tokens.bin"]
    assert not [p.name for p in user_path(bucket).iterdir() if ".tmp-" in p.name]  # the staging prefix is gone
    docs, tokenizer = TokenDocuments([f"{bucket}/tokens"]), load_tokenizer(f"{bucket}/tok/tokenizer.model")
    assert isinstance(docs._tokens[0], RangedTokens)
    assert len(docs) == 200
    assert docs[7].tolist() == tokenizer.encode(f"{TEXTS[3]} 7", bos=True, eos=True)
    assert docs.read(7, 2, 5).tolist() == docs[7].tolist()[2:5]


def test_the_emulator_keeps_answering_past_a_full_log_pipe(gcs):
    """fake-gcs-server logs a line (~160 bytes) per request; 1,000 requests (past a 64 KiB pipe)
    are all answered. (Started through the wrapper's FakeGCSServer, whose stderr pipe nobody
    reads, it stopped answering after ~400: the training run against it hung.)"""
    import threading

    import fsspec

    fs, answers = fsspec.filesystem("gs"), []
    fs.mkdir("log-pipe")
    fs.pipe("log-pipe/object", b"bytes")
    logged = gcs.log_path.stat().st_size
    worker = threading.Thread(target=lambda: answers.extend(fs.cat("log-pipe/object") for _ in range(1000)),
                              daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert len(answers) == 1000 and set(answers) == {b"bytes"}
    assert gcs.log_path.stat().st_size - logged > 64 * 1024


def test_a_bucket_step_without_its_commit_file_is_not_a_checkpoint(gcs):
    """On gs:// orbax writes a step in place and ends with commit_success.txt: a step
    directory without one is a save cut short, never resumed from or served."""
    from llama_jax.formats.checkpoint import all_steps, latest_step
    from llama_jax.paths import user_path

    directory = user_path(gcs.bucket("commit-file")) / "checkpoints"
    (directory / "5" / "params" / "manifest.ocdbt").write_bytes(b"cut short")
    (directory / "3" / "commit_success.txt").write_text("Checkpoint commit was successful")
    (directory / "4.orbax-checkpoint-tmp-1" / "commit_success.txt").write_text("renamed only when done")
    assert all_steps(directory) == [3] and latest_step(directory) == 3


def test_killed_bucket_run_resumes_with_the_metrics_of_an_uninterrupted_run(bucket, tmp_path, compile_cache):
    """`python -m train` with run_dir=gs://...: SIGKILL between saves, the same command resumes,
    and every step's metrics equal an uninterrupted bucket run's bit for bit."""
    from llama_jax.formats.checkpoint import all_steps
    from llama_jax.paths import user_path
    from train.tracking.goodput import breakdown, read_attempts

    cwd, cache = tmp_path / "cwd", compile_cache
    cwd.mkdir()
    tokens = f"{bucket}/tokens"
    reference_dir, run_dir = f"{bucket}/reference", f"{bucket}/run"
    reference = _start(_train_command(reference_dir, tokens), cwd, tmp_path / "reference.log", cache)
    wait_for_step(reference_dir, 1, reference)  # compiled: the other runs load its executables
    killed = _start(_train_command(run_dir, tokens), cwd, tmp_path / "killed.log", cache)
    kill_at_step(run_dir, 7, killed, saved=5)
    saved = all_steps(user_path(run_dir) / "checkpoints")  # complete ones (commit_success.txt)
    assert saved and saved[-1] < 20, saved

    resumed = _start(_train_command(run_dir, tokens), cwd, tmp_path / "resumed.log", cache)
    output = finish(resumed, tmp_path / "resumed.log", TIMEOUT)
    assert resumed.returncode == 0, output
    assert f"resuming from {run_dir}/checkpoints/{saved[-1]}" in output
    reference_output = finish(reference, tmp_path / "reference.log", TIMEOUT)
    assert reference.returncode == 0, reference_output

    expected = exact_metrics(metrics(reference_dir))
    assert [row["step"] for row in expected] == list(range(1, 21))
    assert exact_metrics(metrics(run_dir)) == expected
    assert (user_path(run_dir) / "tensorboard").is_dir()
    # Goodput records in the bucket: the killed attempt's up to its last upload (its start, at least).
    account = breakdown(read_attempts(run_dir))
    assert [(a.status, a.first_step) for a in account.attempts] == [("killed", 0), ("finished", saved[-1])]
    assert account.attempts[1].last_step == 20
    # Nothing of the bucket path on the local disk: not in the working directory, not in the repo.
    assert sorted(p.name for p in cwd.iterdir()) == []
    assert not (REPO / "gs:").exists()


def _uninterrupted_metrics(bucket, cwd, log, cache) -> list[dict]:
    """The metrics of the uninterrupted run the test above keeps in {bucket}/reference
    (run now if that test has not run)."""
    reference_dir = f"{bucket}/reference"
    if [row["step"] for row in metrics(reference_dir)] != list(range(1, 21)):
        reference = _start(_train_command(reference_dir, f"{bucket}/tokens"), cwd, log, cache)
        output = finish(reference, log, TIMEOUT)
        assert reference.returncode == 0, output
    return metrics(reference_dir)


def test_a_connection_dropped_during_a_save_is_one_line_and_the_rerun_resumes(gcs, bucket, tmp_path,
                                                                              compile_cache):
    """The arrays of a save (its bulk, written by tensorstore) reach the bucket through a proxy
    that drops the connection as step 10's save starts and refuses it from then on. The run
    stops with one line naming the save and the bucket once checkpoint_timeout has passed;
    step 5 stays the last complete checkpoint, and the same command with the connection back
    resumes from it with an uninterrupted run's metrics.

    Both runs also log to Weights & Biases (offline, read back with wandb's own reader): one
    W&B run, marked failed then finished, holding each step once, as metrics.jsonl does. The
    rerun also profiles step 12: the trace lands in the bucket, its local staging is gone."""
    import fsspec

    from llama_jax.formats.checkpoint import all_steps
    from llama_jax.paths import user_path

    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    run_dir = f"{bucket}/dropped"
    command = [*_train_command(run_dir, f"{bucket}/tokens"), "metrics.wandb={project: llama-jax-tests}"]
    wandb = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"), "WANDB_SILENT": "true"}
    with CuttingProxy(gcs.url, marker="dropped/checkpoints/10/") as proxy:
        dropped = _start([*command, "checkpoint_timeout=8"], cwd, tmp_path / "dropped.log", compile_cache,
                         TENSORSTORE_GCS_HTTP_URL=proxy.url, **wandb)
        output = finish(dropped, tmp_path / "dropped.log", TIMEOUT)
    assert proxy.cut.is_set()
    assert dropped.returncode == 2, output
    assert "Traceback" not in output
    assert [line for line in output.splitlines() if "error" in line.lower()] == [
        f"train: error: {run_dir}/checkpoints: saving step 10 failed (not finished within checkpoint_timeout, "
        f"8 s: the storage stopped answering or needs a longer timeout); step 5 is the last complete "
        f"checkpoint (orbax's log: {run_dir}/orbax.log)"]
    assert all_steps(user_path(run_dir) / "checkpoints") == [5]
    stopped_at = metrics(run_dir)[-1]["step"]
    assert stopped_at >= 10

    rerun = _start([*command, "profile={start_step: 12, steps: 1}"], cwd, tmp_path / "rerun.log", compile_cache,
                   TMPDIR=str(tmp), **wandb)
    output = finish(rerun, tmp_path / "rerun.log", TIMEOUT)
    assert rerun.returncode == 0, output
    assert f"resuming from {run_dir}/checkpoints/5" in output
    expected = exact_metrics(_uninterrupted_metrics(bucket, cwd, tmp_path / "reference.log", compile_cache))
    assert exact_metrics(metrics(run_dir)) == expected

    # W&B: the rerun resumed the W&B run named in the run directory, and sent only the steps
    # past those the stopped run had sent (steps 6.. were recomputed, bit for bit the same).
    run_id = json.loads((user_path(run_dir) / "wandb.json").read_text())["id"]
    records = [wandb_records(p) for p in sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))]
    assert [[r["run"]["run_id"] for r in run if r["type"] == "run"] for run in records] == [[run_id], [run_id]]
    assert [[r["exit"]["exit_code"] for r in run if r["type"] == "exit"] for run in records] == [[1], [0]]
    config = next(r["run"]["config"]["update"] for r in records[0] if r["type"] == "run")
    assert (config["run_dir"], config["steps"], config["model"]["dim"]) == (run_dir, 20, 64)  # the run config
    history = [[r["history"] for r in run if r["type"] == "history"] for run in records]
    assert [[h["step"]["num"] for h in run] for run in history] == [list(range(1, stopped_at + 1)),
                                                                    list(range(stopped_at + 1, 21))]
    sent = [{"step": h["step"]["num"], **{k: h["item"][f"train/{k}"] for k in EXACT_METRICS}}
            for run in history for h in run]
    assert sent == expected
    assert {k for k in history[1][-1]["item"] if not k.startswith("_")} == {
        f"train/{k}" for k in metrics(run_dir)[-1] if k != "step"}  # every figure, under TensorBoard's names

    traces = fsspec.filesystem("gs").glob(f"{run_dir}/profile/plugins/profile/*/*.xplane.pb")
    assert len(traces) == 1 and fsspec.filesystem("gs").size(traces[0]) > 0
    assert not list(tmp.glob("llama-jax-profile-*"))
    assert sorted(p.name for p in cwd.iterdir()) == []


def test_infer_generates_from_the_bucket_run(bucket, capsys):
    """Runs after the training test (same module, in order): its checkpoints are in the bucket."""
    from infer.__main__ import main

    if latest_step(f"{bucket}/run/checkpoints") is None:
        pytest.skip("needs the bucket run of the test above")
    code = main(["--checkpoint", f"{bucket}/run", "--tokenizer", f"{bucket}/tok", "--prompt", "the quick",
                 "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.startswith("brown fox")  # greedy: the corpus' sentence, learnt in 20 steps


def test_ours_to_hf_writes_to_the_bucket_what_it_writes_locally(bucket, tmp_path):
    """The same export, to gs:// and to a local directory: the same bytes; transformers loads the download."""
    import fsspec
    import transformers

    from llama_jax.convert.ours_to_hf import export_hf
    from llama_jax.paths import user_path

    checkpoints = f"{bucket}/run/checkpoints"
    if latest_step(f"{bucket}/run/checkpoints") is None:
        pytest.skip("needs the bucket run of the test above")
    export_hf(checkpoints, f"{bucket}/hf", dtype="float32", tokenizer=f"{bucket}/tok", show_progress=False)
    export_hf(checkpoints, tmp_path / "local", dtype="float32", tokenizer=f"{bucket}/tok", show_progress=False)
    fsspec.filesystem("gs").get(f"{bucket}/hf/", str(tmp_path / "download"), recursive=True)
    local = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir()}
    assert {p.name: p.read_bytes() for p in (tmp_path / "download").iterdir()} == local
    assert "tokenizer.model" in local
    assert not [p.name for p in user_path(bucket).iterdir() if ".partial-" in p.name]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "download")
    assert model.config.vocab_size == 256 and model.config.num_hidden_layers == 2
    weights = np.asarray(model.model.embed_tokens.weight.detach())
    assert weights.shape == (256, 64) and np.isfinite(weights).all()


# ---------------------------------------------------------------- bad input: one line each, nothing written

def _one_line(captured) -> str:
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_a_bucket_that_does_not_exist_is_one_line(gcs, tmp_path, capsys):
    from train.__main__ import main

    assert main(["--config", "tiny_cpu", "--quiet", "run_dir=gs://no-such-bucket/run", "steps=2"]) == 2
    assert _one_line(capsys.readouterr()) == (
        "train: error: gs://no-such-bucket/run: bucket gs://no-such-bucket does not exist; create it "
        "(gcloud storage buckets create gs://no-such-bucket) or fix the path")


def test_missing_credentials_say_how_to_provide_them(tmp_path, monkeypatch, capsys):
    """Outside the emulator, with no credentials anywhere: the line says how to give some."""
    from train.prepare import main

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-key.json"))
    (tmp_path / "a.txt").write_text("some text")
    code = main(["--tokenizer", "gs://some-bucket/tok", "--input", str(tmp_path / "a.txt"),
                 "--output", "gs://some-bucket/tokens", "--quiet"])
    assert code == 2
    line = _one_line(capsys.readouterr())
    assert line.startswith("prepare: error: gs://some-bucket/tok: no Google Cloud credentials found; ")
    assert "gcloud auth application-default login" in line and "GOOGLE_APPLICATION_CREDENTIALS" in line


def test_permission_denied_is_one_line(monkeypatch, capsys):
    import gcsfs

    from infer.__main__ import main

    with ForbiddenServer() as server:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
        monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        gcsfs.GCSFileSystem.clear_instance_cache()
        try:
            code = main(["--checkpoint", "gs://locked/run", "--prompt", "hi"])
        finally:
            gcsfs.GCSFileSystem.clear_instance_cache()
    assert code == 2
    assert _one_line(capsys.readouterr()) == (
        "error: gs://locked/run: permission denied by Cloud Storage; grant this account "
        "roles/storage.objectAdmin on the bucket (or use another bucket)")


@pytest.mark.parametrize("entry", ["run_dir", "config", "data_paths", "infer_checkpoint"])
def test_unreachable_storage_is_one_line_within_the_first_contact_bound(entry, tmp_path, monkeypatch, capsys):
    """STORAGE_EMULATOR_HOST at a closed port: each way a gs:// path comes in ends, within
    the first-contact bound (not gcsfs's ~70 s of retries), in one line naming the bucket and
    the fixes, with no library traceback and no local run directory."""
    import time

    import gcsfs

    import llama_jax.paths
    from infer.__main__ import main as infer
    from train.__main__ import main as train

    endpoint, local_run = closed_url(), tmp_path / "run"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    monkeypatch.setattr(llama_jax.paths, "FIRST_CONTACT_TIMEOUT", 3.0)
    path, prog, command = {
        "run_dir": ("gs://far/run", "train", lambda: train(["--config", "tiny_cpu", "--quiet", "run_dir=gs://far/run"])),
        "config": ("gs://far/run", "train", lambda: train(["--config", "gs://far/run", "--quiet"])),
        "data_paths": ("gs://far/tokens", "train", lambda: train(
            ["--config", "tiny_cpu", "--quiet", f"run_dir={local_run}", "data.source=tokens",
             "data.paths=[gs://far/tokens]"])),
        "infer_checkpoint": ("gs://far/run", None, lambda: infer(["--checkpoint", "gs://far/run", "--prompt", "hi"])),
    }[entry]
    gcsfs.GCSFileSystem.clear_instance_cache()
    started = time.monotonic()
    try:
        code = command()
    finally:
        gcsfs.GCSFileSystem.clear_instance_cache()
    elapsed = time.monotonic() - started
    assert code == 2
    assert _one_line(capsys.readouterr()) == (
        f"{prog + ': ' if prog else ''}error: {path}: bucket gs://far not reached in 3 s ({endpoint}); check the network, "
        "credentials (gcloud auth application-default login) or STORAGE_EMULATOR_HOST")
    assert elapsed < 20, elapsed  # the bound held: 3 s, plus start-up on a busy machine
    assert not local_run.exists()
