"""llama-jax: the Llama family in JAX and Flax."""

from llama_jax.config import ConfigError, ModelConfig, RopeScaling, load_model_config
from llama_jax.model.kv_cache import init_cache
from llama_jax.model.llama import Llama, check_token_ids
from llama_jax.params import abstract_params, count_params, init_params, logical_axes

__all__ = [
    "ConfigError", "ModelConfig", "RopeScaling", "load_model_config", "Llama", "check_token_ids", "init_cache",
    "abstract_params", "count_params", "init_params", "logical_axes",
]
