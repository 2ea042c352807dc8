"""The floors of DESIGN.md and "no import cycles between files" are contracts that
import-linter checks (pyproject.toml's [tool.importlinter]), imports inside functions
included. These tests run it on the project, and on copies with one bad import
added, to show that a broken floor or a new cycle fails with the two modules named."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("llama_jax", "sharding", "train", "infer", "bench")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=300)


def _copy_with(tmp_path: Path, module: str, line: str) -> Path:
    """The project's packages and pyproject.toml copied to tmp_path, `line` added to `module`."""
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + f"\n\ndef _added():\n    {line}\n")
    return tmp_path


def test_the_project_keeps_its_import_contracts():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("module, line, named", [
    # model code reaching up into the training floor, from inside a function
    ("llama_jax.model.rope", "import train.loop", "llama_jax.model.rope -> train.loop"),
    # inference importing training
    ("infer.generate", "from train.step import make_train_step", "infer.generate -> train.step"),
])
def test_an_upward_import_breaks_the_floors_naming_both_modules(tmp_path, module, line, named):
    result = _lint(_copy_with(tmp_path, module, line))
    assert result.returncode != 0
    assert "Floors: bench -> train | infer -> sharding -> llama_jax BROKEN" in result.stdout, result.stdout
    assert named in result.stdout, result.stdout


def test_a_cycle_between_two_files_fails_naming_both(tmp_path):
    # llama.py imports rope.py; rope.py importing llama.py back closes a circle
    result = _lint(_copy_with(tmp_path, "llama_jax.model.rope", "from llama_jax.model import llama"))
    assert result.returncode != 0
    assert "No import cycles between sibling modules or packages BROKEN" in result.stdout, result.stdout
    assert "No cycles are allowed in llama_jax.model." in result.stdout, result.stdout
    assert ".rope -> .llama" in result.stdout or ".llama -> .rope" in result.stdout, result.stdout
