"""The KV cache: an explicit pytree, stacked over layers, written in place.

    cache = init_cache(config, batch, length)
    cache["k"], cache["v"]: [layers, batch, kv_length, kv_heads, head_dim]

Keys and values are stored in the compute dtype, or quantised per token and
kv head when `config.kv_cache_dtype` is "int8" or "fp8" (llama_jax/model/quantize.py):
then `k_scale` and `v_scale` [layers, batch, kv_length, kv_heads] (float32)
sit beside them, and int8 halves a bfloat16 cache (plus 4 / head_dim for
the scales).

Chunked attention (Llama 4): a chunked layer's query sees only keys of its own
chunk of `attention_chunk_size` positions, so those layers keep a ring buffer
of `W = min(chunk, length)` slots ("local_k", "local_v" [chunked layers,
batch, W, kv_heads, head_dim], position p in slot p % W) and one table of the
position each slot holds ("local_pos" [batch, W], -1 when empty; the same for
every chunked layer, as they all write the same positions). The other
(global, NoPE) layers keep "k" and "v" over the full length. A step of t
tokens attends to the ring as it was before the step plus its own fresh keys
(W + t keys), so W = chunk suffices for any t, and writes into the ring only
the last W tokens of each row that are not padding (`ring_slots`): a padded
prompt's tail would otherwise push out the row's own recent positions.

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
import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.model.quantize import dequantize, quantize, storage_dtype

Cache = dict[str, jax.Array]

CACHE_AXES = ("layers", "batch", "kv_length", "kv_heads", "head_dim")
SCALE_AXES = CACHE_AXES[:-1]
LOCAL = "local_"  # name prefix of the chunked layers' ring buffer


def _chunked_in_period(config: ModelConfig) -> list[bool]:
    return [config.layer_kind(r).chunked for r in range(config.layer_period)]


def has_ring(config: ModelConfig) -> bool:
    """Whether the cache keeps a ring buffer for chunked layers (the config has any)."""
    return any(_chunked_in_period(config))


def cache_axes(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Logical axis names of every array of the cache (for shardings and constraints)."""
    prefixes = ("", LOCAL) if has_ring(config) else ("",)
    axes = {}
    for prefix in prefixes:
        axes |= {prefix + "k": CACHE_AXES, prefix + "v": CACHE_AXES}
        if config.kv_cache_dtype is not None:
            axes |= {prefix + "k_scale": SCALE_AXES, prefix + "v_scale": SCALE_AXES}
    if has_ring(config):
        axes["local_pos"] = ("batch", "kv_length")
    return axes


def _arrays(config: ModelConfig, layers: int, batch: int, length: int, dtype, prefix: str) -> Cache:
    shape = (layers, batch, length, config.n_kv_heads, config.head_dim)
    if config.kv_cache_dtype is None:
        return {prefix + "k": jnp.zeros(shape, dtype), prefix + "v": jnp.zeros(shape, dtype)}
    values = storage_dtype(config.kv_cache_dtype)
    return {prefix + "k": jnp.zeros(shape, values), prefix + "v": jnp.zeros(shape, values),
            prefix + "k_scale": jnp.zeros(shape[:-1], jnp.float32),
            prefix + "v_scale": jnp.zeros(shape[:-1], jnp.float32)}


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None) -> Cache:
    """An empty KV cache for `batch` rows of up to `length` positions (chunked layers:
    a ring of min(chunk, length) slots, see the module docstring).

    `dtype` overrides the compute dtype of an unquantised cache.
    """
    dtype = dtype or config.dtype
    if not has_ring(config):
        return _arrays(config, config.n_layers, batch, length, dtype, "")
    local = sum(_chunked_in_period(config)) * (config.n_layers // config.layer_period)
    width = min(config.attention_chunk_size, length)
    return (_arrays(config, config.n_layers - local, batch, length, dtype, "")
            | _arrays(config, local, batch, width, dtype, LOCAL)
            | {"local_pos": jnp.full((batch, width), -1, jnp.int32)})


def layer_index(config: ModelConfig, layer, chunked: bool):
    """Decoder layer `layer`'s index (int or traced) in its part of the cache: among the
    chunked layers if `chunked` and the cache has a ring, else among the others."""
    kinds = _chunked_in_period(config)
    if not any(kinds):
        return layer
    period = config.layer_period
    same = np.array([kind == chunked for kind in kinds], np.int32)
    rank = np.cumsum(same) - same  # layer r's place among its period's layers of the same kind
    return layer // period * int(same.sum()) + jnp.asarray(rank)[layer % period]


def ring_slots(positions_bt, lengths_b, width: int):
    """Ring slots [b, t] of tokens at `positions_bt`: p % width for each row's last `width`
    tokens before its length (`lengths_b`, None: all tokens count), `width` (out of range:
    not written) for the rest, so no two tokens of a step share a slot."""
    end_b = positions_bt.max(axis=1) + 1
    if lengths_b is not None:
        end_b = jnp.minimum(end_b, lengths_b)
    keep_bt = (positions_bt < end_b[:, None]) & (positions_bt >= end_b[:, None] - width)
    return jnp.where(keep_bt, positions_bt % width, width)


def write(cache: Cache, layer, slots_bt, k_btnk, v_btnk, prefix: str = "") -> Cache:
    """The cache with layer `layer`'s keys and values [b, t, n, k] written at `slots_bt` [b, t]
    of its `prefix` part (LOCAL: the ring); slots out of range are not written."""
    rows_b1 = jnp.arange(slots_bt.shape[0])[:, None]
    where = (layer, rows_b1, slots_bt)
    cache = dict(cache)
    for name, new_btnk in ((prefix + "k", k_btnk), (prefix + "v", v_btnk)):
        if name + "_scale" in cache:
            kind = "int8" if cache[name].dtype == jnp.int8 else "fp8"
            values_btnk, scale_btn = quantize(new_btnk, kind, (-1,))
            cache[name + "_scale"] = cache[name + "_scale"].at[where].set(scale_btn, mode="drop")
        else:
            values_btnk = new_btnk.astype(cache[name].dtype)
        cache[name] = cache[name].at[where].set(values_btnk, mode="drop")
    return cache


def read(cache: Cache, layer, dtype, prefix: str = "") -> tuple[jax.Array, jax.Array]:
    """Layer `layer`'s keys and values [b, kv_length, n, k] of the cache's `prefix` part in `dtype`."""
    out = []
    for name in (prefix + "k", prefix + "v"):
        values = cache[name][layer]
        if name + "_scale" in cache:
            out.append(dequantize(values, cache[name + "_scale"][layer], (-1,), dtype))
        else:
            out.append(values.astype(dtype))
    return out[0], out[1]
