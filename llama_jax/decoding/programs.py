"""Prefill and the decode loop as pure functions: what inference compiles.

    state, first_b, logits_bv = prefill(model, params, prompts_bt, lengths_b, limits_b, seed,
                                        stops, sampling=..., cache_len=..., keep_logits=False,
                                        chunk=None, images=None, allowed_bw=None)
    state, out_bn, logits_bnv = decode(model, params, state, stops, sampling=..., steps=...)
    state, next_b, logits_bv = decode_step(model, params, state, stops, sampling=..., allowed_bw=None)
    prefill_jit, decode_jit = jit_programs(model, state_shardings, replicated, compiler_options)

Both know nothing of meshes: the KV cache is constrained by its logical axis
names (`llama_jax.model.kv_cache.cache_axes`), which the layout in scope maps to mesh axes.
`jit_programs` jits them with shardings and donation, once for every caller:
infer's Engine, train.compile's ahead-of-time compiles and the lm-eval model.

Letters in names: b batch rows, t prompt time, n decode steps, v vocab.

Prompts are right-padded to one length. Prefill writes every prompt slot of
the cache (padding included) and samples each row's first token from the
logits at its own last prompt token. A prompt longer than `chunk` tokens is
prefilled chunk by chunk: the first chunk from position 0 (a sequence
attending to itself: the splash kernel and context parallelism apply), the
others against the cache, so no step holds more than [chunk, cache_len]
scores per head (with blocked attention, [chunk, block]) and activations
for `chunk` tokens, never [t, t]. A decode step feeds each row's last
token at its own position, so rows advance independently: the padding slots
past a short prompt are overwritten by its own generated tokens before any
query can see them (a query at position p sees slots <= p only).

State (a dict of arrays, one entry per row unless named): cache (the KV
cache), token (last token), pos (its position), count (tokens produced),
limit (tokens allowed), done (stopped), keys (the row's PRNG key).

Images (Llama 3.2 Vision): prefill takes them (llama_jax/vision/model.py's
`images` dict) and the model writes each cross-attention layer's image keys
and values into the cache ("image_k", "image_v"), once; the state keeps the
tiles' visible spans ("images": tile_from, tile_until), and decode steps
read both, never the pixels.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.config import ModelConfig
from llama_jax.model.kv_cache import CACHE_AXES, cache_axes, init_cache
from llama_jax.model.llama import Llama
from llama_jax.decoding.sampling import Sampling, row_keys, sample, step_keys

State = dict[str, Any]

NO_TOKEN = -1  # in a decode chunk's output: the row produced nothing at that step
PREFILL_CHUNK = 8192  # default tokens per prefill step (infer's Engine, train.compile)


def state_axes(config: ModelConfig, with_images: bool = False) -> dict:
    """Logical axes of every state entry, for `Placement.tree_shardings`; `with_images` adds
    a vision batch's image keys and values (in the compute dtype) and the tiles' spans."""
    axes = {"cache": cache_axes(config), "token": ("batch",), "pos": ("batch",), "count": ("batch",),
            "limit": ("batch",), "done": ("batch",), "keys": ("batch",)}
    if with_images:
        axes["cache"] = {**axes["cache"], "image_k": CACHE_AXES, "image_v": CACHE_AXES}
        axes["images"] = {"tile_from": ("batch", None, None), "tile_until": ("batch", None, None)}
    return axes


def constrain_cache(cache, config: ModelConfig):
    """The cache with each array constrained to its logical axes (the layout in scope places them)."""
    axes = state_axes(config, with_images="image_k" in cache)["cache"]
    return {name: nn.with_logical_constraint(c, axes[name]) for name, c in cache.items()}


def is_stop(tokens_b, stops):
    """bool [b]: whether each row's token is one of `stops` (int32 [s])."""
    return (tokens_b[:, None] == stops[None, :]).any(axis=-1)


def seed_keys(seed, b: int):
    """Each row's PRNG key from an int32 scalar seed (rows of one batch), or from int32 [b] seeds
    (each row the key of row 0 of a batch with its seed, as if it were alone)."""
    if jnp.ndim(seed) == 0:
        return row_keys(jax.random.key(seed), b)
    return jax.vmap(lambda s: row_keys(jax.random.key(s), 1)[0])(seed)


def last_hidden(hidden_bcd, starts_b, lengths_b, last_bd):
    """`last_bd` [b, d] with each row's hidden state at its last prompt token (position
    lengths_b - 1) taken from `hidden_bcd` [b, c, d], the positions starts_b + [0, c), where
    the chunk holds it."""
    c = hidden_bcd.shape[1]
    offset_b = lengths_b - 1 - starts_b
    picked_bd = jnp.take_along_axis(hidden_bcd, jnp.clip(offset_b, 0, c - 1)[:, None, None], axis=1)[:, 0]
    inside_b = (offset_b >= 0) & (offset_b < c)
    return jnp.where(inside_b[:, None], picked_bd.astype(last_bd.dtype), last_bd)


def extend(model: Llama, params, cache, tokens_bc, starts_b, lengths_b, last_bd, images=None):
    """Prefill one chunk of each row's prompt into a cache that already holds its earlier
    positions: the chunk's tokens (int32 [b, c]) sit at positions starts_b + [0, c) (int32 [b],
    one start per row) and attend to the cache below them and causally among themselves.

    lengths_b: each row's prompt length (the chunk's tokens past it are padding: written, never
    seen before a generated token overwrites them; a chunked-attention ring keeps none of
    them). last_bd [b, d]: the hidden state at each row's last prompt token so far, replaced
    where this chunk holds that token. images: a vision batch's tile spans, or None.
    Returns (cache, last_bd). Pure: callers jit it (prefill's chunk loop, infer's staged
    admission, `llama_jax.decoding.staged`).
    """
    c = tokens_bc.shape[1]
    positions_bc = starts_b[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]
    ring = {"lengths_b": lengths_b} if "local_pos" in cache else {}
    with_spans = {} if images is None else {"images": images}
    hidden_bcd, cache = model.apply({"params": params}, tokens_bc, positions_bc, cache=cache, return_hidden=True,
                                    **with_spans, **ring)
    return constrain_cache(cache, model.config), last_hidden(hidden_bcd, starts_b, lengths_b, last_bd)


def first_tokens(model: Llama, params, cache, last_bd, keys_b, lengths_b, limits_b, stops, sampling,
                 allowed_bw=None):
    """A prefilled cache's decode state and each row's first token, sampled from the logits at
    its last prompt token (`last_bd` [b, d]) under each row's grammar mask `allowed_bw` (None:
    free): (state, first tokens [b], float32 logits [b, v])."""
    # Only each row's last prompt token needs the (large) vocabulary projection.
    logits_bv = model.apply({"params": params}, last_bd[:, None], method="logits")[:, 0]
    first_b = sample(logits_bv, step_keys(keys_b, jnp.zeros_like(lengths_b)), sampling, allowed_bw)
    live_b = limits_b > 0
    count_b = live_b.astype(jnp.int32)
    state = {"cache": cache, "token": first_b, "pos": lengths_b, "count": count_b,
             "limit": limits_b, "keys": keys_b,
             "done": ~live_b | is_stop(first_b, stops) | (count_b >= limits_b)}
    return state, first_b, logits_bv


def prefill(model: Llama, params, prompts_bt, lengths_b, limits_b, seed, stops, *,
            sampling: Sampling, cache_len: int, keep_logits: bool = False, chunk: int | None = None,
            images=None, allowed_bw=None):
    """Fill a new KV cache with the prompts and pick each row's first token.

    prompts_bt: int32 [b, t], right-padded; lengths_b: each prompt's length;
    limits_b: tokens each row may produce (0 for padding rows); seed: int32
    scalar, or int32 [b] (one per row, as if each row were alone in a batch);
    stops: int32 [k] stop ids. chunk: prefill `chunk` tokens at a time (t
    must then be a multiple of it); None or >= t: all at once.
    images: a vision model's images (see the module docstring), or None; the
    first chunk encodes them into the cache, later chunks read them there.
    allowed_bw: the tokens each row's first token may be, a bitmask int32 [b, words]
    (`sampling.sample`; a grammar's first mask), or None: any.
    Returns (state, first tokens [b] with NO_TOKEN for rows that may produce
    nothing, float32 logits [b, v] or None).
    """
    b, t = prompts_bt.shape
    chunk = t if chunk is None or chunk >= t else chunk
    if t % chunk:
        raise ValueError(f"prefill: prompt length {t} is not a multiple of the chunk {chunk}")
    keys_b = seed_keys(seed, b)
    spans = None if images is None else {"tile_from": images["tile_from"],
                                         "tile_until": images["tile_until"]}
    cache = constrain_cache(init_cache(model.config, b, cache_len), model.config)
    # A chunked-attention cache's ring must not keep the padding (llama_jax/model/kv_cache.py).
    ring = {"lengths_b": lengths_b} if "local_pos" in cache else {}
    with_images = {} if images is None else {"images": images}
    hidden_bcd, cache = model.apply({"params": params}, prompts_bt[:, :chunk], None, cache=cache,
                                    return_hidden=True, **with_images, **ring)
    zeros_b = jnp.zeros_like(lengths_b)
    last_bd = last_hidden(hidden_bcd, zeros_b, lengths_b, jnp.zeros((b, hidden_bcd.shape[-1]), hidden_bcd.dtype))

    def next_chunk(carry, start):
        cache, last_bd = carry
        tokens_bc = jax.lax.dynamic_slice_in_dim(prompts_bt, start, chunk, axis=1)
        cache, last_bd = extend(model, params, cache, tokens_bc, zeros_b + start, lengths_b, last_bd, spans)
        return (cache, last_bd), None

    starts = jnp.arange(chunk, t, chunk, dtype=jnp.int32)
    (cache, last_bd), _ = jax.lax.scan(next_chunk, (cache, last_bd), starts)
    state, first_b, logits_bv = first_tokens(model, params, cache, last_bd, keys_b, lengths_b, limits_b, stops,
                                             sampling, allowed_bw)
    if spans is not None:
        state["images"] = spans
    return state, jnp.where(limits_b > 0, first_b, NO_TOKEN), logits_bv if keep_logits else None


def decode(model: Llama, params, state: State, stops, *, sampling: Sampling, steps: int,
           keep_logits: bool = False, allowed_bw=None):
    """Up to `steps` decode steps in one `lax.while_loop` (fewer if every row is done); `allowed_bw`:
    the tokens each row may sample at every step (`decode_step`), or None: any.

    Returns (state, tokens int32 [b, steps] with NO_TOKEN where a row produced
    nothing, float32 logits [b, steps, v] or None); stop tokens are included.
    """
    b = state["token"].shape[0]
    out_bn = jnp.full((b, steps), NO_TOKEN, jnp.int32)
    logits_bnv = jnp.zeros((b, steps, model.config.vocab_size), jnp.float32) if keep_logits else None

    def running(carry):
        i, st, _, _ = carry
        return (i < steps) & ~jnp.all(st["done"])

    def step(carry):
        i, st, out_bn, logits_bnv = carry
        live_b = ~st["done"]
        st, next_b, logits_bv = decode_step(model, params, st, stops, sampling=sampling, allowed_bw=allowed_bw)
        out_bn = out_bn.at[:, i].set(jnp.where(live_b, next_b, NO_TOKEN))
        if keep_logits:
            logits_bnv = logits_bnv.at[:, i].set(logits_bv)
        return i + 1, st, out_bn, logits_bnv

    _, state, out_bn, logits_bnv = jax.lax.while_loop(
        running, step, (jnp.int32(0), state, out_bn, logits_bnv))
    return state, out_bn, logits_bnv


def decode_step(model: Llama, params, state: State, stops, *, sampling, allowed_bw=None):
    """One decode step of every row: (state, next tokens int32 [b], float32 logits [b, v]).

    Rows already done keep their token, position and count. `sampling`: a
    `Sampling`, or a `RowSampling` with one setting per row. `allowed_bw`: the tokens each
    row may sample, a bitmask int32 [b, words] (`sampling.sample`), or None: any; the logits
    returned are the model's, unmasked.
    """
    with_images = {"images": state["images"]} if "images" in state else {}
    logits_b1v, cache = model.apply({"params": params}, state["token"][:, None], state["pos"][:, None],
                                    cache=state["cache"], **with_images)
    logits_bv = logits_b1v[:, 0]
    live_b = ~state["done"]
    next_b = sample(logits_bv, step_keys(state["keys"], state["count"]), sampling, allowed_bw)
    next_b = jnp.where(live_b, next_b, state["token"])
    count_b = state["count"] + live_b
    done_b = state["done"] | is_stop(next_b, stops) | (count_b >= state["limit"])
    state = {**state, "cache": constrain_cache(cache, model.config), "token": next_b,
             "pos": state["pos"] + live_b, "count": count_b, "done": done_b}
    return state, next_b, logits_bv


def empty_state(config, batch: int, cache_len: int, with_images: bool = False) -> State:
    """A state of `batch` finished rows over an empty cache: its shapes are prefill's
    (for ahead-of-time compiles of `decode` from `jax.eval_shape`), with room for
    `config.vision.max_images` images per row if `with_images`."""
    zeros_b = jnp.zeros((batch,), jnp.int32)
    state = {"cache": init_cache(config, batch, cache_len), "token": zeros_b, "pos": zeros_b,
             "count": zeros_b, "limit": zeros_b, "done": jnp.ones((batch,), bool),
             "keys": row_keys(jax.random.key(0), batch)}
    if with_images:
        vis = config.vision
        tiles = jnp.zeros((batch, vis.max_images, vis.max_tiles), jnp.int32)
        image_cache = jnp.zeros((len(vis.cross_attention_layers), batch,
                                 vis.max_images * vis.max_tiles * vis.patches, config.n_kv_heads,
                                 config.head_dim), state["cache"]["k"].dtype)
        state["cache"].update(image_k=image_cache, image_v=image_cache)
        state["images"] = {"tile_from": tiles, "tile_until": tiles}
    return state


def jit_programs(model: Llama, state_shardings, replicated, compiler_options: dict | None = None):
    """(`prefill`, `decode`) jitted as every caller runs them: the state laid out as
    `state_shardings` (the tree of `state_axes`'s shardings, with images for a vision batch),
    what the host reads `replicated`, decode's state donated. Static arguments: prefill's
    sampling, cache_len, keep_logits and chunk; decode's sampling, steps and keep_logits.
    Inputs keep the shardings they come with. `compiler_options`: `loop_compiler_options`."""
    outputs = (state_shardings, replicated, replicated)
    prefill_jit = jax.jit(functools.partial(prefill, model),
                          static_argnames=("sampling", "cache_len", "keep_logits", "chunk"),
                          out_shardings=outputs, compiler_options=compiler_options)
    decode_jit = jax.jit(functools.partial(decode, model), static_argnames=("sampling", "steps", "keep_logits"),
                         donate_argnames=("state",), out_shardings=outputs, compiler_options=compiler_options)
    return prefill_jit, decode_jit


def loop_compiler_options(config: ModelConfig, platform: str) -> dict | None:
    """XLA options for programs that loop over decode steps or prefill chunks on `platform`.

    XLA:CPU has no bfloat16 or int8 matmul: it converts such weights to
    float32, and its while-loop invariant code motion then lifts every
    conversion out of the loop, so the loop holds a float32 copy of all the
    weights at once (34 GB of temporaries for Llama 3.1 8B in bfloat16; 2.1 GB
    without). Converting each layer's weights inside each step costs time, but
    a model that does not fit in memory does not run at all. Float32 weights
    and other platforms (a TPU fuses the cast into the matmul) keep the pass.
    """
    narrow = config.param_dtype != "float32" or config.quantize is not None
    if platform == "cpu" and narrow:
        return {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
    return None
