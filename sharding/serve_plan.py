"""Per-device memory of serving (the decode loop) under a layout, from shapes alone.

    python -m sharding.plan --decode --model llama3_1_405b --layout tp --devices 4 \\
        --dtype bfloat16 --quantize fp8 --kv-cache-dtype int8 --batch 8 --cache-len 8192

Like the training plan (sharding/plan.py), nothing is allocated: shapes come
from `abstract_params` and `init_cache` under `jax.eval_shape`, and each
array's per-device shard follows its logical names under the layout's rules.
Counted per device:

- parameters: every leaf's shard in its own dtype (int8 or float8 kernels
  and their float32 scales where the config quantises, param_dtype
  elsewhere: llama_jax/model/quantize.py);
- KV cache: keys and values [layers, batch, cache_len, kv_heads, head_dim]
  in the compute dtype, or int8 / fp8 plus float32 scales per token and
  head (`kv_cache_dtype`);
- one step's transients: a layer's keys and values read back in the
  compute dtype, the attention scores [batch, heads, cache_len] (float32),
  and the logits [batch, vocab] (float32).

Parameters stay put while the cache grows with batch x cache length, so the
plan also gives, per chip, the largest batch that fits at this cache length
and the longest cache that fits at this batch. XLA's own temporaries,
collective buffers and fragmentation are not counted: keep a margin, and
confirm with `python -m train.compile --decode-only` (the compiled program).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax

from llama_jax.config import ModelConfig
from llama_jax.model.kv_cache import cache_axes, init_cache
from llama_jax.params import abstract_params, logical_axes
from sharding.layout import Layout, LayoutError, axes_tuple, load_layout
from sharding.shards import format_bytes, placement_rules, shard_elements
from sharding.topology import CHIP_HBM_BYTES


def decode_plan(config: ModelConfig, layout: Layout | str, n_devices: int, *, batch: int, cache_len: int,
                mesh: dict[str, int] | None = None) -> dict:
    """Per-device bytes of serving `batch` sequences with a cache of `cache_len` positions.

    config: with the dtype, quantize and kv_cache_dtype to plan for. Returns a
    JSON-ready dict (see the module docstring). LayoutError / ConfigError (one
    line) for bad input.
    """
    if isinstance(layout, str):
        layout = load_layout(layout)
    if mesh:
        layout = dataclasses.replace(layout, ici={**layout.ici, **mesh})
    for name, value in (("batch", batch), ("cache_len", cache_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LayoutError(f"{name}: must be a positive integer, got {value!r}")
    if cache_len > config.max_seq_len:
        raise LayoutError(f"cache_len: {cache_len} is over the model's max_seq_len {config.max_seq_len}")
    sizes, rules = placement_rules(config, layout, n_devices, batch=batch)

    def shard_bytes(shapes, names) -> int:
        is_names = lambda x: isinstance(x, tuple)  # noqa: E731
        return sum(shard_elements(s.shape, n, rules, sizes) * s.dtype.itemsize
                   for s, n in zip(jax.tree.leaves(shapes), jax.tree.leaves(names, is_leaf=is_names)))

    def cache_bytes(rows: int, length: int) -> int:
        return shard_bytes(jax.eval_shape(lambda: init_cache(config, rows, length)), cache_axes(config))

    def transient_bytes(rows: int, length: int) -> int:
        compute = jax.numpy.dtype(config.dtype).itemsize
        kv_layer = 2 * shard_elements((rows, length, config.n_kv_heads, config.head_dim),
                                      ("batch", "kv_length", "kv_heads", "head_dim"), rules, sizes) * compute
        scores = shard_elements((rows, config.n_heads, length), ("batch", "heads", "kv_length"), rules, sizes) * 4
        logits = shard_elements((rows, config.vocab_size), ("batch", "vocab"), rules, sizes) * 4
        return kv_layer + scores + logits

    parameters = shard_bytes(abstract_params(config), logical_axes(config))
    per_device = {"parameters": parameters, "kv_cache": cache_bytes(batch, cache_len),
                  "transients": transient_bytes(batch, cache_len)}
    per_device["total"] = sum(per_device.values())
    # Everything but the parameters is linear in batch and in cache length.
    per_token = (per_device["kv_cache"] + per_device["transients"]) / (batch * cache_len)
    batch_step = batch_shards(rules, sizes)
    fits = {}
    for chip, hbm in CHIP_HBM_BYTES.items():
        room = hbm - parameters
        largest_batch = int(room // (per_token * cache_len)) // batch_step * batch_step if room > 0 else 0
        longest_cache = min(int(room // (per_token * batch)), config.max_seq_len) if room > 0 else 0
        fits[chip] = {"fits": per_device["total"] <= hbm, "largest_batch": largest_batch,
                      "longest_cache": longest_cache}
    return {
        "program": "decode",
        "config": {k: v for k, v in config.to_dict().items() if k != "rope_scaling"},
        "layout": layout.name, "devices": n_devices, "mesh": sizes,
        "batch": batch, "cache_len": cache_len,
        "per_device_bytes": per_device,
        "kv_cache_bytes_per_token": per_device["kv_cache"] / (batch * cache_len),
        "fits_in_hbm": fits,
    }


def batch_shards(rules, sizes) -> int:
    """Into how many parts the rules split the batch (a batch that places is a multiple of it)."""
    return math.prod(sizes[a] for a in axes_tuple(nn.logical_to_mesh_axes(("batch",), rules)[0]))


def format_decode_table(result: dict) -> str:
    """A readable report of `decode_plan`'s result."""
    cfg, b = result["config"], result["per_device_bytes"]
    weights = f"{cfg['quantize']} + {cfg['param_dtype']}" if cfg["quantize"] else cfg["param_dtype"]
    rows = [(f"parameters ({weights})", b["parameters"]),
            (f"KV cache ({cfg['kv_cache_dtype'] or cfg['dtype']})", b["kv_cache"]),
            ("step transients (a layer's K/V, scores, logits)", b["transients"]),
            ("total", b["total"])]
    width = max(len(r[0]) for r in rows) + 2
    mesh = " ".join(f"{k}={v}" for k, v in result["mesh"].items())
    lines = [f"decode: {result['batch']} sequences x cache {result['cache_len']}, layout {result['layout']} "
             f"on {result['devices']} devices ({mesh}), {cfg['dtype']} compute",
             "", f"{'per device':<{width}}{'bytes':>20}  {'':>12}"]
    lines += [f"{label:<{width}}{value:>20,}  {format_bytes(value):>12}" for label, value in rows]
    lines += ["", f"KV cache per token of batch: {result['kv_cache_bytes_per_token']:,.0f} B per device"]
    for chip, verdict in result["fits_in_hbm"].items():
        lines.append(f"{chip} ({format_bytes(CHIP_HBM_BYTES[chip])}): {'fits' if verdict['fits'] else 'does not fit'}; "
                     f"largest batch at cache {result['cache_len']}: {verdict['largest_batch']}, "
                     f"longest cache at batch {result['batch']}: {verdict['longest_cache']}")
    lines.append("(estimate: excludes XLA temporaries and collective buffers; keep a margin)")
    return "\n".join(lines)
