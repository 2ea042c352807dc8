"""Admission in pieces: a group's prompts prefilled chunk by chunk between decode calls, and
their earlier blocks copied from a prefix store instead of computed.

    store = empty_store(config, blocks, block)          # a KV cache whose rows are blocks of positions
    staged = begin(config, store, table_bm, cache_len=...)   # copy-on-admit: each row's cached prefix blocks
    staged = extend_staged(model, params, staged, tokens_bc, starts_b, lengths_b)   # one piece, any start
    store = save_blocks(store, staged["cache"], row, blocks_m, ids_m)               # the row's new full blocks
    state, sampling, first_b, done_b, chosen_b, top_ids_bk, top_lp_bk = finish_into_slots(
        model, params, state, sampling, staged, lengths_b, limits_b, seeds_b, stops, new_sampling, slots_b)
    programs = jit_staged_programs(model, cache_len, state_shardings, staged_shardings, store_shardings, ...)

A staged group is `prefill_into_slots` taken apart, so that infer's batcher can run other
slots' decode calls between its pieces (a long prompt never stalls running streams for longer
than one piece) and start a row's prefill where its cached prefix ends. The group's rows live
in a staging state ({"cache": [rows, cache_len], "last": the hidden state at each row's last
prompt token}) until `finish_into_slots` samples their first tokens and writes them into the
slots, as `prefill_into_slots` does in one program. Each piece is `programs.extend`.

The prefix store is `init_cache(config, blocks, block)`: row j holds one block of `block`
positions' keys and values for every layer (and their scales for a quantised cache), laid out
by the layout like any cache (blocks on the batch axes, kv heads on tensor). `begin` gathers
each staged row's blocks (`table_bm`, block ids, out of range: no block, zeros) into its first
positions; which ids hold which token prefix is the host's business (infer.prefix_cache).
Text models without a chunked-attention ring only (a ring keeps its last positions, not blocks).

Letters in names: b rows of a group, c positions of a piece, m blocks per row
(cache_len // block), d model width.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from llama_jax.config import ModelConfig
from llama_jax.decoding import programs
from llama_jax.decoding.logprobs import token_logprobs
from llama_jax.decoding.sampling import RowSampling
from llama_jax.decoding.slots import insert_rows
from llama_jax.model.kv_cache import cache_axes, has_ring, init_cache
from llama_jax.model.llama import Llama


def unstageable(config: ModelConfig) -> str | None:
    """Why a model's prompts cannot be staged (None if they can): a vision model's slots hold
    images, and a chunked-attention ring (Llama 4) keeps its last positions, not blocks."""
    if config.vision is not None:
        return "prefix caching and interleaved prefill serve text models; this one takes images"
    if has_ring(config):
        return "prefix caching and interleaved prefill need a cache without a chunked-attention ring (Llama 4 keeps one)"
    return None


def staged_axes(config: ModelConfig) -> dict:
    """Logical axes of a staging state (for shardings)."""
    return {"cache": cache_axes(config), "last": ("batch", "embed")}


def block_bytes(config: ModelConfig, block: int) -> int:
    """Bytes of one prefix block: `block` positions of every layer's keys and values (and scales)."""
    shapes = jax.eval_shape(functools.partial(init_cache, config, 1, block))
    return sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(shapes))


def empty_store(config: ModelConfig, blocks: int, block: int):
    """A prefix store of `blocks` blocks of `block` positions (zeros)."""
    return init_cache(config, blocks, block)


def _blocks_view(x, block: int):
    """A cache array [layers, rows, length, ...] as [layers, rows, length // block, block, ...]
    (positions past the last whole block left out)."""
    m = x.shape[2] // block
    return x[:, :, :m * block].reshape(x.shape[:2] + (m, block) + x.shape[3:])


def begin(config: ModelConfig, store, table_bm, *, cache_len: int):
    """A staging state for a group of rows: each row's cache holds, from position 0, the store's
    blocks named in its row of `table_bm` (int32 [b, m], m = cache_len // block; an id out of
    range is no block: zeros), and nothing after them. `store` None: no prefix store, all zeros."""
    b = table_bm.shape[0]
    if store is None:
        cache = init_cache(config, b, cache_len)
    else:
        def gather(x):  # [layers, blocks, block, ...] -> [layers, b, cache_len, ...]
            picked = jnp.take(x, table_bm, axis=1, mode="fill", fill_value=0)
            picked = picked.reshape(picked.shape[:2] + (-1,) + picked.shape[4:])
            tail = [(0, 0)] * picked.ndim
            tail[2] = (0, cache_len - picked.shape[2])
            return jnp.pad(picked, tail)
        cache = {name: gather(x) for name, x in store.items()}
    return {"cache": programs.constrain_cache(cache, config),
            "last": jnp.zeros((b, config.dim), jnp.dtype(config.dtype))}


def extend_staged(model: Llama, params, staged, tokens_bc, starts_b, lengths_b):
    """One piece of a staged group's prompts (`programs.extend`): row i's tokens at positions
    starts_b[i] + [0, c). Returns the staging state."""
    cache, last_bd = programs.extend(model, params, staged["cache"], tokens_bc, starts_b, lengths_b, staged["last"])
    return {"cache": cache, "last": last_bd}


def save_blocks(store, cache, row, blocks_m, ids_m, *, block: int):
    """The store with blocks `blocks_m` (int32 [m], block indices along row `row` of a cache
    [layers, rows, length, ...], e.g. a staging state's) written at ids `ids_m` (int32 [m]; an
    id out of range writes nothing)."""
    def put(x, c):
        picked = _blocks_view(c, block)[:, row]  # [layers, m, block, ...]
        src = jnp.take(picked, jnp.clip(blocks_m, 0, picked.shape[1] - 1), axis=1)
        return x.at[:, ids_m].set(src.astype(x.dtype), mode="drop")
    return {name: put(x, cache[name]) for name, x in store.items()}


def finish_into_slots(model: Llama, params, state, sampling, staged, lengths_b, limits_b, seeds_b, stops,
                      new_sampling, slots_b):
    """Sample a staged group's first tokens (each row with its own seed and `new_sampling`
    setting) and write its rows into `state` and `sampling` at `slots_b` (int32 [b]; a slot
    past the last drops the row): what `slots.prefill_into_slots` returns, for text rows."""
    keys_b = programs.seed_keys(seeds_b, lengths_b.shape[0])
    new, first_b, logits_bv = programs.first_tokens(model, params, staged["cache"], staged["last"], keys_b,
                                                    lengths_b, limits_b, stops, new_sampling)
    state = insert_rows(programs.state_axes(model.config), state, new, slots_b)
    sampling = insert_rows(RowSampling(("batch",), ("batch",), ("batch",)), sampling, new_sampling, slots_b)
    first_b = jnp.where(limits_b > 0, first_b, programs.NO_TOKEN)
    return (state, sampling, first_b, new["done"], *token_logprobs(logits_bv, first_b))


@dataclasses.dataclass(frozen=True)
class StagedPrograms:
    """The jitted staged-admission programs (arguments as the functions above, the model and the
    static shapes bound): begin(store, table_bm), extend(params, staged, tokens_bc, starts_b,
    lengths_b) (staged donated), save(store, cache, row, blocks_m, ids_m) (store donated),
    finish(params, state, sampling, staged, lengths_b, limits_b, seeds_b, stops, new_sampling,
    slots_b) (state and sampling donated), empty_store(blocks)."""

    begin: Callable
    extend: Callable
    save: Callable
    finish: Callable
    empty_store: Callable


def jit_staged_programs(model: Llama, cache_len: int, block: int, state_shardings, staged_shardings,
                        store_shardings, row_sharding, replicated, compiler_options: dict | None = None):
    """`StagedPrograms` for slots of `cache_len` positions and prefix blocks of `block`, with the
    batch state laid out as `state_shardings`, a staging state as `staged_shardings`, the store
    as `store_shardings` and what the host reads `replicated`."""
    config = model.config
    return StagedPrograms(
        begin=jax.jit(functools.partial(begin, config, cache_len=cache_len), out_shardings=staged_shardings),
        extend=jax.jit(functools.partial(extend_staged, model), donate_argnames=("staged",),
                       out_shardings=staged_shardings, compiler_options=compiler_options),
        save=jax.jit(functools.partial(save_blocks, block=block), donate_argnames=("store",),
                     out_shardings=store_shardings),
        finish=jax.jit(functools.partial(finish_into_slots, model), donate_argnames=("state", "sampling"),
                       out_shardings=(state_shardings, row_sharding) + (replicated,) * 5,
                       compiler_options=compiler_options),
        empty_store=jax.jit(functools.partial(empty_store, config, block=block), static_argnums=0,
                            out_shardings=store_shardings))
