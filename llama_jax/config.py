"""ModelConfig: the fields of the published Llama table plus compute choices.

Behaviour follows from fields (`n_kv_heads`, `rope_scaling`, `tie_embeddings`),
never from a model's name. Every value is validated on construction, and a bad
one is reported in one line that names the field.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from llama_jax.cli import known_names
from llama_jax.config_files import read_config_file, shipped_configs


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


class ConfigError(ValueError):
    """A config value a user can fix; the message is one line naming the field."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1/3.2 ("llama3") rescaling of the rotary frequencies."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192


LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Mixture-of-experts feed-forward layers (Llama 4), see llama_jax/model/moe.py.

    Layer i is a MoE layer when `(i + 1) % interleave_step == 0` (Scout: every
    layer, Maverick: every second one); the other layers keep the dense
    feed-forward of width `ffn_dim`. Each token goes to its `top_k` experts
    (SwiGLU of width `ffn_dim_expert`), picked by a router with sigmoid
    scores, plus a `shared_expert` of the same width that sees every token.
    `load_balance_weight` and `router_z_weight` scale the auxiliary losses a
    training objective adds (Switch Transformer's load balancing, ST-MoE's
    router z-loss); 0 (default) trains as the reference does, without them.
    """

    n_experts: int
    ffn_dim_expert: int
    top_k: int = 1
    shared_expert: bool = True
    interleave_step: int = 1
    load_balance_weight: float = 0.0
    router_z_weight: float = 0.0

    def __post_init__(self):
        for name in ("n_experts", "ffn_dim_expert", "top_k", "interleave_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"moe.{name}: must be a positive integer, got {value!r}")
        if self.top_k > self.n_experts:
            raise ConfigError(f"moe.top_k: {self.top_k} exceeds moe.n_experts {self.n_experts}")
        if not isinstance(self.shared_expert, bool):
            raise ConfigError(f"moe.shared_expert: must be true or false, got {self.shared_expert!r}")
        for name in ("load_balance_weight", "router_z_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"moe.{name}: must be a non-negative number, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TemperatureTuning:
    """Llama 4's attention temperature on NoPE layers: queries at position p are scaled by
    `log(floor((p + 1) / floor_scale) + 1) * attn_scale + 1` (1 below `floor_scale` tokens)."""

    floor_scale: float = 8192.0
    attn_scale: float = 0.1

    def __post_init__(self):
        for name in ("floor_scale", "attn_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"attn_temperature_tuning.{name}: must be a positive number, got {value!r}")


class LayerKind(NamedTuple):
    """What one decoder layer is, from the config's fields (`ModelConfig.layer_kind`)."""

    moe: bool = False      # a mixture-of-experts feed-forward (else the dense one)
    rope: bool = True      # rotary embeddings (False: a NoPE layer)
    chunked: bool = False  # attends within chunks of `attention_chunk_size` positions


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on some projections: `y = x W + (alpha / rank) (x A) B`.

    A starts random and B at zero, so an adapted model computes exactly its
    base until B is trained. Adapters are float32 whatever the base's dtype.
    `targets` names the projections (Meta's names: wq wk wv wo w1 w2 w3).
    """

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"lora.rank: must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"lora.alpha: must be a positive number, got {self.alpha!r}")
        if not self.targets:
            raise ConfigError(f"lora.targets: name at least one of {', '.join(LORA_TARGETS)}")
        for target in self.targets:
            if target not in LORA_TARGETS:
                raise ConfigError(f"lora.targets: {target!r} names no weight (known: {', '.join(LORA_TARGETS)})")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The image encoder and the cross-attention adapters of Llama 3.2 Vision (HF's Mllama).

    The encoder is a ViT over image tiles: `n_layers` local layers, then
    `n_global_layers` gated ones; the outputs of the local layers listed in
    `feature_layers` are concatenated with the last layer's. The adapters are
    gated cross-attention layers inserted into the text stack at
    `cross_attention_layers`, numbered as Hugging Face numbers the combined
    stack (self-attention layers and cross-attention layers together), so
    the text model's `n_layers` counts the self-attention layers only. They
    must be evenly spaced, so that the stack is a repeat of one group of
    layers (scanned once, whatever the depth). `image_token_id` is the
    `<|image|>` token, embedded by the first of `extra_token_rows` rows past
    the text vocabulary. `max_images` is how many images one prompt may carry:
    the compiled programs hold that many image slots. Pixels are normalised
    with `image_mean` and `image_std` (Meta's, CLIP's values by default).
    """

    dim: int
    n_layers: int
    n_global_layers: int
    n_heads: int
    ffn_dim: int
    image_size: int
    patch_size: int
    max_tiles: int
    feature_layers: tuple[int, ...]
    cross_attention_layers: tuple[int, ...]
    image_token_id: int
    extra_token_rows: int = 8
    max_images: int = 1
    norm_eps: float = 1e-5
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self):
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise ConfigError(f"vision.{name}: must be three numbers (red, green, blue), got {value!r}")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if min(self.image_std) <= 0:
            raise ConfigError(f"vision.image_std: must be positive, got {list(self.image_std)}")
        for name in ("feature_layers", "cross_attention_layers"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not value:
                raise ConfigError(f"vision.{name}: must be a non-empty list of layer indices, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in ("dim", "n_layers", "n_global_layers", "n_heads", "ffn_dim", "image_size", "patch_size",
                     "max_tiles", "extra_token_rows", "max_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"vision.{name}: must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ConfigError(f"vision.n_heads: {self.n_heads} does not divide vision.dim {self.dim}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision.patch_size: {self.patch_size} does not divide vision.image_size "
                              f"{self.image_size}")
        if sorted(set(self.feature_layers)) != list(self.feature_layers) or not all(
                0 <= i < self.n_layers for i in self.feature_layers):
            raise ConfigError(f"vision.feature_layers: must be increasing indices below vision.n_layers "
                              f"{self.n_layers}, got {list(self.feature_layers)}")
        if isinstance(self.image_token_id, bool) or not isinstance(self.image_token_id, int) \
                or self.image_token_id < 0:
            raise ConfigError(f"vision.image_token_id: must be a token id, got {self.image_token_id!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patches(self) -> int:
        """Tokens per tile: one per patch plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def output_dim(self) -> int:
        """Width of the encoder's output: the last layer's and each feature layer's, concatenated."""
        return self.dim * (1 + len(self.feature_layers))

    def group(self, n_layers: int) -> tuple[int, int]:
        """(self-attention layers per group, position of the cross-attention layer in the group)
        for a text stack of `n_layers` self-attention layers.

        The combined stack of n_layers + n_cross layers must be n_cross equal
        groups with the cross-attention layer at the same place in each
        (Llama 3.2 11B: 3, 8, ..., 38 among 40 layers, so groups of 5 with
        the cross-attention layer 4th). ConfigError otherwise.
        """
        positions = self.cross_attention_layers
        size, rest = divmod(n_layers + len(positions), len(positions))
        if rest or positions != tuple(positions[0] + size * g for g in range(len(positions))) \
                or positions[0] >= size:
            raise ConfigError(
                f"vision.cross_attention_layers: {list(positions)} does not cut the {n_layers} + "
                f"{len(positions)} layers into equal groups with the cross-attention layer at the same "
                "place in each (e.g. 3, 8, ..., 38 for 32 + 8)")
        return size - 1, positions[0]

    @property
    def aspect_ratios(self) -> tuple[tuple[int, int], ...]:
        """Tile arrangements (rows, columns) of at most `max_tiles` tiles, in Mllama's order.

        An image's aspect-ratio id is its arrangement's index here plus one
        (0 stands for no image).
        """
        return tuple((rows, cols) for rows in range(1, self.max_tiles + 1)
                     for cols in range(1, self.max_tiles + 1) if rows * cols <= self.max_tiles)


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
                              ("swiglu_backward", SWIGLU_BACKWARDS)):
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


def check_keys(cls, data, prefix: str, what: str = "unknown key"):
    """ConfigError naming the first key of `data` that is not a field of dataclass `cls`
    (with the known fields, or the closest ones and where `cls` lists them all)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    known = sorted(f.name for f in dataclasses.fields(cls))
    for key in data:
        if key not in known:
            where = f"{cls.__name__} in {cls.__module__.replace('.', '/')}.py"
            raise ConfigError(f"{prefix}{key}: {what} {known_names(key, known, where)}")


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
