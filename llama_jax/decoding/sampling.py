"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Pure functions of (logits, PRNG key, settings), so a seed reproduces an
output and the whole choice compiles inside the decode loop. Letters in
names: b batch, v vocab, c candidates (the top-k, or the whole vocabulary
sorted, when top-p needs it).

Order of the filters, as in Hugging Face's and Meta's samplers: divide by
the temperature, keep the `top_k` largest logits, then keep the smallest
set of the most probable remaining tokens whose probability sums to at
least `top_p`, and sample from what is left (renormalised).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_MASKED = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick tokens. `temperature` 0 means greedy (argmax, no randomness).

    `top_k`: keep the k most likely tokens (None: all). `top_p`: nucleus
    sampling, keep the most likely tokens until their probability reaches p
    (None or 1.0: all). Hashable, so it can be a static argument of `jax.jit`.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or int(self.top_k) != self.top_k
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def greedy(logits_bv: jax.Array) -> jax.Array:
    """The most likely token of each row, int32 [batch] (first index on ties)."""
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)


def top_p_mask(sorted_logits_bc: jax.Array, top_p) -> jax.Array:
    """Which of the logits, sorted in descending order, top-p keeps: bool [b, c].
    `top_p`: a float, or one per row [b, 1].

    A token is kept when the probability of the tokens ranked before it is
    still below `top_p`, so the kept set is the smallest prefix reaching
    `top_p`, and the most likely token is always kept.
    """
    probs_bc = jax.nn.softmax(sorted_logits_bc.astype(jnp.float32), axis=-1)
    before_bc = jnp.cumsum(probs_bc, axis=-1) - probs_bc
    return before_bc < top_p


def filter_logits(logits_bv: jax.Array, sampling: Sampling) -> tuple[jax.Array, jax.Array | None]:
    """Temperature-scaled logits with the filtered-out tokens at -inf.

    Returns (candidate logits [b, c], candidate token ids [b, c] or None).
    Without top-k/top-p the candidates are the whole vocabulary in id order
    (ids None); otherwise they are sorted, most likely first.
    """
    logits_bv = logits_bv.astype(jnp.float32) / sampling.temperature
    if sampling.top_k is None and (sampling.top_p is None or sampling.top_p >= 1.0):
        return logits_bv, None
    k = logits_bv.shape[-1] if sampling.top_k is None else min(sampling.top_k, logits_bv.shape[-1])
    logits_bc, ids_bc = jax.lax.top_k(logits_bv, k)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        logits_bc = jnp.where(top_p_mask(logits_bc, sampling.top_p), logits_bc, _MASKED)
    return logits_bc, ids_bc


def bitmask_words(vocab: int) -> int:
    """int32 words of a bitmask over `vocab` tokens (`allowed_tokens`)."""
    return (vocab + 31) // 32


def allowed_tokens(allowed_bw: jax.Array, vocab: int) -> jax.Array:
    """A bitmask int32 [b, w] unpacked to bool [b, vocab]: token t is allowed where bit t % 32 of
    word t // 32 is set (llguidance's and xgrammar's layout; `llama_jax.text.grammar`). Ids past
    32 * w are not allowed."""
    bits_bw32 = (allowed_bw[:, :, None] >> jnp.arange(32, dtype=allowed_bw.dtype)) & 1
    allowed_bv = bits_bw32.reshape(allowed_bw.shape[0], -1).astype(bool)
    if allowed_bv.shape[1] >= vocab:
        return allowed_bv[:, :vocab]
    return jnp.pad(allowed_bv, ((0, 0), (0, vocab - allowed_bv.shape[1])))


def mask_logits(logits_bv: jax.Array, allowed_bw: jax.Array) -> jax.Array:
    """The logits with the tokens a row's bitmask (int32 [b, w], see `allowed_tokens`) does not
    allow at -inf; a row with every bit set keeps its logits exactly."""
    return jnp.where(allowed_tokens(allowed_bw, logits_bv.shape[-1]), logits_bv, _MASKED)


def sample(logits_bv: jax.Array, keys_b: jax.Array, sampling: Sampling | RowSampling,
           allowed_bw: jax.Array | None = None) -> jax.Array:
    """Next token of each row, int32 [batch], drawn with that row's PRNG key.

    logits_bv: float [batch, vocab]; keys_b: one key per row (e.g. from
    `row_keys`), so a row's draw does not depend on the others. sampling: one
    `Sampling` for every row, or a `RowSampling` (settings per row).
    allowed_bw: each row's allowed tokens as a bitmask int32 [batch, words] (a grammar's,
    structured outputs), or None: every token. The draw is from the allowed tokens alone,
    renormalised (temperature, top-k and top-p apply to them); a row with every bit set draws
    what it would draw without a mask. At least one token per row must be allowed.
    """
    if allowed_bw is not None:
        logits_bv = mask_logits(logits_bv, allowed_bw)
    if isinstance(sampling, RowSampling):
        return sample_rows(logits_bv, keys_b, sampling)
    if sampling.greedy:
        return greedy(logits_bv)
    logits_bc, ids_bc = filter_logits(logits_bv, sampling)
    choice_b = jax.vmap(jax.random.categorical)(keys_b, logits_bc)
    if ids_bc is not None:
        choice_b = jnp.take_along_axis(ids_bc, choice_b[:, None], axis=-1)[:, 0]
    return choice_b.astype(jnp.int32)


def row_keys(seed_or_key, batch: int) -> jax.Array:
    """One PRNG key per row from a seed (int) or key: row i gets fold_in(key, i)."""
    key = jax.random.key(seed_or_key) if isinstance(seed_or_key, int) else seed_or_key
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))


def step_keys(keys_b: jax.Array, counts_b: jax.Array) -> jax.Array:
    """The keys rows draw their next token with: fold_in(row key, tokens generated so far).

    Keyed by each row's own count, a row's draws do not depend on how the
    decode loop is chunked or on when other rows stop.
    """
    return jax.vmap(jax.random.fold_in)(keys_b, counts_b)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSampling:
    """Sampling settings per row, as arrays [batch], so rows of one batch differ without a
    recompile (a server's requests). temperature float32 (0 = greedy), top_k int32 (0 = all),
    top_p float32 (1 = all). `sample` takes it in place of a `Sampling`.

    The filters keep every token whose logit ties the last one kept, and the draw is
    `jax.random.categorical` over the whole vocabulary in id order with the rest at -inf, so
    without top-k/top-p a row draws exactly what `Sampling(temperature)` draws with its key.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array

    @classmethod
    def of(cls, settings: list[Sampling]) -> RowSampling:
        """The rows' settings from one `Sampling` per row."""
        return cls(temperature=jnp.asarray([s.temperature for s in settings], jnp.float32),
                   top_k=jnp.asarray([s.top_k or 0 for s in settings], jnp.int32),
                   top_p=jnp.asarray([1.0 if s.top_p is None else s.top_p for s in settings], jnp.float32))


def sample_rows(logits_bv: jax.Array, keys_b: jax.Array, sampling: RowSampling) -> jax.Array:
    """Next token of each row, int32 [batch], each with its own settings (see `RowSampling`)."""
    greedy_b = greedy(logits_bv)
    drawing_b = sampling.temperature > 0
    scaled_bv = logits_bv.astype(jnp.float32) / jnp.where(drawing_b, sampling.temperature, 1.0)[:, None]

    def filtered(scaled_bv):
        """Each row's logits with what its top-k and top-p drop at -inf (one sort of the vocabulary)."""
        sorted_bv = -jnp.sort(-scaled_bv, axis=-1)
        rank_v = jnp.arange(scaled_bv.shape[-1])
        keep_bv = (sampling.top_k[:, None] == 0) | (rank_v[None, :] < sampling.top_k[:, None])
        keep_bv &= top_p_mask(jnp.where(keep_bv, sorted_bv, _MASKED), sampling.top_p[:, None])
        last_b = jnp.sum(keep_bv, axis=-1) - 1  # the most likely token is always kept
        floor_b = jnp.take_along_axis(sorted_bv, last_b[:, None], axis=-1)
        return jnp.where(scaled_bv >= floor_b, scaled_bv, _MASKED)

    def drawn(scaled_bv):
        filtering = jnp.any(drawing_b & ((sampling.top_k > 0) | (sampling.top_p < 1.0)))
        scaled_bv = jax.lax.cond(filtering, filtered, lambda x: x, scaled_bv)
        return jax.vmap(jax.random.categorical)(keys_b, scaled_bv).astype(jnp.int32)

    # A batch of greedy rows skips the vocabulary-wide random draws.
    drawn_b = jax.lax.cond(jnp.any(drawing_b), drawn, lambda _: greedy_b, scaled_bv)
    return jnp.where(drawing_b, drawn_b, greedy_b)
