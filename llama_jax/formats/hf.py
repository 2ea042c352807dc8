"""Hugging Face Llama checkpoints: config.json and the weight-name table.

One table, `HF_WEIGHTS`, maps every Hugging Face tensor name to a leaf of our
parameter tree and says how its layout differs. Reading and writing both go
through it, so a name is never spelled twice. `hf_tensors(config)` lists a
config's tensors from it (from llama_jax/formats/mllama.py's table, which builds on
this one, for Llama 3.2 Vision).
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from llama_jax.config import ConfigError, ModelConfig, RopeScaling
from llama_jax.paths import user_path
from llama_jax.formats.safetensors_io import CheckpointFileError, SafetensorsCheckpoint


class WeightRule(NamedTuple):
    """Where one HF tensor lives in our tree and how it is laid out there."""

    hf_name: str          # with "{i}" for the layer index
    path: tuple[str, ...]  # our leaf, below the "layers" stack for per-layer weights
    kind: str             # how to turn HF [out, in] into ours; see to_ours


HF_WEIGHTS = (
    WeightRule("model.embed_tokens.weight", ("embed", "embedding"), "copy"),
    WeightRule("model.norm.weight", ("norm", "scale"), "copy"),
    WeightRule("lm_head.weight", ("output", "kernel"), "linear"),
    WeightRule("model.layers.{i}.input_layernorm.weight", ("attention_norm", "scale"), "copy"),
    WeightRule("model.layers.{i}.post_attention_layernorm.weight", ("ffn_norm", "scale"), "copy"),
    WeightRule("model.layers.{i}.self_attn.q_proj.weight", ("attention", "wq", "kernel"), "heads_out"),
    WeightRule("model.layers.{i}.self_attn.k_proj.weight", ("attention", "wk", "kernel"), "heads_out"),
    WeightRule("model.layers.{i}.self_attn.v_proj.weight", ("attention", "wv", "kernel"), "heads_out"),
    WeightRule("model.layers.{i}.self_attn.o_proj.weight", ("attention", "wo", "kernel"), "heads_in"),
    WeightRule("model.layers.{i}.mlp.gate_proj.weight", ("feed_forward", "w1", "kernel"), "linear"),
    WeightRule("model.layers.{i}.mlp.up_proj.weight", ("feed_forward", "w3", "kernel"), "linear"),
    WeightRule("model.layers.{i}.mlp.down_proj.weight", ("feed_forward", "w2", "kernel"), "linear"),
)


def to_ours(kind: str, weight: np.ndarray, head_dim: int, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """One HF tensor ([out, in] for linears) in our layout ([in, ...out]).

    `shape` is our leaf's shape, which the "flat" kind (HF flattens all axes
    after the first) needs.
    """
    if kind == "copy":
        return weight
    if kind == "flat":
        return weight.reshape(shape)
    if kind == "linear":
        return weight.T
    if kind == "heads_out":  # [heads*head_dim, dim] -> [dim, heads, head_dim]
        return weight.T.reshape(weight.shape[1], -1, head_dim)
    if kind == "heads_in":   # [dim, heads*head_dim] -> [heads, head_dim, dim]
        return weight.T.reshape(-1, head_dim, weight.shape[0])
    raise ValueError(f"unknown weight kind {kind!r}")


def to_hf(kind: str, leaf: np.ndarray) -> np.ndarray:
    """The inverse of `to_ours`: our leaf back to HF's [out, in] layout."""
    if kind == "copy":
        return leaf
    if kind == "flat":
        return leaf.reshape(leaf.shape[0], -1)
    if kind == "linear":
        return leaf.T
    if kind == "heads_out":
        return leaf.reshape(leaf.shape[0], -1).T
    if kind == "heads_in":
        return leaf.reshape(-1, leaf.shape[-1]).T
    raise ValueError(f"unknown weight kind {kind!r}")


class HFTensor(NamedTuple):
    """One HF tensor (or a block of its rows) and the leaf of ours it is."""

    name: str                     # the HF tensor's name
    path: tuple[str, ...]         # our leaf, in scan layout
    index: int | None             # the slice of a stacked leaf, None for the whole leaf
    kind: str                     # how its layout differs, see to_ours
    head_dim: int                 # for the heads_out / heads_in kinds
    rows: tuple[int, int] | None = None   # [start, stop) of the HF tensor's rows, None for all


def hf_tensors(config: ModelConfig) -> list[HFTensor]:
    """Every HF tensor of this config: the global ones, then each per-layer name for every layer."""
    if config.vision is not None:
        from llama_jax.formats.mllama import mllama_tensors  # late: it builds on this module

        return mllama_tensors(config)
    from llama_jax.model.params import layer_location  # late: params imports the model

    scanned = config.replace(scan_layers=True)  # fp8 keeps the first and last layers out of the stack
    return text_tensors(config, range(config.n_layers), lambda i: layer_location(i, (), scanned)[0],
                        lambda i: layer_location(i, (), scanned)[1])


def text_tensors(config: ModelConfig, hf_layers, stack, index, prefix: str = "",
                 embedding_rows: tuple[int, int] | None = None) -> list[HFTensor]:
    """The text model's tensors from `HF_WEIGHTS`, their names prefixed with `prefix`.

    `hf_layers` are HF's indices of the decoder layers; layer i goes to our
    stacked leaf under `stack(i)`, slice `index(i)` (Llama: ("layers",), i).
    `embedding_rows` keeps part of HF's embedding (its first vocab_size rows).
    """
    out = []
    for rule in HF_WEIGHTS:
        if rule.path[0] == "output" and config.tie_embeddings:
            continue
        if "{i}" in rule.hf_name:
            out += [HFTensor(prefix + rule.hf_name.format(i=i), stack(i) + rule.path, index(i), rule.kind,
                             config.head_dim) for i in hf_layers]
        else:
            rows = embedding_rows if rule.path[0] == "embed" else None
            out.append(HFTensor(prefix + rule.hf_name, rule.path, None, rule.kind, config.head_dim, rows))
    return out


# ---------------------------------------------------------------- config.json

def config_from_hf(hf: dict[str, Any], **overrides) -> ModelConfig:
    """Our ModelConfig from a HF `config.json` dict (transformers 4.x or 5.x form)."""
    if hf.get("model_type", "llama") != "llama":
        raise ConfigError(f"config.json: model_type {hf.get('model_type')!r} is not llama")
    # transformers 5.x keeps theta and scaling in rope_parameters; 4.x at top level.
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = rope if rope.get("rope_type", "default") != "default" else hf.get("rope_scaling")
    rope_scaling = None
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type != "llama3":
            raise ConfigError(f"config.json: rope type {rope_type!r} is not supported (known: llama3)")
        rope_scaling = RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_context=int(scaling["original_max_position_embeddings"]))
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError("config.json: attention_bias/mlp_bias are not part of Llama")
    # The stored dtype (transformers 5.x: "dtype", 4.x: "torch_dtype") is the default
    # compute and parameter dtype, as transformers itself loads the files.
    stored = hf.get("dtype") or hf.get("torch_dtype")
    dtypes = {"dtype": stored, "param_dtype": stored} if stored in ("bfloat16", "float32", "float16") else {}
    try:
        fields = dict(
            dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            ffn_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"],
            rope_theta=float(theta), rope_scaling=rope_scaling,
            max_seq_len=hf.get("max_position_embeddings", 4096), norm_eps=hf.get("rms_norm_eps", 1e-5),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), head_dim=hf.get("head_dim"), **dtypes)
    except KeyError as err:
        raise ConfigError(f"config.json: missing field {err.args[0]}") from None
    return ModelConfig(**{**fields, **overrides})


def config_to_hf(config: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """A HF `config.json` dict readable by transformers 4.x and 5.x.

    Rope settings are written in both forms: 4.x ignores `rope_parameters`
    and would silently fall back to theta 10000 without `rope_theta`. A
    config with a vision section gives a Mllama config.json (vision/hf.py).
    """
    if config.vision is not None:
        from llama_jax.formats.mllama import config_to_mllama  # late: it builds on this module

        return config_to_mllama(config, torch_dtype)
    scaling = None
    if config.rope_scaling is not None:
        s = config.rope_scaling
        scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_context}
    rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    if scaling:
        rope_parameters = {**scaling, "rope_theta": config.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": config.dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "intermediate_size": config.ffn_dim, "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "rope_theta": config.rope_theta,
        "rope_scaling": scaling, "rope_parameters": rope_parameters, "torch_dtype": torch_dtype,
        "dtype": torch_dtype, "bos_token_id": None, "eos_token_id": None,
    }


def read_hf_config(directory: str | os.PathLike, **overrides) -> ModelConfig:
    """Our ModelConfig from `directory/config.json`."""
    path = user_path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointFileError(f"{path}: file not found")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointFileError(f"{path}: not valid JSON ({err.msg})") from None
    if hf.get("model_type") == "mllama":
        from llama_jax.formats.mllama import config_from_mllama

        return config_from_mllama(hf, user_path(directory), **overrides)
    return config_from_hf(hf, **overrides)


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
    from llama_jax.formats.assemble import ParamsBuilder  # late: assemble imports the model

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
    from llama_jax.model.params import layer_location, layer_of  # late: params imports the model

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
    from llama_jax.model.params import abstract_params  # late: params imports the model

    return abstract_params(config)


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


