"""Direct preference optimisation (DPO, Rafailov et al. 2023), as in Llama 3's post-training.

A batch holds one preference pair per row (train/data/pipeline.py, source "preference"):
the chosen conversation is segment 1 and the rejected one segment 2, each
with loss weight 1 on its final answer (and the token closing it) only. With
log p(y) the sum of the answer's token log-probabilities under a model,

    r_chosen   = beta * (log p_policy(chosen)   - log p_reference(chosen))
    r_rejected = beta * (log p_policy(rejected) - log p_reference(rejected))
    loss       = -log sigmoid(r_chosen - r_rejected)      (mean over pairs)

The reference is a frozen model: a copy of the starting weights sharded like
the policy (it rides in `TrainState.reference`), or, in a LoRA run, the
policy's own frozen base without its adapters (no second copy); or no model
at all when the batch carries its log-probabilities, computed once
(train/dpo_reference.py, `data.reference_log_probs`). Metrics per pair:
loss, chosen_reward, rejected_reward, margin (r_chosen - r_rejected) and
accuracy (the share of pairs with a positive margin).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.config import ModelConfig
from llama_jax.model.llama import Llama
from llama_jax.model.trees import join
from train.objectives.cross_entropy import chunked_sums, target_log_probs
from train.data.reference_log_probs import REFERENCE_KEYS
from train.objectives.head import chunk_projection
from train.objectives.objective import Objective

CHOSEN, REJECTED = 1, 2  # segment ids of a pair's two conversations within its row


def _answer_sums(logits_btv, targets_bt, weights_bt, segments_bt):
    """(chosen [B], rejected [B]): weighted target log-probs summed over each segment."""
    logp_bt = weights_bt * target_log_probs(logits_btv, targets_bt)
    return (jnp.sum(jnp.where(segments_bt == CHOSEN, logp_bt, 0.0), axis=-1),
            jnp.sum(jnp.where(segments_bt == REJECTED, logp_bt, 0.0), axis=-1))


def answer_log_probs(model: Llama, params, batch, chunk: int = 0):
    """(chosen [B], rejected [B]) float32: the log-probability of each row's two answers.

    batch: the training batch dict ([B, T] arrays, see train/data/pipeline.py); only
    targets weighted in "loss_weights" count. With `chunk`, the logits are
    made `chunk` positions at a time (train/objectives/cross_entropy.py, `chunked_sums`).
    """
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    weights = batch["loss_weights"].astype(jnp.float32)
    if not chunk:
        logits, _ = model.apply({"params": params}, *args)
        return _answer_sums(logits, batch["targets"], weights, batch["segment_ids"])
    hidden, _ = model.apply({"params": params}, *args, return_hidden=True)
    project = chunk_projection(model, params)  # the head gathered once, not once a chunk

    def terms(hidden, targets, weights, segments):
        return _answer_sums(project(hidden), targets, weights, segments)

    return chunked_sums(terms, chunk, hidden, batch["targets"], weights, batch["segment_ids"])


def dpo_sums(policy: tuple, reference: tuple, beta: float, valid_b) -> tuple[jax.Array, dict]:
    """(summed loss, sums) from the answers' log-probs under policy and reference.

    policy, reference: (chosen [B], rejected [B]) log-probabilities; valid_b:
    bool [B], the rows that hold a pair. Sums over valid rows of loss,
    chosen_reward, rejected_reward, margin, accuracy, and "weight" = pairs.
    """
    chosen = beta * (policy[0] - reference[0])
    rejected = beta * (policy[1] - reference[1])
    margin = chosen - rejected
    losses = -jax.nn.log_sigmoid(margin)

    def total(x):
        return jnp.sum(jnp.where(valid_b, x, 0.0))

    sums = {"loss": total(losses), "chosen_reward": total(chosen), "rejected_reward": total(rejected),
            "margin": total(margin), "accuracy": total((margin > 0).astype(jnp.float32)),
            "weight": total(jnp.ones_like(margin))}
    return sums["loss"], sums


def dpo(config: ModelConfig, beta: float, chunk: int = 0) -> Objective:
    """The DPO objective for `config`'s policy (see the module docstring).

    The reference's parameters are the step's `reference` (a full model like
    the policy's), or with `config.lora` the step's `frozen` base, run
    without adapters; a batch holding REFERENCE_KEYS (float32 [B], the
    reference's log-probabilities of each row's answers) needs neither.
    """
    policy = Llama(config)
    lora = config.lora is not None
    reference_model = Llama(config.replace(lora=None)) if lora else policy

    def sums(params, frozen, reference, batch):
        weights, segments = batch["loss_weights"], batch["segment_ids"]
        valid = (jnp.sum(jnp.where(segments == CHOSEN, weights, 0), -1) > 0) & \
            (jnp.sum(jnp.where(segments == REJECTED, weights, 0), -1) > 0)
        mine = answer_log_probs(policy, join(frozen, params), batch, chunk)
        if REFERENCE_KEYS[0] in batch:  # computed once: no reference model runs
            theirs = tuple(batch[key] for key in REFERENCE_KEYS)
        else:
            theirs = jax.lax.stop_gradient(answer_log_probs(reference_model, frozen if lora else reference,
                                                            batch, chunk))
        return dpo_sums(mine, theirs, beta, valid)

    return Objective(sums, count="pairs")
