"""Weights & Biases logging (train/wandb_logging.py), offline: what W&B recorded is read back
with wandb's own reader of its run files (`wandb leet inspect --json`) and compared with
metrics.jsonl, value for value."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from train_runs import EXACT_METRICS, cli, finish, metrics, start

TIMEOUT = 150  # seconds for one tiny run of `python -m train` on a busy 2-core machine
WANDB = "metrics.wandb={project: llama-jax-tests, name: tiny}"


def _records(run_files) -> list[dict]:
    """Every record of one offline W&B run directory, as wandb's CLI prints them."""
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_files)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def _of_type(records, kind: str) -> list[dict]:
    return [r[kind] for r in records if r["type"] == kind]


def test_offline_wandb_run_holds_the_metrics_of_metrics_jsonl_and_resumes_without_repeats(
        tmp_path, monkeypatch):
    """A 4-step run logs to W&B offline; its last checkpoint is then removed, as a kill between
    step 4's row and its save's commit leaves it. The same command continued to step 6 resumes
    from step 2 and the same W&B run: steps 3 and 4, recomputed bit for bit, are not sent
    again, so W&B holds each step once, with metrics.jsonl's values."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")  # nothing leaves the machine
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    settings = ("log_every=1", "checkpoint_every=2", "optimizer.decay=constant", WANDB)

    first = start(cli(run_dir, "steps=4", *settings), tmp_path / "first.log", compilation_cache=cache)
    output = finish(first, tmp_path / "first.log", TIMEOUT)
    assert first.returncode == 0, output
    shutil.rmtree(run_dir / "checkpoints" / "4")
    second = start(cli(run_dir, "steps=6", *settings), tmp_path / "second.log", compilation_cache=cache)
    output = finish(second, tmp_path / "second.log", TIMEOUT)
    assert second.returncode == 0, output
    assert f"resuming from {run_dir / 'checkpoints' / '2'}" in output

    run_id = json.loads((run_dir / "wandb.json").read_text())["id"]
    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))  # named by start time
    assert [p.name.rsplit("-", 1)[1] for p in runs] == [run_id, run_id]
    records = [_records(p) for p in runs]
    configs = [_of_type(r, "run")[0] for r in records]
    assert [c["run_id"] for c in configs] == [run_id, run_id]
    assert [c["config"]["update"]["steps"] for c in configs] == [4, 6]  # the run config, as logged
    assert configs[0]["config"]["update"]["metrics"]["wandb"]["project"] == "llama-jax-tests"
    assert [[e["exit_code"] for e in _of_type(r, "exit")] for r in records] == [[0], [0]]

    history = [_of_type(r, "history") for r in records]
    assert [[h["step"]["num"] for h in run] for run in history] == [[1, 2, 3, 4], [5, 6]]
    logged = {h["step"]["num"]: h["item"] for run in history for h in run}
    rows = {row["step"]: row for row in metrics(run_dir)}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    for step, row in rows.items():
        sent = {k: v for k, v in logged[step].items() if not k.startswith("_")}
        assert set(sent) == {f"train/{k}" for k in row if k != "step"}, step  # TensorBoard's names
        # Steps 3 and 4 in metrics.jsonl are the second run's recomputation: the same
        # figures; their timings (tokens/s, MFU) are the first run's in W&B.
        exact = EXACT_METRICS if step in (3, 4) else row.keys() - {"step"}
        assert {k: sent[f"train/{k}"] for k in exact if k in row} == {k: row[k] for k in exact if k in row}, step


def test_a_missing_wandb_package_is_one_line_before_anything_runs(tmp_path, monkeypatch, capsys):
    from train.__main__ import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as if not installed
    run_dir = tmp_path / "run"
    assert main(["--config", "tiny_cpu", "--quiet", f"run_dir={run_dir}", "steps=2", WANDB]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["train: error: metrics.wandb: the wandb package is not installed; "
                     "pip install 'llama-jax[wandb]' (or remove metrics.wandb from the run config)"]
    assert not run_dir.exists()


def test_online_without_credentials_is_one_line(tmp_path, monkeypatch):
    from llama_jax.config import ConfigError
    from train.config import WandbConfig
    from train.wandb_logging import WandbRun

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    with pytest.raises(ConfigError) as caught:
        WandbRun(WandbConfig(project="p", mode="online"), tmp_path / "run", {})
    assert str(caught.value) == (
        "metrics.wandb: W&B could not start the run (No API key configured. Use `wandb login` to log in.); "
        "run `wandb login` or set WANDB_API_KEY, or log offline (metrics.wandb.mode=offline)")
    assert not (tmp_path / "run" / "wandb.json").exists()


@pytest.mark.parametrize("override, message", [
    ("metrics.tensorboard=false", "metrics.tensorboard: unknown key (known: wandb)"),
    ("metrics.wandb.projekt=p", "metrics.wandb.projekt: unknown key (known: entity, mode, name, project)"),
    ("metrics.wandb={name: run-1}", "metrics.wandb.project: required: the W&B project to log to"),
    ("metrics.wandb={project: p, mode: cloud}", "metrics.wandb.mode: 'cloud' is not one of online, offline, disabled"),
    ("metrics=[wandb]", "metrics: expected a mapping, got list"),
])
def test_bad_wandb_settings_are_one_line(override, message):
    from llama_jax.config import ConfigError
    from train.config import load_run_config

    with pytest.raises(ConfigError) as caught:
        load_run_config("tiny_cpu", [override])
    assert str(caught.value) == message


def test_a_run_without_wandb_settings_never_imports_it(tmp_path, monkeypatch):
    """With wandb unimportable, a run config without metrics.wandb and its metrics writer work."""
    from train.config import load_run_config
    from train.metrics import MetricsWriter

    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` would raise
    assert load_run_config("tiny_cpu").metrics.wandb is None
    writer = MetricsWriter(tmp_path)
    writer.write(1, {"loss": 1.5})
    writer.close()
    assert metrics(tmp_path) == [{"step": 1, "loss": 1.5}]
