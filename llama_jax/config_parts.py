"""The nested parts of a `ModelConfig` (llama_jax/config.py): rope scaling, mixture of experts,
attention temperature tuning, LoRA adapters and the Llama 3.2 Vision encoder; and `ConfigError`,
the one-line error every config raises."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from llama_jax.cli import known_names


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
