"""Continuous batching: a fixed number of decode slots over one sharded KV cache.

    batcher = Batcher(engine, params, slots=8, cache_len=2048, stop_ids=tokenizer.stop_ids)
    batcher.start()
    batcher.submit(Request(prompt_ids, max_tokens=64, sampling=Sampling(0.7), seed=1, emit=on_event))
    ...
    batcher.stop()        # finish what is running, then return

A worker thread owns the batch state (`llama_jax.decoding.programs`'s state dict, one
row per slot, every row's cache `cache_len` long). Between decode calls it
admits waiting requests into free slots: they are prefilled together (a
group of up to `prefill_batch`, or one alone; prompts padded to a bucket,
long prompts in chunks, each row with its own seed) and their rows written
into the batch state at their slots' indices, in one compiled program per
prompt bucket and group size.
Then one compiled program runs `steps_per_call` decode steps for all slots at
once, whatever their lengths, positions and sampling settings (per-row
arrays, `llama_jax.decoding.sampling.RowSampling`), so traffic never recompiles it. A
row that stops (a stop token, its token limit, a cancel) frees its slot for
the next admission at once.

Staged admissions (`infer.staging`): a long prompt, and with a prefix cache every
text prompt, takes its slot at once and is prefilled a piece per pass of the
worker's loop, between decode calls; requests with images or a grammar never are.

Structured outputs: a request with a `grammar` gets a matcher in its slot
(`llama_jax.text.grammar.RowMatchers`), whose bitmask masks the slot's first
token in the prefill and each next one in the decode. While any slot has one,
each decode call is the one-step `decode_masked` program with every slot's
mask (free slots: all bits set), and the worker feeds each slot's matcher
the token it sampled before the next call.

If the worker fails (an exception in a compiled call), every request it holds,
waiting or in a slot (mid-prefill included), ends with `Finished("error")`, and
`submit` refuses new ones (`WorkerFailed`): the failure and the refusal are
decided under the same lock, so no request can slip in between and wait forever.

Both programs are `llama_jax.decoding.slots`' pure functions, jitted by the
engine (`Engine.slot_programs`) exactly as `train.compile --serve` jits them
for its ahead-of-time HBM verdict; this module is the host's side: the
queue, the slots and the events.

Why slots over one contiguous cache rather than a paged cache: docs/serving.md.

Llama 3.2 Vision: a request may carry its prompt's images (`Request.images`); a
group with any is prefilled by the program with images (text rows in it see
none), a group without by the text one, and each slot keeps its image's
cross-attention keys and values for its decode steps
(`llama_jax.decoding.slots.prefill_into_slots`).

Each token is reported with its log-probability and the `TOP_LOGPROBS` most
likely alternatives (llama_jax.decoding.logprobs), computed on the device from
the raw logits. A request with `score_prompt` (the completions API's `echo`
with logprobs) first gets its prompt's (`Prompt`), from the third compiled
program, a forward pass over the admitted group's prompts that leaves the
slots alone; a request for no new tokens (`max_tokens` 0) ends there, without
a prefill, and so does a greedy request for one (what lm-eval's
`local-completions` sends for every log-likelihood): its token is the most
likely one at the prompt's last position, which the same pass scored.

Threads: `_wake`'s lock guards the queue, the slots (`_running`), the stop flag
and the counters. The worker is the only thread that changes the slots and
counters, and it changes them holding the lock, so `load()` (the server's
/health) reads one consistent picture: a request is waiting, or in a slot from
the moment it leaves the queue until its `Finished`.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections import deque

import numpy as np

from infer.engine import Engine
from infer.events import Finished, Token
from infer.prompt_scores import score_prompts
from infer.requests import Request, WorkerFailed
from infer.staging import Stager, take
from llama_jax.decoding.sampling import RowSampling, Sampling
from llama_jax.decoding.slots import PREFILL_BATCH, STEPS_PER_CALL
from llama_jax.decoding.staged import unstageable
from llama_jax.text.grammar import RowMatchers
from llama_jax.vision.image import image_inputs



class Batcher:
    """Decode slots over one KV cache, fed from a queue by a worker thread (module docstring).

    engine: the `Engine` (model and layout) whose params are given, already placed. slots:
    decode rows (a multiple of the layout's batch shards). cache_len: positions per slot
    (prompt plus generated tokens; rounded up to a multiple of 128). stop_ids: token ids
    that end a row. steps_per_call: decode steps per compiled call (new requests join
    between calls). prefill_batch: requests prefilled together when several wait (the
    prefill compiles for one request and for this many, per prompt bucket). prefix_cache_mb:
    memory of the prefix cache (0: none; `infer.staging`), which stages every text prompt; without
    it, text prompts longer than the engine's prefill chunk are staged (prefilled a chunk per
    decode call). `shape` holds the resulting shapes and `programs` the compiled programs.
    """

    def __init__(self, engine: Engine, params, slots: int, cache_len: int, stop_ids,
                 steps_per_call: int = STEPS_PER_CALL, prefill_batch: int = PREFILL_BATCH,
                 prefix_cache_mb: float = 0.0):
        self.engine, self.params = engine, params
        self.shape = engine.slot_shape(slots, cache_len, steps_per_call, prefill_batch)
        self.slots, self.cache_len = self.shape.slots, self.shape.cache_len
        self.programs = engine.slot_programs(self.shape)
        staged = prefix_cache_mb > 0 or unstageable(engine.config) is None
        # Staged admissions and the prefix cache (None for a model that cannot stage: images, a ring).
        self.stager = Stager(engine, self.shape, params, prefix_cache_mb) if staged else None
        self._stop_set = frozenset(int(t) for t in stop_ids)
        self._stops = engine.place_stops(self._stop_set)
        with engine.activate():
            self._state = self.programs.empty()
        self._sampling = engine.place_rows(RowSampling.of([Sampling()] * slots))
        self._grammars = RowMatchers(self.slots, engine.config.vocab_size)  # each slot's grammar state and mask
        vision = engine.config.vision  # a text row's image arrays in a group with images: no image
        self._no_image = None if vision is None else image_inputs([[]], [[0]], vision)
        self._waiting: deque[Request] = deque()
        self._running: list[Request | None] = [None] * slots
        self._wake = threading.Condition()
        self._stopping = False
        self.decode_calls = 0  # compiled decode calls so far (for /health: proof that rows share steps)
        self.cancelled = 0  # requests ended by `cancelled` (a stop string, a client that left)
        self.prefill_tokens = 0  # prompt tokens prefilled whole (staged ones: the stager counts)
        self._thread = threading.Thread(target=self._work, name="batcher", daemon=True)
        self.error: BaseException | None = None

    # ------------------------------------------------------------ the caller's side

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue a request (its prompt plus max_tokens must fit `cache_len`, checked by the caller).
        WorkerFailed once the worker has failed, RuntimeError once the batcher is stopping."""
        if len(request.prompt) + request.max_tokens > self.cache_len:
            raise ValueError(f"prompt of {len(request.prompt)} tokens plus max_tokens {request.max_tokens} "
                             f"is over the {self.cache_len} positions of a slot")
        with self._wake:
            if self.error is not None:
                raise WorkerFailed(f"the generation worker failed ({type(self.error).__name__}: {self.error})")
            if self._stopping:
                raise RuntimeError("the batcher is stopping")
            self._waiting.append(request)
            self._wake.notify()

    def stop(self, timeout: float | None = None, cancel: bool = False) -> None:
        """Take no more requests; finish the queued and running ones (with `cancel`, end them as
        `cancel_all` does), then end the worker (waiting at most `timeout` seconds for it)."""
        if cancel:
            self.cancel_all()
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def cancel_all(self) -> None:
        """Cancel every queued and running request (without waiting): each ends with
        `Finished("cancelled")` at the worker's next step."""
        with self._wake:
            for request in [*self._waiting, *self._running]:
                if request is not None:
                    request.cancelled = True
            self._wake.notify()

    def load(self) -> dict:
        """Slots in use, requests waiting, decode calls, cancelled requests and prompt tokens prefilled
        so far, and the staged admissions' and prefix cache's counts (for /health)."""
        with self._wake:
            load = {"slots": self.slots, "running": sum(r is not None for r in self._running),
                    "waiting": len(self._waiting), "decode_calls": self.decode_calls, "cancelled": self.cancelled,
                    "prefill_tokens": self.prefill_tokens}
            if self.stager is not None:
                staged = self.stager.counts()
                load["prefill_tokens"] += staged.pop("staged_prefill_tokens")
                load.update(staged)
            return load

    def warm_up(self, prompt_lengths=(1,)) -> None:
        """Compile the decode step and, for each given prompt length's bucket, the prefill of
        each group size (a vision model's: with images and without), by running one-token
        requests to the end (before `start`)."""
        with_images = (None,) if self._no_image is None else (None, self._no_image)  # the prefill with images too
        for length in prompt_lengths:
            for rows, images in itertools.product(self.shape.prefill_rows, with_images):
                requests = [Request([0] * length, 1, Sampling(), 0, lambda event: None, images=images)
                            for _ in range(rows)]
                admitted = list(zip(requests, range(rows)))
                self._claim(admitted)
                self._admit(admitted)
        if self.stager is not None:
            self._state, self._sampling = self.stager.warm_up(self._state, self._sampling, self._stops,
                                                              prompt_lengths)
        self._decode()
        self._decode(masked=True)
        with self._wake:
            self.prefill_tokens = self.decode_calls = 0  # /health counts served work only

    def prefill_args(self, admitted: list[tuple[Request, int]]) -> tuple:
        """The arguments of the compiled prefill (`programs.prefill`) that writes these (request,
        slot) pairs into their slots, in a group of the fewest `shape.prefill_rows` that holds them."""
        rows = next(r for r in self.shape.prefill_rows if r >= len(admitted))
        prompts_bt, lengths_b, _ = self.engine.pad_prompts([request.prompt for request, _ in admitted], rows)
        limits_b, seeds_b = np.zeros((rows,), np.int32), np.zeros((rows,), np.int32)  # padding rows: no output
        slots_b = np.full((rows,), self.slots, np.int32)  # padding rows: past the last slot, dropped
        allowed_bw = np.full((rows, self._grammars.bits.shape[1]), -1, np.int32)  # the first tokens' masks
        for i, (request, slot) in enumerate(admitted):
            limits_b[i], seeds_b[i], slots_b[i] = request.max_tokens, request.seed, slot
            allowed_bw[i] = self._grammars.bits[slot]
        settings = [request.sampling for request, _ in admitted] + [Sampling()] * (rows - len(admitted))
        place = self.engine.place_rows
        images = None
        if any(request.images is not None for request, _ in admitted):
            images = self.engine.place_images(
                {name: np.concatenate([(request.images or self._no_image)[name] for request, _ in admitted])
                 for name in self._no_image}, rows)
        return (self.params, self._state, self._sampling, prompts_bt, lengths_b, place(limits_b), place(seeds_b),
                self._stops, place(RowSampling.of(settings)), place(slots_b), images, place(allowed_bw))

    def decode_args(self, cancel_b: np.ndarray) -> tuple:
        """The arguments of the compiled decode call (`programs.decode`); `cancel_b`: bool [slots],
        the rows to stop first."""
        return self.params, self._state, self._sampling, self._stops, self.engine.place_rows(cancel_b)

    # ------------------------------------------------------------ the worker

    def _work(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._waiting and not any(self._running) and not self._stopping:
                        self._wake.wait()
                    if self._stopping and not self._waiting and not any(self._running):
                        return
                    free = [i for i, r in enumerate(self._running) if r is None]
                    admitted, staged = take(self._waiting, len(free), self.stager, self.shape)
                    admitted = list(zip(admitted, free))
                    staged = list(zip(staged, free[len(admitted):]))
                    dropped = [request for request, _ in admitted + staged if request.cancelled]
                    admitted = [(request, slot) for request, slot in admitted if not request.cancelled]
                    staged = [(request, slot) for request, slot in staged if not request.cancelled]
                    self.cancelled += len(dropped)
                    self._claim(admitted + staged)
                for request in dropped:
                    request.emit(Finished("cancelled"))
                group = self.shape.prefill_rows[-1]
                for start in range(0, len(admitted), group):
                    self._admit(admitted[start:start + group])
                if staged:
                    self.stager.begin(staged)
                pieced = self._piece()
                if admitted and not pieced and self._waiting and None in self._running:
                    continue  # more arrived during the prefill: admit them before the next decode call
                if self._decoding():
                    self._decode()
        except BaseException as err:  # the server reports it and answers 500 from then on
            with self._wake:  # from here `submit` refuses: no request joins after this snapshot
                self.error = err
                ended = list(self._waiting) + [r for r in self._running if r is not None]
                self._waiting.clear()
                self._running = [None] * self.slots
            for request in ended:
                with contextlib.suppress(Exception):  # one failing emit must not leave the others waiting
                    request.emit(Finished("error"))
            raise

    def _staging(self) -> set[int]:
        """The slots of the group being staged (claimed, not decoding yet)."""
        stager = self.stager
        return {slot for _, slot in stager.group} if stager is not None and stager.busy else set()

    def _decoding(self) -> bool:
        staging = self._staging()
        return any(r is not None and slot not in staging for slot, r in enumerate(self._running))

    def _piece(self) -> bool:
        """Prefill the staged group's next piece (all its pieces if no slot is decoding: nothing to
        interleave with); at its last, write its rows into their slots and report first tokens.
        Returns whether a piece ran."""
        stager = self.stager
        if stager is None or not stager.busy:
            return False
        while not stager.piece():
            if self._decoding():
                return True
        self._state, self._sampling, rows = stager.finish(self._state, self._sampling, self._stops)
        for request, slot, token, done, chosen, top_ids, top_lp in rows:
            if request.cancelled:
                with self._wake:
                    self.cancelled += 1
                    self._running[slot] = None
                request.emit(Finished("cancelled"))
            else:
                self._report(slot, token, chosen, top_ids, top_lp, done)
        return True

    def _claim(self, admitted: list[tuple[Request, int]]) -> None:
        """Put requests in their slots (they count as running from here)."""
        with self._wake:
            for request, slot in admitted:
                self._running[slot] = request

    def _admit(self, admitted: list[tuple[Request, int]]) -> None:
        """Score the prompts of claimed requests that ask for it; end those that want no new
        tokens, or one greedy token (lm-eval's log-likelihoods: the score's last position has
        it); prefill the others together, write their rows into their slots, report first tokens."""
        nexts = self._score([request for request, _ in admitted if request.score_prompt])
        ended = [(request, slot) for request, slot in admitted if request.max_tokens == 0
                 or (request.score_prompt and request.max_tokens == 1 and request.sampling.greedy
                     and request.grammar is None)]  # the score's most likely token is unconstrained
        with self._wake:
            for _, slot in ended:
                self._running[slot] = None
        for request, _ in ended:
            if request.max_tokens == 0:
                request.emit(Finished("length"))
                continue
            token = nexts[tuple(request.prompt)]  # as prefill's greedy pick: the most likely next token
            request.emit(token)
            request.emit(Finished("stop" if token.id in self._stop_set else "length"))
        admitted = [(request, slot) for request, slot in admitted if (request, slot) not in ended]
        if not admitted:
            return
        with self._wake:
            self.prefill_tokens += sum(len(request.prompt) for request, _ in admitted)
        for request, slot in admitted:
            self._grammars.start(slot, request.grammar)
        with self.engine.activate():
            self._state, self._sampling, first_b, done_b, *logprobs = self.programs.prefill(
                *self.prefill_args(admitted))
        first_b, done_b = np.asarray(first_b), np.asarray(done_b)
        chosen_b, top_ids_bk, top_lp_bk = (np.asarray(x) for x in logprobs)
        for i, (request, slot) in enumerate(admitted):
            self._report(slot, int(first_b[i]), chosen_b[i], top_ids_bk[i], top_lp_bk[i], bool(done_b[i]))

    def _score(self, requests: list[Request]) -> dict[tuple[int, ...], Token]:
        """Emit each request's `Prompt` (`infer.prompt_scores`); returns each prompt's most likely
        next token."""
        scored, nexts = score_prompts(self.engine, self.programs, self.params, self.shape.prefill_rows,
                                      [request.prompt for request in requests])
        for request in requests:
            request.emit(scored[tuple(request.prompt)])
        return nexts

    def _decode(self, masked: bool | None = None) -> None:
        """One compiled call of `steps_per_call` decode steps for every slot, or, while a slot has a
        grammar (or `masked`), of one step with each slot's mask; report the tokens."""
        staging = self._staging()  # their rows are still free: nothing to stop or report
        cancel_b = np.asarray([r is not None and r.cancelled and slot not in staging
                               for slot, r in enumerate(self._running)])
        masked = self._grammars.any() if masked is None else masked
        with self.engine.activate():
            if masked:
                outputs = self.programs.decode_masked(*self.decode_args(cancel_b),
                                                      self.engine.place_rows(self._grammars.bits))
            else:
                outputs = self.programs.decode(*self.decode_args(cancel_b))
        self._state, tokens_nb, chosen_nb, top_ids_nbk, top_lp_nbk = outputs
        with self._wake:
            self.decode_calls += 1
        tokens_nb, chosen_nb = np.asarray(tokens_nb), np.asarray(chosen_nb)
        top_ids_nbk, top_lp_nbk = np.asarray(top_ids_nbk), np.asarray(top_lp_nbk)
        done_b = np.asarray(self._state["done"])
        for slot, request in enumerate(self._running):
            if request is None or slot in staging:
                continue
            if cancel_b[slot]:
                self._grammars.release(slot)
                with self._wake:
                    self.cancelled += 1
                    self._running[slot] = None
                request.emit(Finished("cancelled"))
                continue
            made = np.flatnonzero(tokens_nb[:, slot] >= 0)
            for i, step in enumerate(made):
                last = i == len(made) - 1
                self._report(slot, int(tokens_nb[step, slot]), chosen_nb[step, slot], top_ids_nbk[step, slot],
                             top_lp_nbk[step, slot], bool(done_b[slot]) and last)

    def _report(self, slot: int, token: int, chosen, top_ids, top_lp, done: bool) -> None:
        request = self._running[slot]
        request.emit(Token(token, float(chosen), top_ids.tolist(), top_lp.tolist()))
        if self._grammars.constrained(slot) and not done:
            self._grammars.advance(slot, token)  # the mask of the slot's next step
        if done:
            self._grammars.release(slot)
            with self._wake:
                self._running[slot] = None
            request.emit(Finished("stop" if token in self._stop_set else "length"))
