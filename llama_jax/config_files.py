"""The shipped YAML configs (`configs/models`, `configs/layouts`, `configs/runs`) and reading
one by name or path: what model, layout and run configs share before each parses its fields."""

from __future__ import annotations

from pathlib import Path

import yaml

from llama_jax.cli import first_line, known_names


def configs_root() -> Path:
    """The shipped `configs/` tree: inside the installed package (a wheel ships it as
    package data), or beside the package in a source checkout."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


def shipped_configs(kind: str) -> list[str]:
    """Names of the shipped configs of one kind: "models", "layouts" or "runs"."""
    return sorted(p.stem for p in (configs_root() / kind).glob("*.yaml"))


def read_config_file(kind: str, name_or_path: str | Path, error: type[Exception]) -> tuple[Path, dict]:
    """(path, mapping) of a YAML config given by path, or by name among `configs/<kind>/`.

    Raises `error` (one line) for a missing file, bad YAML or a top level that
    is not a mapping.
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = configs_root() / kind / f"{name_or_path}.yaml"
    if not path.is_file():
        what = {"models": "model config", "layouts": "layout", "runs": "run config"}[kind]
        raise error(f"{what} {str(name_or_path)!r} not found "
                    f"{known_names(path.stem, shipped_configs(kind), f'configs/{kind}/')}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML ({first_line(err)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(f"{path}: the top level must be a mapping of keys, got a {type(data).__name__}")
    return path, data
