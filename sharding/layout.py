"""Layouts: a mesh shape plus rules from logical axis names to mesh axes.

A layout is data, read from `configs/layouts/<name>.yaml`:

    mesh:
      ici: {data: 1, fsdp: -1, sequence: 1, tensor: 2}   # within a slice; -1 = the rest
      dcn: {data: 1, fsdp: 1, sequence: 1, tensor: 1}    # across slices
    rules:                      # ordered; the first rule whose mesh axes are
      - [batch, [data, fsdp]]   # still free in an array's spec wins, so a
      - [embed, fsdp]           # logical name may list fallbacks
      - [heads, tensor]
      - [head_dim, null]        # null: replicated

Every logical name the model uses must have at least one rule, so a typo in
a layout is an error rather than a silently replicated array. `expert` (the
experts of a mixture-of-experts layer) is checked against the model that
uses it: configs/layouts/expert_fsdp.yaml and expert_fsdp_tp.yaml map it onto `data`
(expert parallelism over the data-parallel devices), the other layouts replicate it.

Pipeline parallelism (configs/layouts/pipeline.yaml) splits `layers` and `stage`
over the `stage` mesh axis and may set its schedule:

    pipeline: {microbatches: 4, repeats: 1}   # llama_jax/model/pipeline.py
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from llama_jax.config_files import read_config_file, shipped_configs

MESH_AXES = ("stage", "data", "fsdp", "sequence", "tensor")  # outermost to innermost
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab",
                "layers", "kv_length", "expert", "stage")
# Names only some models use (`expert`: mixture-of-experts weights). A layout need not name them;
# `sharding.place.validate` refuses a model that uses one its layout has no rule for.
MODEL_SPECIFIC_AXES = ("expert",)
# Names a layout need not give a rule: the model's own optional ones, and `stage` (pipeline
# parallelism, llama_jax/model/pipeline.py), unsplit unless a layout splits it.
OPTIONAL_AXES = MODEL_SPECIFIC_AXES + ("stage",)
PIPELINE_KEYS = ("microbatches", "repeats")

Rule = tuple[str, "str | tuple[str, ...] | None"]


class LayoutError(ValueError):
    """A layout or mesh problem a user can fix; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """A named mesh shape (ICI and DCN sizes per axis) and logical-to-mesh rules."""

    name: str
    ici: dict[str, int]
    dcn: dict[str, int]
    rules: tuple[Rule, ...]
    # The pipeline's schedule when the rules split `stage` (microbatches 0: one a stage).
    pipeline: dict[str, int] = dataclasses.field(default_factory=lambda: {"microbatches": 0, "repeats": 1})

    def __post_init__(self):
        for part in ("ici", "dcn"):
            sizes = getattr(self, part)
            for axis, size in sizes.items():
                if axis not in MESH_AXES:
                    raise LayoutError(f"layout {self.name}: mesh.{part}.{axis} is not a mesh axis "
                                      f"(known: {', '.join(MESH_AXES)})")
                if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
                    raise LayoutError(f"layout {self.name}: mesh.{part}.{axis} must be a positive "
                                      f"integer or -1, got {size!r}")
            object.__setattr__(self, part, {a: sizes.get(a, 1) for a in MESH_AXES})
        if list(self.ici.values()).count(-1) + list(self.dcn.values()).count(-1) > 1:
            raise LayoutError(f"layout {self.name}: at most one mesh size may be -1")
        for logical, mesh_axes in self.rules:
            if logical not in LOGICAL_AXES:
                raise LayoutError(f"layout {self.name}: rule for unknown logical axis {logical!r} "
                                  f"(known: {', '.join(LOGICAL_AXES)})")
            for axis in axes_tuple(mesh_axes):
                if axis not in MESH_AXES:
                    raise LayoutError(f"layout {self.name}: rule {logical} -> {axis!r} names no mesh axis "
                                      f"(known: {', '.join(MESH_AXES)})")
        covered = {logical for logical, _ in self.rules}
        for logical in LOGICAL_AXES:
            if logical not in covered and logical not in OPTIONAL_AXES:
                raise LayoutError(f"layout {self.name}: logical axis {logical!r} has no rule "
                                  "(add one, with null to replicate)")

        if set(self.pipeline) - set(PIPELINE_KEYS):
            raise LayoutError(f"layout {self.name}: pipeline takes {' and '.join(PIPELINE_KEYS)}, "
                              f"got {sorted(self.pipeline)}")
        settings = {"microbatches": 0, "repeats": 1, **self.pipeline}
        for key, value in settings.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < (key == "repeats"):
                raise LayoutError(f"layout {self.name}: pipeline.{key} must be a positive integer, "
                                  f"got {value!r}")
        object.__setattr__(self, "pipeline", settings)

    def mesh_axes_of(self, logical: str) -> tuple[str, ...]:
        """Every mesh axis any rule may split `logical` over."""
        return tuple(a for name, axes in self.rules if name == logical for a in axes_tuple(axes))


def axes_tuple(mesh_axes) -> tuple[str, ...]:
    """A rule's mesh axes (None, one name or several) as a tuple of names."""
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def layout_from_dict(name: str, data: dict[str, Any]) -> Layout:
    """Build a Layout from the YAML structure in this module's docstring."""
    if not isinstance(data, dict):
        raise LayoutError(f"layout {name}: expected a mapping with keys mesh and rules, "
                          f"got {type(data).__name__}")
    if set(data) - {"mesh", "rules", "pipeline"}:
        raise LayoutError(f"layout {name}: expected keys mesh, rules and (optionally) pipeline, "
                          f"got {set(data) - {'mesh', 'rules', 'pipeline'}}")
    if not isinstance(data.get("pipeline") or {}, dict):
        raise LayoutError(f"layout {name}: pipeline must map microbatches and repeats to integers")
    mesh = data.get("mesh") or {}
    if not isinstance(mesh, dict):
        raise LayoutError(f"layout {name}: mesh must be a mapping with ici and dcn, "
                          f"got {type(mesh).__name__}")
    if set(mesh) - {"ici", "dcn"}:
        raise LayoutError(f"layout {name}: mesh takes ici and dcn, got {sorted(set(mesh))}")
    for part in ("ici", "dcn"):
        if not isinstance(mesh.get(part) or {}, dict):
            raise LayoutError(f"layout {name}: mesh.{part} must map mesh axes to sizes, "
                              f"got {mesh[part]!r}")
    if not isinstance(data.get("rules") or [], (list, tuple)):
        raise LayoutError(f"layout {name}: rules must be a list of [logical, mesh axes]")
    rules = []
    for rule in data.get("rules") or []:
        if not isinstance(rule, (list, tuple)) or len(rule) != 2:
            raise LayoutError(f"layout {name}: each rule is [logical, mesh axes], got {rule!r}")
        logical, axes = rule
        rules.append((logical, tuple(axes) if isinstance(axes, list) else axes))
    return Layout(name=name, ici=dict(mesh.get("ici") or {}), dcn=dict(mesh.get("dcn") or {}),
                  rules=tuple(rules), pipeline=dict(data.get("pipeline") or {}))


def load_layout(name_or_path: str | Path, **mesh_overrides: int) -> Layout:
    """Load a layout by name (`configs/layouts/<name>.yaml`) or path.

    `mesh_overrides` set ICI sizes, e.g. `load_layout("fsdp_tp", tensor=4)`.
    """
    path, data = read_config_file("layouts", name_or_path, LayoutError)
    layout = layout_from_dict(path.stem, data)
    if mesh_overrides:
        layout = dataclasses.replace(layout, ici={**layout.ici, **mesh_overrides})
    return layout


def available_layouts() -> list[str]:
    """Names of the shipped layouts."""
    return shipped_configs("layouts")
