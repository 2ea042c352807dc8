"""The compiled part of inference: prefill, then a `lax.while_loop` of decode steps.

An `Engine` is one model config on one layout: a mesh, the KV cache's
shardings and two jitted functions. It knows nothing of text; `generate.py`
turns prompts into token ids and tokens back into text.

    engine.prefill(params, prompts, max_new_tokens, sampling)  -> state, first tokens
    engine.decode(params, state, steps, sampling)  -> state, tokens [batch, steps]  (state donated)
    engine.run(...)  -> iterator over both, chunk by chunk

Letters in names: b batch rows, t prompt time, s cache slots, v vocab.

Prompts are right-padded to one length. Prefill writes every prompt slot of
the cache (padding included) and samples each row's first token from the
logits at its own last prompt token. A decode step feeds each row's last
token at its own position, so rows advance independently: the padding slots
past a short prompt are overwritten by its own generated tokens before any
query can see them (a query at position p sees slots <= p only).

Streaming runs the same compiled loop in chunks of `steps` tokens: the host
reads the chunk's tokens, hands them to the caller, and calls again with the
donated state. See generate.py for why chunks rather than host callbacks.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from infer.sampling import Sampling, row_keys, sample, step_keys
from llama_jax.config import ModelConfig
from llama_jax.model import CACHE_AXES, Llama, init_cache
from llama_jax.params import unstack_layers
from sharding.layout import Layout, load_layout
from sharding.place import Placement

State = dict[str, Any]  # cache, token, pos, count, limit, done, keys (see _prefill)

_NO_TOKEN = -1  # in a decode chunk's output: the row produced nothing at that step


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def prompt_bucket(length: int) -> int:
    """Padded prompt length: powers of two up to 256, then multiples of 256.

    Few distinct shapes means few compiles when prompt lengths vary.
    """
    if length <= 256:
        return max(16, 1 << (length - 1).bit_length())
    return _round_up(length, 256)


def cache_bucket(length: int) -> int:
    """Cache length for `length` positions, rounded up to a multiple of 128."""
    return _round_up(length, 128)


class Engine:
    """Compiled prefill and decode for one model config on one layout.

    `layout`: a layout name or Layout, placed on all devices; None means the
    first device alone. `unroll_layers`: run the decoder layers unrolled
    rather than as one scan (default: unrolled on CPU only). Use `engine_for`
    to share engines (and their compiled functions) between calls.
    """

    def __init__(self, config: ModelConfig, layout: str | Layout | None = None, devices=None,
                 unroll_layers: bool | None = None):
        if layout is None:
            layout, devices = load_layout("dp"), [jax.devices()[0]]
        elif isinstance(layout, str):
            layout = load_layout(layout)
        self.config = config
        self.placement = Placement.create(config, layout, devices)
        plan = self.placement
        # XLA:CPU copies each layer's weights out of the stacked (scanned)
        # parameters at every decode step, which halved decode speed on the
        # 110M bench model; elsewhere scan keeps compile time flat in depth.
        if unroll_layers is None:
            unroll_layers = plan.mesh.devices.flat[0].platform == "cpu"
        self.model_config = config.replace(scan_layers=config.scan_layers and not unroll_layers,
                                           remat="none")
        self.model = Llama(self.model_config)
        self.batch_multiple = plan.shards_along("batch")
        self.length_multiple = plan.shards_along("length")
        self.replicated = NamedSharding(plan.mesh, PartitionSpec())
        row = plan.sharding("batch")
        self.cache_shardings = plan.tree_shardings({"k": CACHE_AXES, "v": CACHE_AXES})
        self.state_shardings = {"cache": self.cache_shardings, "token": row, "pos": row,
                                "count": row, "limit": row, "done": row, "keys": row}
        self._prefill = jax.jit(
            self._prefill_fn, static_argnames=("sampling", "cache_len", "keep_logits"),
            out_shardings=(self.state_shardings, self.replicated, self.replicated))
        self._decode = jax.jit(
            self._decode_fn, static_argnames=("sampling", "steps", "keep_logits"),
            donate_argnames=("state",),
            out_shardings=(self.state_shardings, self.replicated, self.replicated))

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
            params = unstack_layers(params, self.config.n_layers)
        shardings = self.placement.param_shardings(self.model_config)
        return jax.tree.map(
            lambda x, s: jax.device_put(x, s) if isinstance(x, jax.Array)
            else self.placement.put(x, s), params, shardings)

    # ------------------------------------------------------------ compiled functions

    def _apply(self, params, tokens_bt, positions_bt, cache, **kwargs):
        return self.model.apply({"params": params}, tokens_bt, positions_bt, cache=cache, **kwargs)

    def _prefill_fn(self, params, prompts_bt, lengths_b, limits_b, seed, stops,
                    *, sampling: Sampling, cache_len: int, keep_logits: bool):
        b, t = prompts_bt.shape
        keys_b = row_keys(jax.random.key(seed), b)
        cache = init_cache(self.model_config, b, cache_len)
        cache = jax.lax.with_sharding_constraint(cache, self.cache_shardings)
        positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        hidden_btd, cache = self._apply(params, prompts_bt, positions_bt, cache, return_hidden=True)
        # Only each row's last prompt token needs the (large) vocabulary projection.
        last_b1d = jnp.take_along_axis(hidden_btd, (lengths_b - 1)[:, None, None], axis=1)
        logits_bv = self.model.apply({"params": params}, last_b1d, method=Llama.logits)[:, 0]
        first_b = sample(logits_bv, step_keys(keys_b, jnp.zeros_like(lengths_b)), sampling)
        live_b = limits_b > 0
        count_b = live_b.astype(jnp.int32)
        state = {"cache": cache, "token": first_b, "pos": lengths_b, "count": count_b,
                 "limit": limits_b, "keys": keys_b,
                 "done": ~live_b | _is_stop(first_b, stops) | (count_b >= limits_b)}
        return state, jnp.where(live_b, first_b, _NO_TOKEN), logits_bv if keep_logits else None

    def _decode_fn(self, params, state: State, stops, *, sampling: Sampling, steps: int,
                   keep_logits: bool):
        b = state["token"].shape[0]
        out_bn = jnp.full((b, steps), _NO_TOKEN, jnp.int32)
        logits_bnv = jnp.zeros((b, steps, self.model_config.vocab_size), jnp.float32) if keep_logits else None

        def running(carry):
            i, st, _, _ = carry
            return (i < steps) & ~jnp.all(st["done"])

        def step(carry):
            i, st, out_bn, logits_bnv = carry
            logits_b1v, cache = self._apply(params, st["token"][:, None], st["pos"][:, None],
                                            st["cache"])
            logits_bv = logits_b1v[:, 0]
            live_b = ~st["done"]
            next_b = sample(logits_bv, step_keys(st["keys"], st["count"]), sampling)
            next_b = jnp.where(live_b, next_b, st["token"])
            count_b = st["count"] + live_b
            done_b = st["done"] | _is_stop(next_b, stops) | (count_b >= st["limit"])
            st = {**st, "cache": jax.lax.with_sharding_constraint(cache, self.cache_shardings),
                  "token": next_b, "pos": st["pos"] + live_b, "count": count_b, "done": done_b}
            out_bn = out_bn.at[:, i].set(jnp.where(live_b, next_b, _NO_TOKEN))
            if keep_logits:
                logits_bnv = logits_bnv.at[:, i].set(logits_bv)
            return i + 1, st, out_bn, logits_bnv

        _, state, out_bn, logits_bnv = jax.lax.while_loop(
            running, step, (jnp.int32(0), state, out_bn, logits_bnv))
        return state, out_bn, logits_bnv

    # ------------------------------------------------------------ driver

    def prefill(self, params, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling,
                seed: int = 0, stop_ids=(), keep_logits: bool = False):
        """Pad and place token-id prompts, fill the cache, pick each row's first token.

        Returns (state, first tokens [rows] int, logits [rows, vocab] or
        None). Rows are the prompts in order; the batch is padded to divide
        by the layout's batch axes, and those extra rows produce nothing.
        `params` must already be placed (`place_params`).
        """
        check_prompts(self.config, prompts, max_new_tokens)
        n, rows = len(prompts), _round_up(len(prompts), self.batch_multiple)
        longest = max(len(p) for p in prompts)
        t = _round_up(min(prompt_bucket(longest), self.config.max_seq_len), self.length_multiple)
        cache_len = max(t, cache_bucket(longest + max_new_tokens))
        prompts_bt = np.zeros((rows, t), np.int32)
        lengths_b = np.ones((rows,), np.int32)  # padding rows: one token, no output
        limits_b = np.zeros((rows,), np.int32)
        for i, p in enumerate(prompts):
            prompts_bt[i, :len(p)] = p
            lengths_b[i], limits_b[i] = len(p), max_new_tokens
        plan = self.placement
        row = plan.sharding("batch")
        inputs = (plan.put(prompts_bt, plan.sharding("batch", "length")), plan.put(lengths_b, row),
                  plan.put(limits_b, row), plan.put(np.asarray(seed, np.int32), self.replicated),
                  self._stops(stop_ids))
        with plan.activate():
            state, first_b, logits_bv = self._prefill(
                params, *inputs, sampling=sampling, cache_len=cache_len, keep_logits=keep_logits)
        return state, np.asarray(first_b)[:n], None if logits_bv is None else np.asarray(logits_bv)[:n]

    def decode(self, params, state: State, steps: int, sampling: Sampling, stop_ids=(),
               keep_logits: bool = False, rows: int | None = None):
        """Up to `steps` decode steps in one compiled loop (fewer if every row stops).

        `state` is donated: use the returned one. Returns (state, tokens
        [rows, steps] with -1 where a row produced nothing, logits [rows,
        steps, vocab] or None); stop tokens are included.
        """
        with self.placement.activate():
            state, out_bn, logits_bnv = self._decode(
                params, state, self._stops(stop_ids), sampling=sampling, steps=steps,
                keep_logits=keep_logits)
        return state, np.asarray(out_bn)[:rows], None if logits_bnv is None else np.asarray(logits_bnv)[:rows]

    def run(self, params, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling,
            seed: int = 0, stop_ids=(), chunk: int | None = None,
            keep_logits: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Generate for token-id prompts; yield (tokens [rows, n], logits [rows, n, vocab] or None).

        The first chunk is the prefill's one token per row; then chunks of up
        to `chunk` decode steps (all remaining steps in one call when None),
        until every row has stopped or made `max_new_tokens` tokens. Entries
        are -1 where a row produced nothing; stop tokens are included.
        """
        n = len(prompts)
        state, first_b, logits_bv = self.prefill(params, prompts, max_new_tokens, sampling, seed,
                                                 stop_ids, keep_logits)
        yield first_b[:, None], None if logits_bv is None else logits_bv[:, None]
        produced = np.ones(n, np.int64)
        finished = (produced >= max_new_tokens) | np.isin(first_b, list(stop_ids))
        while not finished.all():
            # The loop itself stops rows at their limit, so every chunk has
            # the same length and one compiled program serves them all.
            steps = max_new_tokens - 1 if chunk is None else chunk
            state, out_bn, logits_bnv = self.decode(params, state, steps, sampling, stop_ids,
                                                    keep_logits, rows=n)
            yield out_bn, logits_bnv
            finished |= np.isin(out_bn, list(stop_ids)).any(axis=1)
            produced += (out_bn >= 0).sum(axis=1)
            finished |= produced >= max_new_tokens

    def _stops(self, stop_ids):
        stops = np.asarray(sorted(stop_ids) or [_NO_TOKEN], np.int32)
        return self.placement.put(stops, self.replicated)


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
        bad = [t for t in p if not 0 <= int(t) < config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]} is outside the model's vocabulary "
                             f"[0, {config.vocab_size})")


@functools.lru_cache(maxsize=8)
def engine_for(config: ModelConfig, layout: str | None = None) -> Engine:
    """A shared Engine for (config, layout name); its compiled functions are reused."""
    return Engine(config, layout)


def _is_stop(tokens_b, stops):
    return (tokens_b[:, None] == stops[None, :]).any(axis=-1)


