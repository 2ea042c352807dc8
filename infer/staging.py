"""The batcher's staged admissions: long prompts prefilled in pieces between decode calls, and
prompt prefixes copied from the prefix cache instead of computed.

    stager = Stager(engine, shape, params, prefix_cache_mb=64, block=16)
    stager.begin(admitted)            # (request, slot) pairs: look up prefixes, copy them in
    while not stager.piece(): ...     # one piece of at most shape.chunk positions per row
    state, sampling, outputs = stager.finish(state, sampling, stops)   # first tokens, rows in their slots

One group is staged at a time; `infer.batcher` runs a piece, then a decode call of the running
slots, until the group's last piece, so a long prompt delays other streams by one piece at a
time, never by its whole prefill. The device side is `llama_jax.decoding.staged` (the staging
state, copy-on-admit from the prefix store, `programs.extend` per piece); the prefix index
(which store block holds which prefix, least recently used evicted) is `infer.prefix_cache`.

Why copy-on-admit into the slot cache rather than a paged cache: every decode step keeps the
model's own dense attention over each slot's contiguous cache (the numbers of offline decoding,
every layout and attention kernel the project has); a hit costs one gather of the cached blocks
into the staging rows, which is a copy of at most the prompt's own keys and values, far less than
computing them (a block's keys and values for every layer, against its whole forward pass). A
paged cache would save that copy and the slots' reserved room, but needs a ragged paged attention
kernel in every decode step (JAX ships one in Pallas for TPU only; none for the CPU the tests run
on, so it could not be checked against offline decoding here), a block table per slot on the
host, and reference counts for blocks shared by running rows.
"""

from __future__ import annotations

import contextlib
from collections import deque

import numpy as np

from infer.prefix_cache import PrefixIndex
from infer.requests import Request
from llama_jax.decoding.buckets import row_length
from llama_jax.decoding.sampling import RowSampling, Sampling
from llama_jax.decoding.slots import SlotShape
from llama_jax.decoding.staged import block_bytes, unstageable

PREFIX_BLOCK = 16  # positions per prefix block (a multiple of it divides every slot's cache, 128 positions)


class Stager:
    """Staged admission of groups of requests into decode slots (module docstring).

    prefix_cache_mb: the prefix store's memory (0: no prefix cache; staging then serves
    prompts longer than one chunk only). block: positions per prefix block (divides 128).
    ValueError (one line) for a model that cannot be staged or a block that does not fit.
    """

    def __init__(self, engine, shape: SlotShape, params, prefix_cache_mb: float = 0.0, block: int = PREFIX_BLOCK):
        if unstageable(engine.config):
            raise ValueError(unstageable(engine.config))
        if block < 1 or 128 % block:
            raise ValueError(f"the prefix block must divide 128 positions, got {block}")
        self.engine, self.shape, self.params, self.block = engine, shape, params, block
        self.programs = engine.staged_programs(shape.cache_len, block)
        self.index, self.store = None, None
        if prefix_cache_mb > 0:
            shards = engine.batch_multiple
            blocks = int(prefix_cache_mb * 2**20 // block_bytes(engine.model_config, block)) // shards * shards
            if blocks < 1:
                raise ValueError(f"--prefix-cache-mb {prefix_cache_mb} holds no block of {block} positions "
                                 f"({block_bytes(engine.model_config, block)} bytes each, at least {shards}: one "
                                 "per batch shard)")
            self.index = PrefixIndex(blocks, block)
            with engine.activate():
                self.store = self.programs.empty_store(blocks)
        self.group: list | None = None  # the (request, slot) pairs being staged
        self.firsts: set = set()  # their prompts' first block keys (with a prefix cache)
        self.warming = False  # start-up compiles run: nothing is saved into the prefix store
        self.computed = 0  # prompt tokens prefilled by staged pieces (not found in the cache)
        self.pieces = 0  # piece calls so far

    @property
    def busy(self) -> bool:
        return self.group is not None

    def stages(self, request: Request) -> bool:
        """Whether a request is staged: a text prompt that wants new tokens and has no grammar (its
        first token is masked in the whole prefill; `finish` samples unmasked), always with a
        prefix cache, else when it is longer than a chunk."""
        return (request.images is None and not request.score_prompt and request.max_tokens > 0
                and request.grammar is None and (self.index is not None or len(request.prompt) > self.shape.chunk))

    def extends_group(self, prompt: list[int]) -> bool:
        """Whether the prompt starts with the first block of a prompt being staged (with a prefix
        cache): it waits for that prefill to find its blocks cached."""
        return self.busy and self.index is not None and self.index.first_key(prompt) in self.firsts

    def shares_uncached(self, prompt: list[int], firsts: set) -> bool:
        """Whether the prompt's first block is uncached and in `firsts` (another request of the group
        starts the same way): it waits for the next group, which finds the block cached."""
        if self.index is None:
            return False
        key = self.index.first_key(prompt)
        if key is None or self.index.cached(key):
            return False
        if key in firsts:
            return True
        firsts.add(key)
        return False

    def begin(self, admitted: list) -> None:
        """Stage a group of (request, slot) pairs (at most the largest prefill group): each row's
        cached prefix is copied into its staging row and its prefill starts after it."""
        rows = next(r for r in self.shape.prefill_rows if r >= len(admitted))
        m = self.shape.cache_len // self.block
        table = np.full((rows, m), np.iinfo(np.int32).max, np.int32)  # out of range: no block
        self.starts = np.zeros((rows,), np.int32)
        self.lengths = np.ones((rows,), np.int32)  # padding rows: one token, no output
        for i, (request, _) in enumerate(admitted):
            ids = self.index.lookup(request.prompt) if self.index is not None else []
            table[i, :len(ids)] = ids
            self.starts[i], self.lengths[i] = len(ids) * self.block, len(request.prompt)
        self.group, self.rows, self.offset = admitted, rows, 0
        # the group's first blocks: a prompt starting with one waits for it rather than prefilling it again
        self.firsts = {self.index.first_key(r.prompt) for r, _ in admitted} - {None} if self.index is not None else set()
        self.total = int((self.lengths - self.starts).max())  # positions to compute in the longest row
        self.computed += int(sum(len(r.prompt) for r, _ in admitted) - self.starts.sum())
        with self.engine.activate():
            self.staged = self.programs.begin(self.store, self.engine.place_rows(table))

    def piece(self) -> bool:
        """Prefill the group's next piece (each row's next positions from its start, at most a
        chunk); True once every row's prompt is in."""
        t = row_length(self.total - self.offset, self.shape.chunk, self.engine.placement.shards_along("length"))
        tokens = np.zeros((self.rows, t), np.int32)
        for i, (request, _) in enumerate(self.group):
            part = request.prompt[self.starts[i] + self.offset:self.starts[i] + self.offset + t]
            tokens[i, :len(part)] = part
        plan, place = self.engine.placement, self.engine.place_rows
        with self.engine.activate():
            self.staged = self.programs.extend(self.params, self.staged,
                                               plan.put(tokens, plan.sharding("batch", "length")),
                                               place(self.starts + self.offset), place(self.lengths))
        self.offset += t
        self.pieces += 1
        return self.offset >= self.total

    def finish(self, state, sampling, stops):
        """Save the group's new full blocks into the prefix store, sample its first tokens and
        write its rows into their slots (cancelled requests' rows are dropped). Returns (state,
        sampling, [(request, slot, first token, done, chosen, top ids, top logprobs)])."""
        group, rows, place = self.group, self.rows, self.engine.place_rows
        replicated = (self.engine.replicated,) * 2
        self.group = None
        with self.engine.activate():
            if self.index is not None and not self.warming:  # warm-up's blocks are no one's prefix
                m = self.shape.cache_len // self.block
                for i, (request, _) in enumerate(group):
                    claimed = self.index.claim(request.prompt, int(self.starts[i]) // self.block)
                    if not claimed:
                        continue
                    blocks, ids = np.zeros((m,), np.int32), np.full((m,), np.iinfo(np.int32).max, np.int32)
                    for k, (j, block_id) in enumerate(claimed):
                        blocks[k], ids[k] = j, block_id
                    self.store = self.programs.save(self.store, self.staged["cache"], np.int32(i),
                                                    *self.engine.placement.put((blocks, ids), replicated))
            limits, seeds = np.zeros((rows,), np.int32), np.zeros((rows,), np.int32)
            slots = np.full((rows,), self.shape.slots, np.int32)  # padding and cancelled rows: dropped
            for i, (request, slot) in enumerate(group):
                limits[i], seeds[i] = request.max_tokens, request.seed
                if not request.cancelled:
                    slots[i] = slot
            settings = [r.sampling for r, _ in group] + [Sampling()] * (rows - len(group))
            state, sampling, first_b, done_b, *logprobs = self.programs.finish(
                self.params, state, sampling, self.staged, place(self.lengths), place(limits), place(seeds), stops,
                place(RowSampling.of(settings)), place(slots))
        self.staged = None
        first_b, done_b = np.asarray(first_b), np.asarray(done_b)
        chosen_b, top_ids_bk, top_lp_bk = (np.asarray(x) for x in logprobs)
        return state, sampling, [(request, slot, int(first_b[i]), bool(done_b[i]), chosen_b[i], top_ids_bk[i],
                                  top_lp_bk[i]) for i, (request, slot) in enumerate(group)]

    def warm_up(self, state, sampling, stops, prompt_lengths):
        """Compile the pieces of every length a staged prompt's prefill may take, for each group size,
        by staging throwaway requests into the batch state (before the batcher starts); returns
        (state, sampling)."""
        if self.index is None and self.shape.cache_len <= self.shape.chunk:
            return state, sampling  # no prompt is ever staged
        with self.warming_up():
            for length in sorted({min(n, self.shape.chunk) for n in prompt_lengths}):
                for rows in self.shape.prefill_rows:
                    self.begin([(Request([0] * length, 1, Sampling(), 0, lambda event: None, cancelled=True), slot)
                                for slot in range(rows)])
                    while not self.piece():
                        pass
                    state, sampling, _ = self.finish(state, sampling, stops)
        return state, sampling

    @contextlib.contextmanager
    def warming_up(self):
        """A context for start-up compiles: the prefix index is a throwaway one (their prompts are
        no one's prefixes, and count nothing), and the counters start from 0 after it."""
        kept = self.index
        if kept is not None:
            self.index = PrefixIndex(kept.blocks, kept.block)
        self.warming = True
        try:
            yield
        finally:
            self.index, self.warming = kept, False
            self.computed = self.pieces = 0

    def counts(self) -> dict:
        """For /health: staged prompt tokens computed and pieces run, and the prefix cache's counts."""
        out = {"staged_prefill_tokens": self.computed, "prefill_pieces": self.pieces}
        if self.index is not None:
            out["prefix_cache"] = self.index.counts()
        return out


def take(waiting: deque, free: int, stager: Stager | None, shape: SlotShape) -> tuple[list, list]:
    """Up to `free` waiting requests, in order (the batcher holds its lock): (those prefilled whole
    now, those staged as one group). A prompt that would be staged waits while a group is staged,
    the group is full, or another of the group starts with the same uncached block (the next group
    finds it cached); requests behind it may pass. While a group is staged, a prompt of at most one
    chunk that does not start as one of the group's is prefilled whole (without the prefix cache)
    rather than wait for the group's last piece."""
    whole, staged, kept, firsts = [], [], [], set()
    group = shape.prefill_rows[-1]
    while waiting and len(whole) + len(staged) < free:
        request = waiting.popleft()
        if stager is None or not stager.stages(request) or (
                stager.busy and len(request.prompt) <= shape.chunk and not stager.extends_group(request.prompt)):
            whole.append(request)
        elif stager.busy or len(staged) == group or stager.shares_uncached(request.prompt, firsts):
            kept.append(request)
        else:
            staged.append(request)
    waiting.extendleft(reversed(kept))
    return whole, staged
