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

Why slots over one contiguous cache rather than a paged cache: every slot
reserves `cache_len` positions, which wastes memory when most requests are
short, but attention stays the model's own dense, sharded code (the same
numbers as `infer.generate`, which the tests check token for token) and a
step is one fixed-shape program. A paged cache would need a ragged paged
attention kernel (JAX ships one for TPU only) and a block table on the host.

Each token is reported with its log-probability and the `TOP_LOGPROBS` most
likely alternatives, computed on the device from the raw logits.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections import deque
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from infer.engine import Engine, cache_bucket
from llama_jax.decoding import programs
from llama_jax.decoding.programs import NO_TOKEN
from llama_jax.decoding.sampling import RowSampling, Sampling

TOP_LOGPROBS = 20  # alternatives reported per token (OpenAI's chat API allows up to 20)


@dataclasses.dataclass(frozen=True)
class Token:
    """One generated token: its id, log-probability and the top alternatives (ids, log-probabilities)."""

    id: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclasses.dataclass(frozen=True)
class Finished:
    """The end of a request: reason "stop" (a stop token), "length" (max_tokens) or "cancelled"."""

    reason: str


@dataclasses.dataclass(eq=False)
class Request:
    """One generation: token-id prompt, token limit, sampling settings, seed, and `emit`,
    called from the worker thread with each `Token` then one `Finished`. Setting
    `cancelled` (a stop string matched, the client left) frees its slot at the next step."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    seed: int
    emit: Callable[[Token | Finished], None]
    cancelled: bool = False


def token_logprobs(logits_bv, tokens_b, top: int = TOP_LOGPROBS):
    """(log-probability of each row's token [b], top ids int32 [b, top], their log-probabilities
    [b, top]) under log_softmax of float32 logits [b, v]."""
    logprobs_bv = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
    chosen_b = jnp.take_along_axis(logprobs_bv, jnp.maximum(tokens_b, 0)[:, None], axis=-1)[:, 0]
    top_lp_bk, top_ids_bk = jax.lax.top_k(logprobs_bv, min(top, logprobs_bv.shape[-1]))
    return chosen_b, top_ids_bk.astype(jnp.int32), top_lp_bk


class Batcher:
    """Decode slots over one KV cache, fed from a queue by a worker thread (module docstring).

    engine: the `Engine` (model and layout) whose params are given, already placed. slots:
    decode rows (a multiple of the layout's batch shards). cache_len: positions per slot
    (prompt plus generated tokens; rounded up to a multiple of 128). stop_ids: token ids
    that end a row. steps_per_call: decode steps per compiled call (new requests join
    between calls). prefill_batch: requests prefilled together when several wait (the
    prefill compiles for one request and for this many, per prompt bucket).
    """

    def __init__(self, engine: Engine, params, slots: int, cache_len: int, stop_ids, steps_per_call: int = 4,
                 prefill_batch: int = 8):
        shards = engine.batch_multiple
        if slots < 1 or slots % shards:
            raise ValueError(f"slots must be a positive multiple of the layout's batch shards ({shards}), got {slots}")
        if prefill_batch < 1:
            raise ValueError(f"prefill_batch must be at least 1, got {prefill_batch}")
        self.engine, self.params, self.slots = engine, params, slots
        # Rows of a prefill: one request (padded to the batch shards), or a group of them.
        self.prefill_rows = sorted({shards, min(slots, -(-prefill_batch // shards) * shards)})
        # Room for the longest prompt's bucket too: prefill writes the whole padded prompt.
        self.cache_len = max(cache_bucket(cache_len), engine.prompt_shape(cache_len)[0])
        self.steps_per_call = steps_per_call
        plan = engine.placement
        self._stop_set = frozenset(int(t) for t in stop_ids)
        self._stops = plan.put(np.asarray(sorted(self._stop_set) or [NO_TOKEN], np.int32), engine.replicated)
        row = plan.sharding("batch")
        self._row_sharding = row
        # Made by a compiled program, so the entries are distinct buffers (each is donated).
        empty = functools.partial(programs.empty_state, engine.config, slots, self.cache_len)
        with plan.activate():
            self._state = jax.jit(empty, out_shardings=engine.state_shardings)()
        self._sampling = jax.device_put(RowSampling.of([Sampling()] * slots), row)
        axes = programs.state_axes(engine.config)
        self._prefill = jax.jit(functools.partial(_prefill_into_slots, engine.model, axes),
                                static_argnames=("cache_len", "chunk"), donate_argnames=("state", "sampling"),
                                out_shardings=(engine.state_shardings, row) + (engine.replicated,) * 5,
                                compiler_options=engine.compiler_options)
        self._step = jax.jit(functools.partial(_steps, engine.model), static_argnames=("steps",),
                             donate_argnames=("state",),
                             out_shardings=(engine.state_shardings,) + (engine.replicated,) * 4,
                             compiler_options=engine.compiler_options)
        self._waiting: deque[Request] = deque()
        self._running: list[Request | None] = [None] * slots
        self._wake = threading.Condition()
        self._stopping = False
        self.decode_calls = 0  # compiled decode calls so far (for /health: proof that rows share steps)
        self.cancelled = 0  # requests ended by `cancelled` (a stop string, a client that left)
        self._thread = threading.Thread(target=self._work, name="batcher", daemon=True)
        self.error: BaseException | None = None

    # ------------------------------------------------------------ the caller's side

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue a request (its prompt plus max_tokens must fit `cache_len`, checked by the caller)."""
        if len(request.prompt) + request.max_tokens > self.cache_len:
            raise ValueError(f"prompt of {len(request.prompt)} tokens plus max_tokens {request.max_tokens} "
                             f"is over the {self.cache_len} positions of a slot")
        with self._wake:
            if self._stopping:
                raise RuntimeError("the batcher is stopping")
            self._waiting.append(request)
            self._wake.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Take no more requests; finish the queued and running ones, then end the worker."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def load(self) -> dict:
        """Slots in use, requests waiting, decode calls and cancelled requests so far (for /health)."""
        with self._wake:
            return {"slots": self.slots, "running": sum(r is not None for r in self._running),
                    "waiting": len(self._waiting), "decode_calls": self.decode_calls, "cancelled": self.cancelled}

    def warm_up(self, prompt_lengths=(1,)) -> None:
        """Compile the decode step and, for each given prompt length's bucket, the prefill of
        each group size, by running one-token requests to the end (before `start`)."""
        for length in prompt_lengths:
            for rows in self.prefill_rows:
                requests = [Request([0] * length, 1, Sampling(), 0, lambda event: None) for _ in range(rows)]
                self._admit(list(zip(requests, range(rows))))
        self._decode()

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
                    admitted = [(self._waiting.popleft(), slot) for slot in free[:len(self._waiting)]]
                for request, _ in admitted:
                    if request.cancelled:
                        self.cancelled += 1
                        request.emit(Finished("cancelled"))
                admitted = [(request, slot) for request, slot in admitted if not request.cancelled]
                group = self.prefill_rows[-1]
                for start in range(0, len(admitted), group):
                    self._admit(admitted[start:start + group])
                if admitted and self._waiting and None in self._running:
                    continue  # more arrived during the prefill: admit them before the next decode call
                if any(self._running):
                    self._decode()
        except BaseException as err:  # the server reports it and answers 500 from then on
            self.error = err
            for request in list(self._waiting) + [r for r in self._running if r is not None]:
                request.emit(Finished("error"))
            raise

    def _admit(self, admitted: list[tuple[Request, int]]) -> None:
        """Prefill requests together and write their rows into their slots; report first tokens."""
        engine, plan = self.engine, self.engine.placement
        rows = next(r for r in self.prefill_rows if r >= len(admitted))
        t, chunk = engine.prompt_shape(max(len(request.prompt) for request, _ in admitted))
        prompt_bt = np.zeros((rows, t), np.int32)
        lengths_b = np.ones((rows,), np.int32)  # padding rows: one token, no output
        limits_b, seeds_b = np.zeros((rows,), np.int32), np.zeros((rows,), np.int32)
        slots_b = np.full((rows,), self.slots, np.int32)  # padding rows: past the last slot, dropped
        for i, (request, slot) in enumerate(admitted):
            prompt_bt[i, :len(request.prompt)] = request.prompt
            lengths_b[i], limits_b[i], seeds_b[i] = len(request.prompt), request.max_tokens, request.seed
            slots_b[i] = slot
        settings = [request.sampling for request, _ in admitted] + [Sampling()] * (rows - len(admitted))
        row = self._row_sharding
        with plan.activate():
            self._state, self._sampling, first_b, done_b, *logprobs = self._prefill(
                self.params, self._state, self._sampling, plan.put(prompt_bt, plan.sharding("batch", "length")),
                *(plan.put(a, row) for a in (lengths_b, limits_b, seeds_b)), self._stops,
                jax.device_put(RowSampling.of(settings), row), plan.put(slots_b, row),
                cache_len=self.cache_len, chunk=chunk)
        first_b, done_b = np.asarray(first_b), np.asarray(done_b)
        chosen_b, top_ids_bk, top_lp_bk = (np.asarray(x) for x in logprobs)
        for i, (request, slot) in enumerate(admitted):
            self._running[slot] = request
            self._report(slot, int(first_b[i]), chosen_b[i], top_ids_bk[i], top_lp_bk[i], bool(done_b[i]))

    def _decode(self) -> None:
        """One compiled call of `steps_per_call` decode steps for every slot; report the tokens."""
        cancel_b = np.asarray([r is not None and r.cancelled for r in self._running])
        with self.engine.placement.activate():
            self._state, tokens_nb, chosen_nb, top_ids_nbk, top_lp_nbk = self._step(
                self.params, self._state, self._sampling, self._stops,
                self.engine.placement.put(cancel_b, self._row_sharding), steps=self.steps_per_call)
        self.decode_calls += 1
        tokens_nb, chosen_nb = np.asarray(tokens_nb), np.asarray(chosen_nb)
        top_ids_nbk, top_lp_nbk = np.asarray(top_ids_nbk), np.asarray(top_lp_nbk)
        done_b = np.asarray(self._state["done"])
        for slot, request in enumerate(self._running):
            if request is None:
                continue
            if cancel_b[slot]:
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
        if done:
            self._running[slot] = None
            request.emit(Finished("stop" if token in self._stop_set else "length"))


def _insert_rows(axes, batch, new, slots_b):
    """`batch` with row i of `new` written at row `slots_b[i]`, along each entry's "batch"
    axis; rows whose slot is out of range are dropped."""
    def put(names, big, small):
        where = (slice(None),) * names.index("batch") + (slots_b,)
        return big.at[where].set(small, mode="drop")
    return jax.tree.map(put, axes, batch, new, is_leaf=lambda x: isinstance(x, tuple))


def _prefill_into_slots(model, axes, params, state, sampling, prompt_bt, lengths_b, limits_b, seeds_b, stops,
                        new_sampling, slots_b, *, cache_len, chunk):
    """Prefill a group of requests (one seed each) and insert their rows at `slots_b`.

    Returns (state, sampling, first tokens [g], whether each is already done [g], their
    logprobs [g], top ids [g, k], top logprobs [g, k])."""
    new, first_b, logits_bv = programs.prefill(model, params, prompt_bt, lengths_b, limits_b, seeds_b, stops,
                                               sampling=new_sampling, cache_len=cache_len, keep_logits=True,
                                               chunk=chunk)
    state = _insert_rows(axes, state, new, slots_b)
    row_axes = RowSampling(("batch",), ("batch",), ("batch",))
    sampling = _insert_rows(row_axes, sampling, new_sampling, slots_b)
    return (state, sampling, first_b, new["done"], *token_logprobs(logits_bv, first_b))


def _steps(model, params, state, sampling, stops, cancel_b, *, steps):
    """`steps` decode steps of every slot (rows in `cancel_b` stop first).

    Returns (state, tokens int32 [steps, b] with NO_TOKEN where a row made none, their
    logprobs [steps, b], top ids [steps, b, k], top logprobs [steps, b, k])."""
    state = {**state, "done": state["done"] | cancel_b}

    def one(st, _):
        live_b = ~st["done"]
        st, next_b, logits_bv = programs.decode_step(model, params, st, stops, sampling=sampling)
        return st, (jnp.where(live_b, next_b, NO_TOKEN), *token_logprobs(logits_bv, next_b))

    state, (tokens_nb, chosen_nb, top_ids_nbk, top_lp_nbk) = jax.lax.scan(one, state, None, length=steps)
    return state, tokens_nb, chosen_nb, top_ids_nbk, top_lp_nbk
