"""Weights from wherever a user keeps them, for one model config, placed on given shardings.

    params = load_params("ckpt/llama3_2_1b", config, shardings)     # our checkpoint
    params = load_params("runs/sft", config, shardings)             # a training run (latest step)
    params = load_params("Llama-3.2-1B-Instruct/", config, shardings)  # Hugging Face

`config` is the model the weights go into: its architecture must be the
source's (one line naming the first field that differs); its compute fields
(dtypes, attention, ...) are its own. A LoRA run's checkpoint holds only the
adapters and names the weights they adapt (item "base"); loading it loads
that base too and joins the two. A vision run's checkpoint (adapter training,
no LoRA) likewise holds only the image adapters (`is_image_adapter`) over its
base's text model and image encoder. A score model (`head: score`, a reward or
value model) loads from a next-token model's weights too: all but its head,
the score head starting at zero.
"""

from __future__ import annotations

import json

import numpy as np
from etils import epath

from llama_jax.formats import checkpoint
from llama_jax.formats.checkpoint import CheckpointError, architecture_mismatch
from llama_jax.config import ModelConfig
from llama_jax.model.lora import is_adapter
from llama_jax.model.trees import join, partition
from llama_jax.paths import check_bucket, user_path
from llama_jax.vision.model import is_image_adapter
from llama_jax.formats.assemble import ParamsBuilder, checkpoint_weights, load_checkpoint_params
from llama_jax.formats.hf import hf_weights, load_hf_params, read_hf_config

BASE = "base"  # item of a LoRA (or vision adapter) run: {"path": the weights its adapters adapt}


def resolve(source) -> tuple[str, epath.Path]:
    """("hf" | "ours", directory) for a Hugging Face directory, our checkpoint directory, or a
    training run directory (its `checkpoints/`)."""
    check_bucket(source)
    path = user_path(source)
    if not path.is_dir():
        raise CheckpointError(f"{source}: directory not found")
    if (path / "config.json").is_file():
        return "hf", path
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if checkpoint.latest_step(path) is None:
        raise CheckpointError(f"{source}: neither a Hugging Face directory (config.json) nor a checkpoint "
                              "directory with a complete step")
    return "ours", path


def stored_config(source) -> ModelConfig:
    """The model config a source of weights was saved with."""
    kind, path = resolve(source)
    if kind == "hf":
        return read_hf_config(path)
    return checkpoint.read_config(path)


def check_architecture(source, stored: ModelConfig, config: ModelConfig) -> None:
    """CheckpointError (one line) naming the first architecture field on which they differ.

    Quantisation is left out: quantising weights as they load is the loader's
    to allow (or refuse, for re-quantising quantised ones); so is a score model's
    head over a next-token model's weights (`load_params` starts a reward or
    value model from a chat model so)."""
    head = stored.head if from_lm(stored, config) else config.head
    name = architecture_mismatch(stored, config.replace(quantize=stored.quantize, head=head))
    if name is not None:
        raise CheckpointError(f"{source}: its {name} is {getattr(stored, name)!r} but the model's is "
                              f"{getattr(config, name)!r} (a different architecture)")


def from_lm(stored: ModelConfig, config: ModelConfig) -> bool:
    """Whether `config` is a score model (a reward or value model) over `stored`'s next-token model."""
    return config.head == "score" and stored.head == "lm"


def _score_model_from_lm(kind: str, path, config: ModelConfig, shardings, step: int | None):
    """A score model `config` from a next-token model's weights (Llama 2 starts its reward models
    from the chat model): every weight but the next-token head, and the score head at zero (the
    first step's gradient moves it; HF's from_pretrained would draw it at random instead)."""
    lm = config.replace(head="lm")
    builder = ParamsBuilder(config, shardings)
    weights = hf_weights(path, lm) if kind == "hf" else checkpoint_weights(path, lm, step)
    for leaf, index, array in weights:
        if leaf[0] != "output":
            builder.add(leaf, index, array)
        del array
    builder.add(("score", "kernel"), None, np.zeros((config.dim, 1), np.float32))
    return builder.params()


def base_of(directory, step: int | None = None) -> str | None:
    """The weights a LoRA checkpoint's adapters adapt (its "base" item), or None."""
    step = checkpoint.resolve_step(directory, step)
    path = epath.Path(directory) / str(step) / BASE / "metadata"
    if not path.exists():
        return None
    return json.loads(path.read_text())["path"]


def load_params(source, config: ModelConfig, shardings=None, step: int | None = None):
    """The parameters of `config` from `source`, in `config`'s form (its dtypes, quantisation,
    scan or unrolled layers), read a tensor or layer slice at a time and placed on `shardings`
    (a tree like the params; None: numpy arrays); `step` of our checkpoints (default: the
    latest). CheckpointError (one line) for a source that is missing, of another
    architecture, or incomplete."""
    kind, path = resolve(source)
    stored = checkpoint.read_config(path, step) if kind == "ours" else stored_config(source)
    check_architecture(source, stored, config)
    if from_lm(stored, config):
        if config.lora is not None or (kind == "ours" and base_of(path, step) is not None):
            raise CheckpointError(f"{source}: a score model starts from whole next-token weights; merge the "
                                  "LoRA adapters first (python -m llama_jax.convert.lora merge), and train it "
                                  "without lora")
        return _score_model_from_lm(kind, path, config, shardings, step)
    if kind == "hf":
        if config.lora is not None:
            raise CheckpointError(f"{source}: a Hugging Face directory holds no LoRA adapters")
        return load_hf_params(path, config, shardings=shardings)[1]
    base = base_of(path, step)
    if base is None:
        return load_checkpoint_params(path, config, shardings, step)
    if stored.lora is None and stored.vision is not None:  # image adapters over the base's other weights
        adapters = checkpoint.restore_params(path, step, config=config, only=is_image_adapter)[1]
        rest = partition(load_params(base, config, shardings), is_image_adapter)[1]
        if shardings is not None:
            import jax
            adapters = jax.device_put(adapters, partition(shardings, is_image_adapter)[0])
        return join(rest, adapters)
    if config.lora is None or config.lora != stored.lora:
        raise CheckpointError(f"{source}: holds LoRA adapters ({stored.lora}); load it with that lora "
                              "config, or merge them first (python -m llama_jax.convert.lora merge)")
    adapter_shardings, base_shardings = (None, None) if shardings is None else partition(shardings, is_adapter)
    # Restored in the config's form (stacked or unrolled layers) on one device, then placed:
    # adapters are small, and `shardings` may be in either form.
    adapters = checkpoint.restore_params(path, step, config=config, only=is_adapter)[1]
    if adapter_shardings is not None:
        import jax
        adapters = jax.device_put(adapters, adapter_shardings)
    return join(load_params(base, config.replace(lora=None), base_shardings), adapters)
