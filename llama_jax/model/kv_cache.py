"""The KV cache: an explicit pytree, stacked over layers, written in place.

    cache = init_cache(config, batch, length)
    cache["k"], cache["v"]: [layers, batch, kv_length, kv_heads, head_dim]

Keys and values are stored in the compute dtype, or quantised per token and
kv head when `config.kv_cache_dtype` is "int8" or "fp8" (llama_jax/model/quantize.py):
then `k_scale` and `v_scale` [layers, batch, kv_length, kv_heads] (float32)
sit beside them, and int8 halves a bfloat16 cache (plus 4 / head_dim for
the scales).

Each decoder layer `write`s its new entries into the stacked arrays at its own
layer index and `read`s its layer back. A decode step thus writes one token
per layer and row and copies nothing else: the cache travels through the
layer scan as part of the carry (not as scanned inputs and outputs, which
would rebuild the whole stacked cache every step), and with the cache donated
to the jitted step XLA updates the buffers in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.config import ModelConfig
from llama_jax.model.quantize import dequantize, quantize, storage_dtype

Cache = dict[str, jax.Array]

CACHE_AXES = ("layers", "batch", "kv_length", "kv_heads", "head_dim")
SCALE_AXES = CACHE_AXES[:-1]


def cache_axes(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Logical axis names of every array of the cache (for shardings and constraints)."""
    axes = {"k": CACHE_AXES, "v": CACHE_AXES}
    if config.kv_cache_dtype is not None:
        axes |= {"k_scale": SCALE_AXES, "v_scale": SCALE_AXES}
    return axes


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None) -> Cache:
    """An empty KV cache for `batch` rows of up to `length` positions.

    `dtype` overrides the compute dtype of an unquantised cache.
    """
    shape = (config.n_layers, batch, length, config.n_kv_heads, config.head_dim)
    if config.kv_cache_dtype is None:
        dtype = dtype or config.dtype
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    values = storage_dtype(config.kv_cache_dtype)
    return {"k": jnp.zeros(shape, values), "v": jnp.zeros(shape, values),
            "k_scale": jnp.zeros(shape[:-1], jnp.float32), "v_scale": jnp.zeros(shape[:-1], jnp.float32)}


def write(cache: Cache, layer, positions_bt, k_btnk, v_btnk) -> Cache:
    """The cache with layer `layer`'s keys and values [b, t, n, k] written at `positions_bt` [b, t]."""
    rows_b1 = jnp.arange(positions_bt.shape[0])[:, None]
    where = (layer, rows_b1, positions_bt)
    cache = dict(cache)
    for name, new_btnk in (("k", k_btnk), ("v", v_btnk)):
        if name + "_scale" in cache:
            kind = "int8" if cache[name].dtype == jnp.int8 else "fp8"
            values_btnk, scale_btn = quantize(new_btnk, kind, (-1,))
            cache[name + "_scale"] = cache[name + "_scale"].at[where].set(scale_btn)
        else:
            values_btnk = new_btnk.astype(cache[name].dtype)
        cache[name] = cache[name].at[where].set(values_btnk)
    return cache


def read(cache: Cache, layer, dtype) -> tuple[jax.Array, jax.Array]:
    """Layer `layer`'s keys and values [b, kv_length, n, k] in `dtype`."""
    out = []
    for name in ("k", "v"):
        values = cache[name][layer]
        if name + "_scale" in cache:
            out.append(dequantize(values, cache[name + "_scale"][layer], (-1,), dtype))
        else:
            out.append(values.astype(dtype))
    return out[0], out[1]
