"""Weights & Biases logging (train/tracking/wandb_logging.py): failures are one line; wandb stays unimported
unless asked for (bad settings: tests/test_train.py).

The end-to-end test rides on two training runs of tests/test_storage.py (a run whose save
loses its connection, and the rerun that resumes it): both log to W&B offline, and what
W&B recorded, read back with wandb's own reader, is compared with metrics.jsonl."""

from __future__ import annotations

import sys

import pytest

from train_runs import metrics

WANDB = "metrics.wandb={project: llama-jax-tests, name: tiny}"


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
    from train.tracking.wandb_logging import WandbRun

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


def test_a_run_without_wandb_settings_never_imports_it(tmp_path, monkeypatch):
    """With wandb unimportable, a run config without metrics.wandb and its metrics writer work."""
    from train.config import load_run_config
    from train.tracking.metrics import MetricsWriter

    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` would raise
    assert load_run_config("tiny_cpu").metrics.wandb is None
    writer = MetricsWriter(tmp_path)
    writer.write(1, {"loss": 1.5})
    writer.close()
    assert metrics(tmp_path) == [{"step": 1, "loss": 1.5}]
