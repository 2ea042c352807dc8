"""ModelConfig: the fields of the published Llama table plus compute choices.

Behaviour follows from fields (`n_kv_heads`, `rope_scaling`, `tie_embeddings`),
never from a model's name. Every value is validated on construction, and a bad
one is reported in one line that names the field.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from llama_jax.config_files import read_config_file, shipped_configs
# The nested parts, imported here too: callers name them as fields of ModelConfig's module.
from llama_jax.config_parts import (ConfigError, LayerKind, LoraConfig, MoeConfig,  # noqa: F401
                                    RopeScaling, TemperatureTuning, VisionConfig, check_keys)


# What each `remat` setting keeps from a layer's forward pass: a policy of
# jax.checkpoint_policies by name, or the names of the values it saves
# (checkpoint_name in llama_jax/model/llama.py); "none" recomputes nothing.
REMAT_POLICIES = {
    "none": None,
    "full": "nothing_saveable",
    "dots": "checkpoint_dots",
    "dots_no_batch": "dots_with_no_batch_dims_saveable",
    "save_attention_out": ("attention_out",),
}
ATTENTION_IMPLS = ("auto", "xla", "blocked", "splash")  # see llama_jax/model/attention.py
SWIGLU_BACKWARDS = ("auto", "manual", "autodiff")  # see llama_jax/model/swiglu.py
DTYPES = ("float32", "bfloat16", "float16")
ROPE_TYPES = ("default", "llama3")
# Stored weight formats (llama_jax/model/quantize.py) and the projections each one replaces.
# int8: every projection of every layer. fp8: the Llama 3 405B recipe, the feed-forward
# weights only (about half the inference compute; attention is more sensitive), and
# not in the first and last layers (see `ModelConfig.stacked_layers`).
QUANTIZE_TARGETS = {"int8": ("wq", "wk", "wv", "wo", "w1", "w2", "w3"), "fp8": ("w1", "w2", "w3")}
KV_CACHE_DTYPES = ("int8", "fp8")  # quantised caches; None stores keys and values in `dtype`
# What the model puts on its final hidden states: next-token logits ("lm"), or one scalar a
# position ("score": a reward or value model, llama_jax/model/reward.py).
HEADS = ("lm", "score")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One Llama model: architecture (REFERENCE.md's table) and compute choices.

    `dtype` is the activation/compute dtype, `param_dtype` the stored weights'.
    `remat` picks what the backward pass recomputes; `scan_layers` stacks the
    decoder layers under one `nn.scan` (False unrolls them, for debugging).
    `attention` picks the attention implementation (llama_jax/model/attention.py;
    `auto`: the splash kernel on TPU) and `attention_block` its block size in
    tokens; `swiglu_backward` the feed-forward's backward pass
    (llama_jax/model/swiglu.py; `auto`: hand-written on CPU only).
    `quantize` ("int8" or "fp8") stores the projections of QUANTIZE_TARGETS
    quantised, each beside its float32 `scale` (llama_jax/model/quantize.py);
    `kv_cache_dtype` ("int8" or "fp8") quantises the KV cache per token and head.

    Llama 4 (docs/llama4.md): `moe` makes some feed-forwards mixtures of experts;
    every `nope_layer_interval`-th layer (i + 1 divisible by it) is a NoPE
    layer (no rotary embeddings, global attention, queries scaled by
    `attn_temperature_tuning`); the others attend within chunks of
    `attention_chunk_size` positions, and with `qk_norm` their queries and
    keys are L2-normalised (RMS norm without weight) after the rotation.

    `head` "score" replaces the next-token head with a regression head, `score`
    [dim, 1] without bias (Hugging Face's LlamaForSequenceClassification with
    one label): the model gives one float32 scalar a position, a reward model's
    or a value model's (llama_jax/model/reward.py).
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    head_dim: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True
    attention: str = "auto"
    attention_block: int = 512
    swiglu_backward: str = "auto"
    lora: LoraConfig | None = None
    vision: VisionConfig | None = None
    quantize: str | None = None
    kv_cache_dtype: str | None = None
    moe: MoeConfig | None = None
    attention_chunk_size: int | None = None
    nope_layer_interval: int | None = None
    qk_norm: bool = False
    attn_temperature_tuning: TemperatureTuning | None = None
    head: str = "lm"

    def __post_init__(self):
        if self.head_dim is None:
            if self.n_heads > 0 and self.dim % self.n_heads:
                raise ConfigError(
                    f"n_heads: {self.n_heads} does not divide dim {self.dim} "
                    "(set head_dim explicitly if that is intended)")
            object.__setattr__(self, "head_dim", self.dim // max(self.n_heads, 1))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", _rope_scaling_from_dict(self.rope_scaling))
        if isinstance(self.lora, dict):
            check_keys(LoraConfig, self.lora, "lora.", "unknown field")
            object.__setattr__(self, "lora", LoraConfig(**self.lora))
        if isinstance(self.vision, dict):
            check_keys(VisionConfig, self.vision, "vision.", "unknown field")
            missing = [f.name for f in dataclasses.fields(VisionConfig)
                       if f.default is dataclasses.MISSING and f.name not in self.vision]
            if missing:
                raise ConfigError(f"vision.{missing[0]}: required field is missing")
            object.__setattr__(self, "vision", VisionConfig(**self.vision))
        for name, cls in (("moe", MoeConfig), ("attn_temperature_tuning", TemperatureTuning)):
            value = getattr(self, name)
            if isinstance(value, dict):
                check_keys(cls, value, f"{name}.", "unknown field")
                missing = [f.name for f in dataclasses.fields(cls)
                           if f.default is dataclasses.MISSING and f.name not in value]
                if missing:
                    raise ConfigError(f"{name}.{missing[0]}: required field is missing")
                object.__setattr__(self, name, cls(**value))
        self._validate()

    def _validate(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                     "vocab_size", "max_seq_len", "head_dim", "attention_block"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_kv_heads: {self.n_kv_heads} does not divide n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim: must be even for rotary embeddings, got {self.head_dim}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name}: must be a positive number, got {value!r}")
        for name, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES),
                              ("remat", REMAT_POLICIES), ("attention", ATTENTION_IMPLS),
                              ("swiglu_backward", SWIGLU_BACKWARDS), ("head", HEADS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name, allowed in (("quantize", tuple(QUANTIZE_TARGETS)), ("kv_cache_dtype", KV_CACHE_DTYPES)):
            if getattr(self, name) is not None and getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)} "
                                  "(or null for none)")
        if self.quantize == "fp8" and self.n_layers < 3:
            raise ConfigError(f"quantize: fp8 keeps the first and last layers in {self.param_dtype}, so it "
                              f"needs at least 3 layers (this model has {self.n_layers}); use int8")
        for name in ("attention_chunk_size", "nope_layer_interval"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name}: must be a positive integer or null, got {value!r}")
        if self.n_layers % self.layer_period:
            raise ConfigError(f"n_layers: {self.n_layers} is not a whole number of repeats of the "
                              f"{self.layer_period}-layer pattern (nope_layer_interval, moe.interleave_step)")
        if self.head != "lm" and self.vision is not None:
            raise ConfigError(f"head: {self.head!r} is for text models; a vision model keeps the next-token head")
        if self.moe is not None and self.vision is not None:
            raise ConfigError("moe: mixture-of-experts layers take no vision section")
        for name in ("tie_embeddings", "scan_layers", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        scaling = self.rope_scaling
        if scaling is not None:
            if scaling.factor <= 0 or scaling.original_context <= 0:
                raise ConfigError("rope_scaling: factor and original_context must be positive")
            # Llama 4 Scout has low_freq_factor == high_freq_factor (1): a sharp cut, no blend.
            if not 0 < scaling.low_freq_factor <= scaling.high_freq_factor:
                raise ConfigError(
                    "rope_scaling: need 0 < low_freq_factor <= high_freq_factor, got "
                    f"{scaling.low_freq_factor} and {scaling.high_freq_factor}")
        if self.lora is not None:
            self._check_lora_rank()
        if self.vision is not None:
            self.vision.group(self.n_layers)
            if self.vision.image_token_id >= self.vocab_size + self.vision.extra_token_rows:
                raise ConfigError(
                    f"vision.image_token_id: {self.vision.image_token_id} is past the embedding's "
                    f"{self.vocab_size} + {self.vision.extra_token_rows} rows")
            if self.tie_embeddings:
                raise ConfigError("tie_embeddings: a vision model's output head is its own weight")

    def _check_lora_rank(self):
        """A rank at or past a target's smaller side adds parameters and no expressiveness."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        widths = [self.ffn_dim] if self.moe is None or self.moe.interleave_step > 1 else []
        widths += [self.moe.ffn_dim_expert] if self.moe is not None and self.moe.shared_expert else []
        f = min(widths, default=self.dim)  # the narrowest feed-forward that carries adapters
        shapes = {"wq": (self.dim, q), "wk": (self.dim, kv), "wv": (self.dim, kv), "wo": (q, self.dim),
                  "w1": (self.dim, f), "w3": (self.dim, f), "w2": (f, self.dim)}
        weight = min(self.lora.targets, key=lambda name: min(shapes[name]))
        if self.lora.rank >= min(shapes[weight]):
            rows, cols = shapes[weight]
            raise ConfigError(f"lora.rank: {self.lora.rank} is not below the smaller side of {weight} "
                              f"({rows} x {cols}); use a rank below {min(rows, cols)}")

    def lora_for(self, weight: str) -> LoraConfig | None:
        """The adapter settings of projection `weight` ("wq", ...), or None if it has none."""
        return self.lora if self.lora is not None and weight in self.lora.targets else None

    def quantize_for(self, weight: str, layer: int | None = None) -> str | None:
        """The stored format ("int8", "fp8") of projection `weight` ("wq", ...), or None if it is
        not quantised; with `layer`, in that layer (fp8 leaves the first and last alone)."""
        if self.quantize is None or weight not in QUANTIZE_TARGETS[self.quantize]:
            return None
        if layer is not None and self.quantize == "fp8" and layer not in self.stacked_layers:
            return None
        return self.quantize

    @property
    def stacked_layers(self) -> range:
        """The units whose weights share one stack (the `layers` subtree, scanned).

        The layers, except with fp8 weights: Llama 3's FP8 recipe leaves the first
        and last layers unquantised, so those two keep their own subtrees
        (`layers_0`, `layers_{n-1}`, as unrolled layers are named). A model whose
        layers repeat a pattern of `layer_period` > 1 kinds (Llama 4) stacks the
        blocks of one pattern each: range(n_layers // layer_period).
        """
        if self.layer_period > 1:
            return range(self.n_layers // self.layer_period)
        return range(1, self.n_layers - 1) if self.quantize == "fp8" else range(self.n_layers)

    def layer_kind(self, layer: int) -> LayerKind:
        """What decoder layer `layer` (0-based) is: MoE or dense, RoPE or NoPE, chunked or global
        attention (Meta's reference: layer i is NoPE when (i + 1) % nope_layer_interval == 0,
        MoE when (i + 1) % moe.interleave_step == 0)."""
        nope = self.nope_layer_interval is not None and (layer + 1) % self.nope_layer_interval == 0
        moe = self.moe is not None and (layer + 1) % self.moe.interleave_step == 0
        return LayerKind(moe=moe, rope=not nope, chunked=self.attention_chunk_size is not None and not nope)

    @property
    def layer_period(self) -> int:
        """After how many layers the kinds of layers repeat (1 for every dense Llama)."""
        return math.lcm(self.nope_layer_interval or 1, self.moe.interleave_step if self.moe else 1)

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as written to YAML and into checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from plain data; unknown keys are an error naming the key."""
        check_keys(cls, data, "", "unknown model config field")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in data]
        if missing:
            raise ConfigError(f"{missing[0]}: required model config field is missing")
        return cls(**data)


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a dtype name of this project ("bfloat16", "float32", "int8", "fp8")."""
    return np.dtype({"bfloat16": ml_dtypes.bfloat16, "fp8": ml_dtypes.float8_e4m3fn}.get(name, name))


def _rope_scaling_from_dict(data: dict[str, Any]) -> RopeScaling:
    data = dict(data)
    rope_type = data.pop("rope_type", data.pop("type", "llama3"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"rope_scaling: unknown rope type {rope_type!r} (known: llama3)")
    known = {f.name for f in dataclasses.fields(RopeScaling)}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"rope_scaling.{key}: unknown field (known: {', '.join(sorted(known))})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"rope_scaling.{key}: must be a number, got {value!r}")
    return RopeScaling(**data)


def load_model_config(name_or_path: str | Path, **overrides) -> ModelConfig:
    """Load a model config from a YAML path or a name in `configs/models/`.

    `overrides` replace fields after loading (e.g. `dtype="bfloat16"`).
    Raises ConfigError (one line) for a missing file, bad YAML or a bad field.
    """
    _, data = read_config_file("models", name_or_path, ConfigError)
    return ModelConfig.from_dict({**data, **overrides})


def published_models() -> list[str]:
    """Names of the shipped model configs (published sizes and test sizes)."""
    return shipped_configs("models")
