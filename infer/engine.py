"""Serving the compiled prefill and decode loop on a layout.

An `Engine` is one model config on one layout: a mesh, the state's shardings
and the jitted `llama_jax.decoding.programs.prefill` and `decode` (what they compute,
and the state they pass, are described there). It knows nothing of text;
`generate.py` turns prompts into token ids and tokens back into text.

    engine.prefill(params, prompts, max_new_tokens, sampling)  -> state, first tokens
    engine.decode(params, state, steps, sampling)  -> state, tokens [batch, steps]  (state donated)
    engine.run(...)  -> iterator over both, chunk by chunk
    engine.slot_programs(engine.slot_shape(slots, context))  -> infer.batcher's programs

The batcher's decode slots are `llama_jax.decoding.slots`' programs, jitted here
for this layout; `pad_prompts`, `place_rows` and `place_stops` put their inputs
where they belong.

Streaming runs the same compiled loop in chunks of `steps` tokens: the host
reads the chunk's tokens, hands them to the caller, and calls again with the
donated state. See generate.py for why chunks rather than host callbacks.
"""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax.config import ModelConfig
from llama_jax.decoding import programs
from llama_jax.arith import round_up
from llama_jax.decoding.buckets import cache_bucket, pad_rows, prompt_shape
from llama_jax.decoding.programs import NO_TOKEN, State
from llama_jax.decoding.sampling import Sampling
from llama_jax.decoding.slots import (PREFILL_BATCH, STEPS_PER_CALL, SlotPrograms, SlotShape, jit_slot_programs,
                                      slot_shape)
from llama_jax.decoding.staged import StagedPrograms, jit_staged_programs, staged_axes
from llama_jax.model.kv_cache import cache_axes
from llama_jax.model.llama import check_token_ids
from llama_jax.model.trees import unstack_layers
from llama_jax.params import model_for, stacked_layers
from sharding.layout import Layout
from sharding.place import placement_for


class Engine:
    """Compiled prefill and decode for one model config on one layout.

    `layout`: a layout name or Layout, placed on all devices; None means the
    first device alone. `unroll_layers`: run the decoder layers unrolled
    rather than as one scan (default: unrolled on CPU only). `prefill_chunk`:
    prompts longer than this many tokens are prefilled chunk by chunk
    (llama_jax.decoding.programs.prefill), so a long prompt never holds [t, t]
    attention scores or activations for all its tokens at once. Use
    `engine_for` to share engines (and their compiled functions) between calls.
    """

    def __init__(self, config: ModelConfig, layout: str | Layout | None = None, devices=None,
                 unroll_layers: bool | None = None, prefill_chunk: int = programs.PREFILL_CHUNK):
        self.config = config
        self.prefill_chunk = prefill_chunk
        self.placement = placement_for(config, layout, devices)
        plan = self.placement
        # XLA:CPU copies each layer's weights out of the stacked (scanned)
        # parameters at every decode step, which halved decode speed on the
        # 110M bench model; elsewhere scan keeps compile time flat in depth.
        if unroll_layers is None:
            unroll_layers = plan.mesh.devices.flat[0].platform == "cpu"
        self.model_config = config.replace(scan_layers=config.scan_layers and not unroll_layers,
                                           remat="none")
        self.model = model_for(self.model_config)
        self.compiler_options = programs.loop_compiler_options(config, plan.mesh.devices.flat[0].platform)
        self.batch_multiple = plan.shards_along("batch")
        self.replicated = NamedSharding(plan.mesh, PartitionSpec())
        # A vision model's batches with images carry more state (the image keys and
        # values, the tiles' spans): one compiled pair per state shape.
        self._prefill, self._decode = {}, {}
        self._programs = {}  # the decode slots' and staged admissions' programs, by shape
        for with_images in (False, True) if config.vision is not None else (False,):
            self._prefill[with_images], self._decode[with_images] = programs.jit_programs(
                self.model, plan.tree_shardings(programs.state_axes(config, with_images)), self.replicated,
                self.compiler_options)

    # ------------------------------------------------------------ placement

    def param_shardings(self):
        """Shardings of the parameters as `config` stores them (e.g. to restore a checkpoint)."""
        return self.placement.param_shardings()

    def place_params(self, params):
        """Put parameters (numpy or jax arrays) onto this engine's layout, in the form its
        model takes (stacked layers split into `layers_{i}` when unrolled).

        Already placed parameters in that form come back as they are.
        """
        if not self.model_config.scan_layers and "layers" in params:
            params = unstack_layers(params, stacked_layers(self.config))
        shardings = self.placement.param_shardings(self.model_config)
        return jax.tree.map(
            lambda x, s: jax.device_put(x, s) if isinstance(x, jax.Array)
            else self.placement.put(x, s), params, shardings)

    # ------------------------------------------------------------ driver

    def prefill(self, params, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling,
                seed: int = 0, stop_ids=(), keep_logits: bool = False, images=None, allowed_bw=None):
        """Pad and place token-id prompts, fill the cache, pick each row's first token.

        Returns (state, first tokens [rows] int, logits [rows, vocab] or
        None). Rows are the prompts in order; the batch is padded to divide
        by the layout's batch axes, and those extra rows produce nothing.
        `params` must already be placed (`place_params`). `images`: a vision
        model's arrays for these rows (llama_jax.vision.image.image_inputs).
        `allowed_bw`: the tokens each row's first token may be, a bitmask int32
        [len(prompts), words] (`llama_jax.decoding.sampling.sample`), or None: any.
        """
        check_prompts(self.config, prompts, max_new_tokens)
        n = len(prompts)
        prompts_bt, lengths_b, chunk = self.pad_prompts(prompts)
        rows, t = prompts_bt.shape
        cache_len = max(t, cache_bucket(max(len(p) for p in prompts) + max_new_tokens))
        limits_b = np.zeros((rows,), np.int32)  # padding rows: no output
        limits_b[:n] = max_new_tokens
        plan = self.placement
        inputs = (prompts_bt, lengths_b, self.place_rows(limits_b),
                  plan.put(np.asarray(seed, np.int32), self.replicated), self.place_stops(stop_ids))
        if images is not None:
            images = self.place_images(images, rows)
        with plan.activate():
            state, first_b, logits_bv = self._prefill[images is not None](
                params, *inputs, sampling=sampling, cache_len=cache_len, keep_logits=keep_logits,
                chunk=chunk, images=images, allowed_bw=self._place_masks(allowed_bw, rows))
        return state, np.asarray(first_b)[:n], None if logits_bv is None else np.asarray(logits_bv)[:n]

    def prompt_shape(self, longest: int) -> tuple[int, int]:
        """(padded prompt length, prefill chunk) for prompts of up to `longest` tokens: a bucket
        (`llama_jax.decoding.buckets.prompt_shape`) that the layout's length axes and the chunk divide."""
        return prompt_shape(longest, self.config.max_seq_len, self.placement.shards_along("length"),
                            self.prefill_chunk)

    def pad_prompts(self, prompts: list[list[int]], rows: int | None = None):
        """Token-id prompts as prefill takes them, right-padded and placed on the layout.

        rows: rows of the batch, at least len(prompts) (default: len(prompts) rounded up to the
        layout's batch shards); padding rows hold one token 0. Returns (prompts int32 [rows, t],
        split on batch and length; their lengths int32 [rows], split on batch; the prefill chunk),
        t being `prompt_shape`'s bucket for the longest prompt.
        """
        rows = rows or round_up(len(prompts), self.batch_multiple)
        t, chunk = self.prompt_shape(max(len(p) for p in prompts))
        prompts_bt, lengths_b = pad_rows(prompts, rows, t)  # padding rows: one token, no output
        plan = self.placement
        return plan.put(prompts_bt, plan.sharding("batch", "length")), self.place_rows(lengths_b), chunk

    def place_rows(self, tree):
        """Host arrays with one entry per row (or a pytree of them, e.g. a `RowSampling`), placed
        split along the batch axis as prefill and decode take them."""
        tree = jax.tree.map(np.asarray, tree)
        row = self.placement.sharding("batch")
        return self.placement.put(tree, jax.tree.map(lambda _: row, tree))

    def place_images(self, images: dict, rows: int) -> dict:
        """A vision model's image arrays (`llama_jax.vision.image.image_inputs`) for the first rows
        of a batch of `rows`, placed split along the batch axis; padding rows: no image, seen by
        no token."""
        plan = self.placement
        return {name: plan.put(np.concatenate([a, np.zeros((rows - len(a),) + a.shape[1:], a.dtype)]),
                               plan.sharding("batch", *[None] * (a.ndim - 1)))
                for name, a in images.items()}

    def _place_masks(self, allowed_bw, rows: int):
        """Rows' bitmasks placed as `place_rows` places rows, padding rows allowing every token."""
        if allowed_bw is None:
            return None
        padding = np.full((rows - len(allowed_bw), allowed_bw.shape[1]), -1, np.int32)
        return self.place_rows(np.concatenate([allowed_bw, padding]))

    def place_stops(self, stop_ids):
        """Stop token ids as the programs take them: int32 [k], replicated (NO_TOKEN if none)."""
        stops = np.asarray(sorted(stop_ids) or [NO_TOKEN], np.int32)
        return self.placement.put(stops, self.replicated)

    def activate(self):
        """A context in which this engine's layout is current (its programs run and trace in it)."""
        return self.placement.activate()

    def decode(self, params, state: State, steps: int, sampling: Sampling, stop_ids=(),
               keep_logits: bool = False, rows: int | None = None, allowed_bw=None):
        """Up to `steps` decode steps in one compiled loop (fewer if every row stops); `allowed_bw`:
        the tokens each row may sample at every step, a bitmask int32 [rows, words], or None: any.

        `state` is donated: use the returned one. Returns (state, tokens
        [rows, steps] with -1 where a row produced nothing, logits [rows,
        steps, vocab] or None); stop tokens are included.
        """
        with self.placement.activate():
            state, out_bn, logits_bnv = self._decode["images" in state](
                params, state, self.place_stops(stop_ids), sampling=sampling, steps=steps,
                keep_logits=keep_logits, allowed_bw=self._place_masks(allowed_bw, state["token"].shape[0]))
        return state, np.asarray(out_bn)[:rows], None if logits_bnv is None else np.asarray(logits_bnv)[:rows]

    def run(self, params, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling,
            seed: int = 0, stop_ids=(), chunk: int | None = None, keep_logits: bool = False,
            images=None, grammars=None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Generate for token-id prompts; yield (tokens [rows, n], logits [rows, n, vocab] or None).

        The first chunk is the prefill's one token per row; then chunks of up
        to `chunk` decode steps (all remaining steps in one call when None),
        until every row has stopped or made `max_new_tokens` tokens. Entries
        are -1 where a row produced nothing; stop tokens are included.
        `grammars` (structured outputs): the rows' `llama_jax.text.grammar.RowMatchers`, whose
        `bits` mask each row's next token and which `advance` with each token made; the decode
        then runs one step per call, since each mask follows the token before it.
        """
        n = len(prompts)
        masks = None if grammars is None else grammars.bits
        state, first_b, logits_bv = self.prefill(params, prompts, max_new_tokens, sampling, seed,
                                                 stop_ids, keep_logits, images, masks)
        yield first_b[:, None], None if logits_bv is None else logits_bv[:, None]
        produced = np.ones(n, np.int64)
        finished = (produced >= max_new_tokens) | np.isin(first_b, list(stop_ids))
        out_bn = first_b[:, None]
        while not finished.all():
            if grammars is not None:
                for row in np.flatnonzero(~finished):
                    grammars.advance(row, out_bn[row, -1])
            # The loop itself stops rows at their limit, so every chunk has
            # the same length and one compiled program serves them all.
            steps = 1 if grammars is not None else max_new_tokens - 1 if chunk is None else chunk
            state, out_bn, logits_bnv = self.decode(params, state, steps, sampling, stop_ids,
                                                    keep_logits, rows=n, allowed_bw=masks)
            yield out_bn, logits_bnv
            finished |= np.isin(out_bn, list(stop_ids)).any(axis=1)
            produced += (out_bn >= 0).sum(axis=1)
            finished |= produced >= max_new_tokens

    # ------------------------------------------------------------ decode slots (infer.batcher)

    def slot_shape(self, slots: int, context: int, steps: int = STEPS_PER_CALL,
                   prefill_batch: int = PREFILL_BATCH) -> SlotShape:
        """The shapes of `slots` decode slots of `context` positions on this layout
        (`llama_jax.decoding.slots.slot_shape`; ValueError for slots the batch shards do not divide)."""
        return slot_shape(slots, context, steps, prefill_batch, batch_shards=self.batch_multiple,
                          length_shards=self.placement.shards_along("length"),
                          max_seq_len=self.config.max_seq_len, prefill_chunk=self.prefill_chunk)

    def slot_programs(self, shape: SlotShape) -> SlotPrograms:
        """The decode-slot programs of `shape`, jitted for this layout (what train.compile --serve
        compiles, `llama_jax.decoding.slots.jit_slot_programs`); a vision model's slots hold images."""
        if shape in self._programs:  # batchers of one shape share their compiled programs
            return self._programs[shape]
        shardings = self.placement.tree_shardings(programs.state_axes(self.config, self.config.vision is not None))
        self._programs[shape] = jit_slot_programs(self.model, shape, shardings, self.placement.sharding("batch"),
                                                  self.replicated, self.compiler_options)
        return self._programs[shape]

    def staged_programs(self, cache_len: int, block: int) -> StagedPrograms:
        """The staged-admission programs (`llama_jax.decoding.staged`) for text slots of `cache_len`
        positions and prefix blocks of `block` positions, jitted for this layout."""
        if (cache_len, block) in self._programs:
            return self._programs[cache_len, block]
        plan = self.placement
        self._programs[cache_len, block] = jit_staged_programs(
            self.model, cache_len, block, plan.tree_shardings(programs.state_axes(self.config)),
            plan.tree_shardings(staged_axes(self.config)), plan.tree_shardings(cache_axes(self.config)),
            plan.sharding("batch"), self.replicated, self.compiler_options)
        return self._programs[cache_len, block]


def check_prompts(config: ModelConfig, prompts: list[list[int]], max_new_tokens: int):
    """ValueError (one line) unless every prompt fits the context and the vocabulary."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty (a prompt needs at least one token)")
        if len(p) + max_new_tokens > config.max_seq_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens {max_new_tokens} that is "
                f"{len(p) + max_new_tokens}, over the model's context of {config.max_seq_len} tokens")
        rows = config.vocab_size + (config.vision.extra_token_rows if config.vision is not None else 0)
        check_token_ids(p, rows, f"prompt {i}")


@functools.lru_cache(maxsize=8)
def engine_for(config: ModelConfig, layout: str | None = None,
               prefill_chunk: int = programs.PREFILL_CHUNK) -> Engine:
    """A shared Engine for (config, layout name, prefill chunk); its compiled functions are reused."""
    return Engine(config, layout, prefill_chunk=prefill_chunk)



