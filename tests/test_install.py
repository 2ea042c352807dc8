"""A wheel install (not editable) works from any folder: configs ship inside the package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _venv_with_wheel(tmp_path: Path) -> Path:
    """A fresh venv holding only our wheel; its dependencies come from this interpreter's
    site-packages through a .pth line (which, unlike a site dir, runs no editable finder)."""
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("llama_jax", "sharding", "train", "infer", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", str(source), "--no-deps",
                    "--no-build-isolation", "-w", str(wheels)], check=True, capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    [wheel] = wheels.glob("llama_jax-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    return python


def test_wheel_install_trains_a_shipped_run_config_from_another_folder(tmp_path):
    python = _venv_with_wheel(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    where = subprocess.run([str(python), "-c", "import llama_jax; print(llama_jax.__file__)"],
                           cwd=elsewhere, env=env, check=True, capture_output=True, text=True).stdout
    assert str(tmp_path / "venv") in where, f"llama_jax came from {where}, not the wheel"
    # the offline lm-eval tasks ship as package data (train/lm_eval/tasks/, docs/evaluation.md)
    shipped = {p.name for p in (Path(where.strip()).parent.parent / "train" / "lm_eval" / "tasks").iterdir()}
    assert {"llama_jax_tiny_choice.yaml", "llama_jax_tiny_rolling.yaml", "llama_jax_tiny_until.yaml",
            "tiny_facts.jsonl", "tiny_docs.jsonl", "local_json.py"} <= shipped, shipped

    run = subprocess.run([str(python), "-m", "train", "--config", "tiny_cpu", "--quiet", "steps=2",
                          "log_every=1", "checkpoint_every=2", "run_dir=run"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in (elsewhere / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (elsewhere / "run" / "checkpoints" / "2").is_dir()
