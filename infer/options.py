"""How a stored model is served, checked once for every entry point.

    options = ServingOptions(layout="fsdp", dtype="bfloat16", quantize="int8")  # ConfigError if unknown
    options = ServingOptions.from_args(args)       # python -m infer, python -m infer.serve
    config = options.model_config(stored)          # the stored config, served this way

`infer.generate.load_model` (and `load_served`), `python -m infer` and
`python -m infer.serve` all take these, so a setting is checked in one place,
before anything loads or compiles. Messages name a setting as the commands
spell it (`--kv-cache-dtype`).
"""

from __future__ import annotations

import dataclasses
import os

from llama_jax.config import ATTENTION_IMPLS, KV_CACHE_DTYPES, QUANTIZE_TARGETS, ConfigError, ModelConfig
from llama_jax.model.quantize import require_fp8
from llama_jax.paths import check_bucket, user_path
from sharding.layout import Layout, load_layout

SERVING_DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class ServingOptions:
    """layout: a layout name from configs/layouts or a Layout, sharded over all devices (None: one
    device). dtype: compute and parameter dtype (None: the checkpoint's). attention: an attention
    implementation (None: the checkpoint's). quantize ("int8", "fp8"): quantise the weights as they
    load. kv_cache_dtype ("int8", "fp8"): quantise the KV cache.

    Raises ConfigError (one line) for an unknown value, LayoutError for an unknown layout, and
    ConfigError for fp8 where this JAX cannot store it.
    """

    layout: str | Layout | None = None
    dtype: str | None = None
    attention: str | None = None
    quantize: str | None = None
    kv_cache_dtype: str | None = None

    def __post_init__(self):
        for name, known in (("dtype", SERVING_DTYPES), ("attention", ATTENTION_IMPLS),
                            ("quantize", tuple(QUANTIZE_TARGETS)), ("kv_cache_dtype", KV_CACHE_DTYPES)):
            value = getattr(self, name)
            if value is not None and value not in known:
                raise ConfigError(f"--{name.replace('_', '-')}: unknown {value!r} (known: {', '.join(known)})")
        if isinstance(self.layout, str):
            load_layout(self.layout)
        if "fp8" in (self.quantize, self.kv_cache_dtype):
            require_fp8()

    @classmethod
    def from_args(cls, args) -> ServingOptions:
        """The options of a parsed command line (an option the command lacks is None)."""
        return cls(**{field.name: getattr(args, field.name, None) for field in dataclasses.fields(cls)})

    def model_config(self, stored: ModelConfig) -> ModelConfig:
        """The config to serve a stored model with: these settings over the stored ones (None keeps
        the stored choice), layers scanned. ConfigError (one line) for re-quantising a quantised
        checkpoint, or a stored fp8 model where this JAX cannot store fp8."""
        if stored.quantize is not None and self.quantize not in (None, stored.quantize):
            raise ConfigError(f"quantize: the checkpoint is stored quantised as {stored.quantize}; it cannot be "
                              f"re-quantised as {self.quantize} (quantise the unquantised checkpoint instead)")
        changes = {"scan_layers": True, "quantize": self.quantize or stored.quantize}
        if self.dtype is not None:
            changes |= {"dtype": self.dtype, "param_dtype": self.dtype}
        if self.attention is not None:
            changes["attention"] = self.attention
        if self.kv_cache_dtype is not None:
            changes["kv_cache_dtype"] = self.kv_cache_dtype
        config = stored.replace(**changes)
        if "fp8" in (config.quantize, config.kv_cache_dtype):
            require_fp8()
        return config


def check_checkpoint(path: str | os.PathLike) -> None:
    """ValueError (one line) unless `path` is a directory; for gs://, the bucket and credentials
    are checked first (StorageError)."""
    check_bucket(path)
    if not user_path(path).is_dir():
        raise ValueError(f"{path}: checkpoint directory not found")
