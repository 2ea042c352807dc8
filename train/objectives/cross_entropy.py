"""Next-token cross-entropy with loss weights and optional z-loss, plain or chunked;
`cross_entropy(config, z_loss, chunk)` is that loss as a run's Objective (pre-training, SFT).

The chunked form never holds float32 logits for the whole batch: it projects
`chunk` positions at a time (strided, so a split length stays local) and
recomputes each chunk's logits in the backward pass. For Llama 3 (vocab
128256) at 8192 tokens a row, the whole batch's float32 logits are the
largest tensor of a training step.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.arith import ceil_div
from llama_jax.config import ModelConfig
from llama_jax.model.llama import Llama
from llama_jax.model.trees import join
from llama_jax.params import model_for
from train.objectives.head import chunk_projection
from train.objectives.objective import Objective
from train.objectives.router import router_terms


def _token_terms(logits_f32, targets, weights):
    """Weighted sums of (negative log-likelihood, log Z squared, correct predictions).

    The row maximum serves both the stable log-sum-exp and accuracy (the
    target is predicted when its logit is the maximum), which saves an argmax
    pass over [tokens, vocab].
    """
    row_max = jax.lax.stop_gradient(jnp.max(logits_f32, axis=-1, keepdims=True))
    log_z = jnp.log(jnp.sum(jnp.exp(logits_f32 - row_max), axis=-1)) + row_max[..., 0]
    target_logit = jnp.take_along_axis(logits_f32, targets[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit
    correct = (target_logit >= row_max[..., 0]).astype(jnp.float32)
    return (jnp.sum(weights * nll), jnp.sum(weights * log_z ** 2), jnp.sum(weights * correct))


def cross_entropy_sums(logits_btv, targets_bt, weights_bt):
    """(sum of weighted NLL, sum of weighted log Z^2, weighted correct count) from logits."""
    return _token_terms(logits_btv.astype(jnp.float32), targets_bt, weights_bt)


def chunked_cross_entropy_sums(project: Callable, hidden_btd, targets_bt, weights_bt, chunk: int):
    """The same sums as `cross_entropy_sums(project(hidden))`, `chunk` positions at a time.

    hidden_btd: [B, T, D]; targets_bt int [B, T]; weights_bt float [B, T];
    `project` maps [B, chunk, D] to logits [B, chunk, V]. Returns three
    float32 scalars. See `chunked_sums` for how positions are chunked.
    """
    def terms(hidden, targets, weights):
        return _token_terms(project(hidden).astype(jnp.float32), targets, weights)
    return chunked_sums(terms, chunk, hidden_btd, targets_bt, weights_bt)


def chunked_sums(terms: Callable, chunk: int, *arrays_bt):
    """Sum `terms(*chunk_arrays)` over chunks of `chunk` positions of `arrays_bt`.

    arrays_bt: arrays [B, T, ...] sharing B and T (hidden states [B, T, D]
    are constrained to ("batch", "length", "embed") inside each chunk).
    `terms` takes the same arrays cut to [B, chunk, ...] and returns a tuple
    of float32 arrays of fixed shapes (scalars, or [B] for per-row sums);
    the result is their sum over all chunks. Each chunk is recomputed in the
    backward pass, so logits of one chunk at a time are ever held.

    Chunks are strided, not contiguous: with n = ceil(T / chunk) scan steps,
    step j holds positions j, j + n, j + 2n, ... A layout that splits the
    length (fsdp_sp) holds contiguous blocks of positions, so every device
    owns its share of every chunk and each step reads only local data; a
    contiguous chunk would lie on one device and be gathered to all of them.
    A length that is not a multiple of `chunk` is padded with zeros in every
    array, so `terms` must vanish where its weights are 0 (under a split
    length, the padding moves hidden states once, before the scan).
    """
    b, t = arrays_bt[0].shape[:2]
    n = ceil_div(t, chunk)
    pad = n * chunk - t
    if pad:
        arrays_bt = tuple(jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)) for x in arrays_bt)

    def split(x):  # [B, chunk * n, ...] -> [n, B, chunk, ...]; step j: positions j, j + n, ...
        return jnp.moveaxis(x.reshape(b, chunk, n, *x.shape[2:]), 2, 0)

    def constrain(x):
        return nn.with_logical_constraint(x, ("batch", "length", "embed")) if x.ndim == 3 else x

    shapes = jax.eval_shape(terms, *(x[:, :chunk] for x in arrays_bt))

    @jax.checkpoint
    def one_chunk(sums, xs):
        return tuple(s + x for s, x in zip(sums, terms(*map(constrain, xs)))), None

    zeros = tuple(jnp.zeros(s.shape, jnp.float32) for s in shapes)
    sums, _ = jax.lax.scan(one_chunk, zeros, tuple(split(x) for x in arrays_bt))
    return sums


def target_log_probs(logits_btv, targets_bt):
    """float32 [B, T]: log softmax(logits)[target] at every position (log-sum-exp in float32)."""
    logits = logits_btv.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
    return target_logit - jax.nn.logsumexp(logits, axis=-1)


# --- As a run's objective. ---------------------------------------------------------


def loss_sums(model: Llama, params, batch, z_loss: float, chunk: int):
    """(objective to differentiate, (nll sum, z sum, correct, weight sum, router sums)) for one
    micro-batch; router sums ({} without experts): train/objectives/router.py."""
    weights = batch["loss_weights"].astype(jnp.float32)
    args = (batch["tokens"], batch["positions"], batch.get("segment_ids"))
    images = {"images": batch["images"]} if "images" in batch else {}
    moe = model.config.moe
    aux = {} if moe is None else {"return_aux": True}  # a MoE model also returns router statistics
    if chunk:
        hidden, _, *statistics = model.apply({"params": params}, *args, return_hidden=True, **images, **aux)
        project = chunk_projection(model, params)  # the head gathered once, not once a chunk
        nll, z, correct = chunked_cross_entropy_sums(project, hidden, batch["targets"], weights, chunk)
    else:
        logits, _, *statistics = model.apply({"params": params}, *args, **images, **aux)
        nll, z, correct = cross_entropy_sums(logits, batch["targets"], weights)
    value, router = nll + z_loss * z, {}
    if moe is not None:
        term, router = router_terms(moe, statistics[0], jnp.sum(weights))
        value = value + term
    return value, (nll, z, correct, jnp.sum(weights), router)


def cross_entropy(config: ModelConfig, z_loss: float = 0.0, chunk: int = 0) -> Objective:
    """Next-token cross-entropy (pre-training, SFT) with optional z-loss (and a MoE model's router
    losses), as an Objective."""
    model = model_for(config)

    def sums(params, frozen, reference, batch):
        value, (nll, z, correct, weight, router) = loss_sums(model, join(frozen, params), batch, z_loss, chunk)
        return value, {"loss": nll, "z_loss": z, "accuracy": correct, "weight": weight, **router}

    return Objective(sums)
