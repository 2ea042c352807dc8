"""Hugging Face checkpoints, Llama, Llama 3.2 Vision (Mllama) or Llama 4 text: config.json and tensors.

The weight tables are hf_llama.py (the text model), mllama.py (which builds
on it) and hf_llama4.py (Llama4ForCausalLM); this module picks the one a
config (or a config.json's model_type) needs and reads the files:
`read_hf_config`, `read_hf_tensors`, `hf_weights` (streamed, one tensor at a
time) and `load_hf_params`; `hf_tensors` and `config_to_hf` serve writers.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Iterator, Sequence

import numpy as np
from etils import epath

from llama_jax.config import ConfigError, ModelConfig
from llama_jax.formats.assemble import ParamsBuilder
from llama_jax.formats.hf_llama import HFTensor, text_config_from_hf, text_config_to_hf, text_tensors, to_ours
from llama_jax.formats.hf_llama4 import config_from_llama4, config_to_llama4, is_llama4, llama4_tensors
from llama_jax.formats.mllama import config_from_mllama, config_to_mllama, mllama_tensors
from llama_jax.formats.safetensors_io import CheckpointFileError, SafetensorsCheckpoint
from llama_jax.params import abstract_params, layer_location, layer_of
from llama_jax.paths import user_path


def hf_tensors(config: ModelConfig) -> list[HFTensor]:
    """Every HF tensor of this config: the global ones, then each per-layer name for every layer."""
    if config.vision is not None:
        return mllama_tensors(config)
    if is_llama4(config):
        if config.head != "lm":
            raise ConfigError("head: a Llama 4 model is read and written with its next-token head only")
        return llama4_tensors(config)
    scanned = config.replace(scan_layers=True)  # fp8 keeps the first and last layers out of the stack
    return text_tensors(config, range(config.n_layers), lambda i: layer_location(i, (), scanned)[0],
                        lambda i: layer_location(i, (), scanned)[1])


def config_from_hf(hf: dict[str, Any], directory: epath.Path | None = None, **overrides) -> ModelConfig:
    """Our ModelConfig from a HF `config.json` dict: Llama (transformers 4.x or 5.x form) or
    Mllama (whose `directory`'s preprocessor_config.json gives the pixel statistics)."""
    if hf.get("model_type") == "mllama":
        return config_from_mllama(hf, directory, **overrides)
    if hf.get("model_type") == "llama4_text":
        return config_from_llama4(hf, **overrides)
    if hf.get("model_type") == "llama4":
        raise ConfigError("config.json: a Llama4ForConditionalGeneration (text and images) checkpoint; "
                          "only the text model's Llama4ForCausalLM format is read (docs/llama4.md)")
    return text_config_from_hf(hf, **overrides)


def config_to_hf(config: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """A HF `config.json` dict readable by transformers 4.x and 5.x: Mllama's for a config with a
    vision section, else Llama's."""
    if config.vision is not None:
        return config_to_mllama(config, torch_dtype)
    if is_llama4(config):
        return config_to_llama4(config, torch_dtype)
    return text_config_to_hf(config, torch_dtype)


def read_hf_config(directory: str | os.PathLike, **overrides) -> ModelConfig:
    """Our ModelConfig from `directory/config.json`."""
    path = user_path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointFileError(f"{path}: file not found")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointFileError(f"{path}: not valid JSON ({err.msg})") from None
    try:
        return config_from_hf(hf, user_path(directory), **overrides)
    except ConfigError as err:  # name the file: which of several sources (init_from, teacher) it is
        raise ConfigError(f"{path}: {str(err).removeprefix('config.json: ')}") from None


# ---------------------------------------------------------------- weights

def read_hf_tensors(directory: str | os.PathLike, config: ModelConfig, tensors: Sequence[HFTensor] | None = None
                    ) -> Iterator[tuple[tuple[str, ...], int | None, np.ndarray]]:
    """Yield (our path in scan layout, index along its stacked axis or None, array in our layout).

    Shapes are checked against the config; a missing or misshapen tensor is a
    CheckpointFileError naming it. `tensors` (entries of `hf_tensors(config)`)
    limits the walk to those. Each tensor is read into a new array when its
    turn comes; a suspended generator still holds the last one, so a
    streaming reader asks for one tensor per call.
    """
    shapes = _abstract_shapes(config.replace(scan_layers=True))
    checkpoint = SafetensorsCheckpoint(directory)
    for t in hf_tensors(config) if tensors is None else tensors:
        if t.name not in checkpoint:
            raise CheckpointFileError(f"{directory}: checkpoint is missing tensor {t.name}")
        expected = tuple(_leaf(shapes, t.path).shape[0 if t.index is None else 1:])
        misfit = CheckpointFileError(f"{directory}: tensor {t.name} has shape {checkpoint.shape(t.name)}, "
                                     f"which does not fit the config (expected {expected} in our layout)")
        if t.rows is None:
            source = checkpoint.get(t.name)
        elif checkpoint.shape(t.name)[:1] < (t.rows[1],):
            raise misfit
        else:
            source = checkpoint.get(t.name, rows=t.rows)
        if t.kind == "flat" and source.size != math.prod(expected):
            raise misfit
        weight = to_ours(t.kind, source, t.head_dim, expected)
        if tuple(weight.shape) != expected:
            raise misfit
        yield t.path, t.index, weight


def load_hf_params(directory: str | os.PathLike, config: ModelConfig | None = None, dtype=None, shardings=None):
    """Read a HF checkpoint directory into our parameter tree, tensor by tensor.

    Returns (config, params). config: the target (param_dtype, quantize,
    scan_layers); default: `read_hf_config` (the files' stored dtype).
    `dtype` (e.g. np.float32) sets param_dtype. shardings: a tree like the
    params of jax Shardings; each tensor is then placed as it is read (see
    `llama_jax.formats.assemble`), and host memory holds one tensor at a time beyond
    the placed model. None gives numpy arrays.
    """
    config = config or read_hf_config(directory)
    if dtype is not None:
        config = config.replace(param_dtype=np.dtype(dtype).name)
    builder = ParamsBuilder(config, shardings)
    for path, index, weight in hf_weights(directory, config):
        builder.add(path, index, weight)
        del weight
    return config, builder.params()


def hf_weights(directory: str | os.PathLike, config: ModelConfig) -> Iterator[tuple[tuple[str, ...], int | None, np.ndarray]]:
    """Every weight as `read_hf_tensors` yields them, at its place in `config`'s tree (stacked or
    unrolled), one tensor per step, holding no reference to it while suspended: once the
    caller drops (or converts) a tensor it is freed, so a streaming reader holds one at a time."""
    scanned = config.replace(scan_layers=True)
    for tensor in hf_tensors(config):
        # Running the reader to its end and popping the one result leaves neither this
        # frame nor the reader's holding the array while the caller works on it.
        found = list(read_hf_tensors(directory, config, [tensor]))
        path, index = found[0][:2]
        if path[0] == "layers":  # the decoder stack: stacked or unrolled as `config` says
            path, index = layer_location(*layer_of(path, index, scanned), config)
        # (elsewhere, as in an image encoder's own stack, the layout is fixed)
        yield path, index, found.pop()[2]


@functools.lru_cache(maxsize=8)
def _abstract_shapes(config: ModelConfig):
    return abstract_params(config)


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


