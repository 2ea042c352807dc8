"""The server's programs: decode slots over one KV cache, as pure functions and their jit.

    shape = slot_shape(slots, context, steps, prefill_batch, batch_shards=..., length_shards=...,
                       max_seq_len=..., prefill_chunk=...)
    programs = jit_slot_programs(model, shape, state_shardings, row_sharding, replicated)
    state = programs.empty()
    state, sampling, first_b, done_b, chosen_b, top_ids_bk, top_lp_bk = programs.prefill(
        params, state, sampling, prompts_bt, lengths_b, limits_b, seeds_b, stops, new_sampling, slots_b,
        images, allowed_bw)                  # images: None, or a vision group's; allowed_bw: first tokens' masks
    state, tokens_nb, chosen_nb, top_ids_nbk, top_lp_nbk = programs.decode(
        params, state, sampling, stops, cancel_b)
    state, tokens_1b, ... = programs.decode_masked(params, state, sampling, stops, cancel_b, allowed_bw)
    chosen_bt, top_ids_btk, top_lp_btk = programs.score(params, prompts_bt)   # echo with logprobs

A batch state (`programs.State`) holds one row per slot, every row's cache
`shape.cache_len` long. `prefill_into_slots` prefills a group of requests (each
with its own seed and sampling settings) and writes their rows into the batch
state at their slots; `decode_slots` runs `shape.steps` decode steps of every
slot at once, whatever their lengths and settings (`RowSampling`), and reports
each token with its log-probability and the `TOP_LOGPROBS` most likely
alternatives. `decode_masked` is one such step with each slot's allowed tokens (a bitmask
from its grammar, structured outputs; every bit set for a free slot): the host computes the
next mask from the token sampled, so a slot with a grammar advances one token per call, and
free slots share the call. `score` is `logprobs.prompt_logprobs`: every prompt token's
log-probability given those before it (the completions API's `echo` with
logprobs), a forward pass of its own that leaves the slots alone.
Llama 3.2 Vision: a slot holds its request's image as the cross-attention layers' keys and
values ("image_k", "image_v" in the cache) and its tiles' spans, written by the prefill that
saw the pixels and read by every decode step (`prefill_into_slots`).
infer.batcher serves these; train.compile --serve compiles them
ahead of time: both get them from `jit_slot_programs`, the one place that
decides their static arguments, donation and output shardings.

Letters in names: b batch rows (slots, or a prefill group), t prompt time,
n decode steps, k alternatives.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from llama_jax.decoding import programs
from llama_jax.arith import round_up
from llama_jax.decoding.buckets import cache_bucket, prompt_shape
from llama_jax.decoding.logprobs import prompt_logprobs, token_logprobs
from llama_jax.decoding.programs import NO_TOKEN, PREFILL_CHUNK
from llama_jax.decoding.sampling import RowSampling
from llama_jax.model.llama import Llama

# A server's defaults (infer.serve's flags, train.compile --serve's).
SLOTS = 8
STEPS_PER_CALL = 4
PREFILL_BATCH = 8


@dataclasses.dataclass(frozen=True)
class SlotShape:
    """The fixed shapes of a server's programs.

    slots: decode rows; cache_len: positions per slot; steps: decode steps per call;
    prefill_rows: rows of a prefill call, ascending (one request padded to the batch
    shards, and a group of waiting requests); chunk: prefill tokens per step.
    """

    slots: int
    cache_len: int
    steps: int
    prefill_rows: tuple[int, ...]
    chunk: int


def slot_shape(slots: int, context: int, steps: int = STEPS_PER_CALL, prefill_batch: int = PREFILL_BATCH, *,
               batch_shards: int, length_shards: int, max_seq_len: int,
               prefill_chunk: int = PREFILL_CHUNK) -> SlotShape:
    """The shapes of a server with `slots` decode rows of `context` positions each (prompt plus
    answer), `steps` decode steps per call and up to `prefill_batch` requests prefilled together,
    on a layout that splits rows into `batch_shards` and tokens into `length_shards`.

    The cache per slot is `context` rounded up to a multiple of 128, and at least the longest
    prompt's bucket (prefill writes the whole padded prompt). ValueError (one line) for slots
    that the batch shards do not divide, or a prefill batch or step count below 1.
    """
    if slots < 1 or slots % batch_shards:
        raise ValueError(f"slots must be a positive multiple of the layout's batch shards ({batch_shards}), "
                         f"got {slots}")
    if prefill_batch < 1:
        raise ValueError(f"prefill_batch must be at least 1, got {prefill_batch}")
    if steps < 1:
        raise ValueError(f"steps per call must be at least 1, got {steps}")
    longest, chunk = prompt_shape(context, max_seq_len, length_shards, prefill_chunk)
    rows = sorted({batch_shards, min(slots, round_up(prefill_batch, batch_shards))})
    return SlotShape(slots, max(cache_bucket(context), longest), steps, tuple(rows), chunk)


def insert_rows(axes, batch, new, slots_b):
    """`batch` with row i of `new` written at row `slots_b[i]` along each entry's "batch" axis
    (`axes`: the logical axes of every entry); rows whose slot is out of range are dropped."""
    def put(names, big, small):
        where = (slice(None),) * names.index("batch") + (slots_b,)
        return big.at[where].set(small, mode="drop")
    return jax.tree.map(put, axes, batch, new, is_leaf=lambda x: isinstance(x, tuple))


def prefill_into_slots(model: Llama, params, state, sampling, prompts_bt, lengths_b, limits_b, seeds_b, stops,
                       new_sampling, slots_b, images=None, allowed_bw=None, *, cache_len: int, chunk: int):
    """Prefill a group of requests (`programs.prefill` with one seed each, `new_sampling` their
    settings [g]) and write their rows and settings into `state` and `sampling` at `slots_b`
    (int32 [g]; a slot past the last one drops a padding row). `images`: a vision model's
    arrays for the group's rows (`llama_jax.vision.image.image_inputs`; rows without images
    empty), or None for a group of text prompts. `allowed_bw`: the tokens each row's first token
    may be, a bitmask int32 [g, words] (`llama_jax.decoding.sampling.sample`), or None: any.

    A vision model's batch state always holds every slot's image keys and values and tile
    spans (`empty_slots`). A group with images writes its rows' whole state; a text group
    writes zero spans, so its rows see no tile, and leaves the slots' image keys and values
    as they were: no token reads them, and the encoder never runs for text.

    Returns (state, sampling, first tokens int32 [g], whether each row is already done bool [g],
    the first tokens' logprobs [g], top ids [g, k], top logprobs [g, k]).
    """
    new, first_b, logits_bv = programs.prefill(model, params, prompts_bt, lengths_b, limits_b, seeds_b, stops,
                                               sampling=new_sampling, cache_len=cache_len, keep_logits=True,
                                               chunk=chunk, images=images, allowed_bw=allowed_bw)
    with_images = "images" in state
    axes = programs.state_axes(model.config, with_images)
    kept = {}
    if with_images and images is None:
        spans = jnp.zeros((prompts_bt.shape[0],) + state["images"]["tile_from"].shape[1:], jnp.int32)
        new = {**new, "images": {"tile_from": spans, "tile_until": spans}}
        kept = {name: state["cache"][name] for name in ("image_k", "image_v")}
        axes = {**axes, "cache": {name: a for name, a in axes["cache"].items() if name not in kept}}
        state = {**state, "cache": {name: c for name, c in state["cache"].items() if name not in kept}}
    state = insert_rows(axes, state, new, slots_b)
    state["cache"] = {**state["cache"], **kept}
    row_axes = RowSampling(("batch",), ("batch",), ("batch",))
    sampling = insert_rows(row_axes, sampling, new_sampling, slots_b)
    return (state, sampling, first_b, new["done"], *token_logprobs(logits_bv, first_b))


def decode_slots(model: Llama, params, state, sampling, stops, cancel_b, allowed_bw=None, *, steps: int):
    """`steps` decode steps of every slot (rows in `cancel_b`, bool [b], stop first). `allowed_bw`:
    the tokens each slot may sample, a bitmask int32 [b, words], at every step (so one step per
    call for a grammar, whose mask follows each token), or None: any.

    Returns (state, tokens int32 [steps, b] with NO_TOKEN where a row made none, their
    logprobs [steps, b], top ids [steps, b, k], top logprobs [steps, b, k]).
    """
    state = {**state, "done": state["done"] | cancel_b}

    def one(st, _):
        live_b = ~st["done"]
        st, next_b, logits_bv = programs.decode_step(model, params, st, stops, sampling=sampling,
                                                     allowed_bw=allowed_bw)
        return st, (jnp.where(live_b, next_b, NO_TOKEN), *token_logprobs(logits_bv, next_b))

    state, (tokens_nb, chosen_nb, top_ids_nbk, top_lp_nbk) = jax.lax.scan(one, state, None, length=steps)
    return state, tokens_nb, chosen_nb, top_ids_nbk, top_lp_nbk


def empty_slots(config, shape: SlotShape) -> programs.State:
    """The batch state of `shape`'s slots, all finished; a vision model's holds each slot's
    image keys and values and tile spans (room for `vision.max_images` images per slot)."""
    return programs.empty_state(config, shape.slots, shape.cache_len, with_images=config.vision is not None)


@dataclasses.dataclass(frozen=True)
class SlotPrograms:
    """The jitted programs of one `SlotShape` (see the module docstring for their arguments).

    empty(): a batch state of finished rows; prefill: `prefill_into_slots` (state and sampling
    donated); decode: `decode_slots` (state donated); decode_masked: one step of `decode_slots`
    with each slot's allowed tokens (state donated); score: `prompt_logprobs` of a group of
    prompts padded as prefill pads them (compiled when first asked for: only `echo` needs it).
    """

    empty: Callable
    prefill: Callable
    decode: Callable
    decode_masked: Callable
    score: Callable


def jit_slot_programs(model: Llama, shape: SlotShape, state_shardings, row_sharding, replicated,
                      compiler_options: dict | None = None) -> SlotPrograms:
    """`SlotPrograms` for `shape`, jitted with the batch state laid out as `state_shardings`
    (the tree of `programs.state_axes(model.config, with_images)`'s shardings, with images
    for a vision model), per-row outputs (the slots'
    sampling settings) as `row_sharding` and everything the host reads `replicated`.
    Inputs keep the shardings they come with. `compiler_options`: XLA options (infer's, per
    platform)."""
    empty = functools.partial(empty_slots, model.config, shape)
    prefill = functools.partial(prefill_into_slots, model, cache_len=shape.cache_len, chunk=shape.chunk)
    decode = functools.partial(decode_slots, model, steps=shape.steps)
    decode_outputs = (state_shardings,) + (replicated,) * 4
    return SlotPrograms(
        # Made by a compiled program, so the entries are distinct buffers (each is donated).
        empty=jax.jit(empty, out_shardings=state_shardings),
        prefill=jax.jit(prefill, donate_argnames=("state", "sampling"),
                        out_shardings=(state_shardings, row_sharding) + (replicated,) * 5,
                        compiler_options=compiler_options),
        decode=jax.jit(decode, donate_argnames=("state",), out_shardings=decode_outputs,
                       compiler_options=compiler_options),
        decode_masked=jax.jit(functools.partial(decode_slots, model, steps=1), donate_argnames=("state",),
                              out_shardings=decode_outputs, compiler_options=compiler_options),
        score=jax.jit(functools.partial(prompt_logprobs, model), out_shardings=(replicated,) * 3,
                      compiler_options=compiler_options))
