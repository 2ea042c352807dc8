"""Log-likelihoods of token sequences, in padded batches on a layout's mesh.

    scorer = Scorer(model, placement, rows=16, max_length=2048)
    results = scorer(params, [(tokens, n), ...])   # [(log-prob, greedy), ...] in request order

A request is a sequence of ids and how many of its last ids to score: the
model reads tokens[:-1] and each of the last `n` ids of tokens[1:] adds its
log-probability (float32 log-softmax) to the sum; `greedy` says whether
each of them was also the most likely id there. This is what lm-eval's
`loglikelihood` (context + continuation, scoring the continuation) and
`loglikelihood_rolling` (one request per window) both reduce to.

Few compiles: requests are sorted by length (longest first) and cut into
batches of `rows` rows, and each batch is right-padded to a length bucket
(a power of two from 16, capped at `max_length`). Right padding changes
nothing for the real tokens (attention is causal), and padded rows and
positions weigh 0. The vocabulary projection runs `chunk` positions at a
time (train/objectives/cross_entropy.py `chunked_sums`), so a batch never
holds [rows, length, vocab] float32 logits at once.

Letters in names: b rows, t positions, d model width, v vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from llama_jax.arith import round_up
from llama_jax.decoding.buckets import length_multiple
from llama_jax.model.llama import Llama
from sharding.place import Placement
from train.objectives.cross_entropy import chunked_sums

LOGITS_CHUNK = 256  # positions projected to the vocabulary at a time


def length_bucket(n: int, max_length: int, multiple: int = 1) -> int:
    """Padded length of a row of `n` positions: a power of two from 16 (all the way up, unlike
    inference's prompt buckets: an evaluation's lengths vary widely, so fewer shapes beat
    less padding), at most `max_length`, rounded up to `multiple` (buckets.length_multiple)."""
    return round_up(min(max(16, 1 << (n - 1).bit_length()), max_length), multiple)


def score_batch(model: Llama, chunk: int, params, tokens_bt, targets_bt, weights_bt):
    """(sum of weighted target log-probs [b], weighted count of targets that were not the
    argmax [b]), both float32. tokens_bt, targets_bt: int32 [b, t]; weights_bt: float32 [b, t]."""
    hidden_btd, _ = model.apply({"params": params}, tokens_bt, return_hidden=True)

    def terms(hidden_btd, targets_bt, weights_bt):
        logits_btv = model.apply({"params": params}, hidden_btd, method="logits")  # float32
        target_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
        log_prob_bt = target_bt - jax.nn.logsumexp(logits_btv, axis=-1)
        missed_bt = (target_bt < jnp.max(logits_btv, axis=-1)).astype(jnp.float32)
        return jnp.sum(weights_bt * log_prob_bt, axis=-1), jnp.sum(weights_bt * missed_bt, axis=-1)

    return chunked_sums(terms, min(chunk, tokens_bt.shape[1]), hidden_btd, targets_bt, weights_bt)


class Scorer:
    """Score requests (see the module docstring) with one model on one placement.

    rows: rows per batch, rounded up to divide over the layout's batch axes.
    max_length: the longest row the model reads (requests must fit: tokens
    of at most max_length + 1 ids). `program` is the jitted `score_batch`
    (what train.compile --eval compiles ahead of time).
    """

    def __init__(self, model: Llama, placement: Placement, rows: int, max_length: int,
                 chunk: int = LOGITS_CHUNK):
        self.placement = placement
        self.rows = round_up(rows, placement.shards_along("batch"))
        self.multiple = length_multiple(placement.shards_along("length"))
        self.max_length = max_length
        replicated = NamedSharding(placement.mesh, PartitionSpec())
        self.program = jax.jit(functools.partial(score_batch, model, chunk),
                               out_shardings=(replicated, replicated))

    def __call__(self, params, requests: list[tuple[list[int], int]],
                 progress: bool = False) -> list[tuple[float, bool]]:
        """[(log-prob, greedy)] for each (tokens, n) request, in order; n = 0 scores nothing
        (0.0, True). `params` placed on this scorer's placement."""
        for tokens, n in requests:
            if len(tokens) > self.max_length + 1 or not 0 <= n < len(tokens):
                raise ValueError(f"a request of {len(tokens)} tokens scoring {n} does not fit "
                                 f"max_length {self.max_length}")
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        batches = range(0, len(order), self.rows)
        for start in tqdm(batches, desc="llama-jax loglikelihood", disable=not progress or len(batches) < 2):
            batch = order[start:start + self.rows]
            t = length_bucket(len(requests[batch[0]][0]) - 1, self.max_length, self.multiple)
            tokens_bt = np.zeros((self.rows, t), np.int32)
            targets_bt = np.zeros((self.rows, t), np.int32)
            weights_bt = np.zeros((self.rows, t), np.float32)
            for row, i in enumerate(batch):
                tokens, n = requests[i]
                length = len(tokens) - 1
                tokens_bt[row, :length] = tokens[:-1]
                targets_bt[row, :length] = tokens[1:]
                weights_bt[row, length - n:length] = 1.0
            log_prob_b, missed_b = self._run(params, tokens_bt, targets_bt, weights_bt)
            for row, i in enumerate(batch):
                results[i] = (float(log_prob_b[row]), bool(missed_b[row] == 0))
        return results

    def _run(self, params, *arrays_bt):
        plan = self.placement
        placed = [plan.put(a, plan.sharding("batch", "length")) for a in arrays_bt]
        with plan.activate():
            log_prob_b, missed_b = self.program(params, *placed)
        return np.asarray(log_prob_b), np.asarray(missed_b)
