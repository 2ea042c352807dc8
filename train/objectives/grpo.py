"""Group relative policy optimisation (GRPO, Shao et al. 2024, DeepSeekMath), token-level.

For each prompt the policy samples a group of G answers (train/rl/rollout.py), each scored
by a reward r. An answer's advantage is its reward against its group's,

    A = (r - mean(group)) / (std(group) + ADVANTAGE_EPS)       (std with ddof 0)

so a group of equal rewards teaches nothing (A = 0 exactly). Every answer token t then
carries A, and with rho_t = exp(log pi(t) - log pi_old(t)) the ratio of the policy being
trained to the one that sampled (pi_old: the sampler's own log-probabilities),

    loss_t = -min(rho_t A, clip(rho_t, 1 - epsilon, 1 + epsilon) A) + beta * KL_t
    loss   = sum over answer tokens of loss_t / answer tokens of the batch

(token-level, as DAPO averages: a long answer weighs by its tokens, not as one sample).
KL_t estimates KL(pi || pi_ref) against a frozen reference from the sampled token alone,
with d = log pi_ref(t) - log pi(t), by the estimator `grpo.kl` names
(train/objectives/policy_gradient.py `kl_estimate`):

    k3    exp(d) - d - 1     (Schulman 2020, "Approximating KL divergence"; >= 0, unbiased)
    k1    -d                 (the plain log-ratio; unbiased, can be negative)
    none  0                  (no reference model runs)

Log-probabilities are of the sampling distribution: the logits divided by the sampling
temperature (train/rl/rollout.py samples from exactly that distribution).

Metrics per answer token: loss, kl (the estimator's mean), clip_fraction (tokens with
|rho - 1| > epsilon: their clipped term has no gradient in the direction that moved them),
ratio (the mean of rho); and the step's `tokens`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.config import ModelConfig
from llama_jax.model.llama import Llama
from llama_jax.model.trees import join
from train.objectives.cross_entropy import chunked_sums, target_log_probs
from train.objectives.head import chunk_projection
from train.objectives.objective import Objective
from train.objectives.policy_gradient import (ADVANTAGES, OLD_LOG_PROBS, REFERENCE_LOG_PROBS, check_estimator,
                                              kl_estimate, sampled_log_probs)

ADVANTAGE_EPS = 1e-4  # keeps a group of near-equal rewards from dividing by ~0
NAMES = ("loss", "kl", "clip_fraction", "ratio", "weight")  # grpo_sums' sums


def group_advantages(rewards_pg):
    """float32 [P, G]: each answer's reward normalised within its prompt's group (see the module
    docstring); rewards_pg: float [P, G], G answers of each of P prompts."""
    rewards_pg = rewards_pg.astype(jnp.float32)
    centred = rewards_pg - jnp.mean(rewards_pg, axis=1, keepdims=True)
    return centred / (jnp.std(rewards_pg, axis=1, keepdims=True) + ADVANTAGE_EPS)


def grpo_sums(policy_bt, old_bt, reference_bt, advantages, weights_bt, *, epsilon: float, beta: float,
              estimator: str) -> tuple[jax.Array, dict]:
    """(summed loss, sums) of the clipped objective over the weighted (answer) tokens.

    policy_bt, old_bt, reference_bt: float32 [B, T] log-probabilities of each target under the
    policy being trained, the sampler and the reference; advantages: float32 [B], or [B, T]
    (each token its row's); weights_bt: float32 [B, T], 1 on answer tokens. Sums of loss, kl,
    clip_fraction, ratio, and "weight" = answer tokens.
    """
    ratio = jnp.exp(policy_bt - old_bt)
    advantage = advantages[:, None] if advantages.ndim == 1 else advantages
    surrogate = jnp.minimum(ratio * advantage, jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon) * advantage)
    kl = kl_estimate(policy_bt, reference_bt, estimator)
    losses = -surrogate + beta * kl

    def total(x):
        return jnp.sum(weights_bt * x)

    clipped = (jnp.abs(ratio - 1.0) > epsilon).astype(jnp.float32)
    sums = {"loss": total(losses), "kl": total(kl), "clip_fraction": total(clipped),
            "ratio": total(jax.lax.stop_gradient(ratio)), "weight": jnp.sum(weights_bt)}
    return sums["loss"], sums


def grpo(config: ModelConfig, *, epsilon: float, beta: float, estimator: str, temperature: float,
         chunk: int = 0) -> Objective:
    """The GRPO objective of `config`'s policy on a rollout batch (train/rl/rollout.py `update_rows`:
    the token arrays, OLD_LOG_PROBS and REFERENCE_LOG_PROBS [B, T], ADVANTAGES [B]). With `chunk`
    (the run's loss_chunk), logits are made `chunk` positions at a time, never for the whole
    batch (train/objectives/cross_entropy.py `chunked_sums`)."""
    check_estimator(estimator)
    model = Llama(config)
    settings = {"epsilon": epsilon, "beta": beta, "estimator": estimator}

    def sums(params, frozen, reference, batch):
        full = join(frozen, params)
        weights = batch["loss_weights"].astype(jnp.float32)
        keys = (batch[OLD_LOG_PROBS], batch[REFERENCE_LOG_PROBS])
        if not chunk:
            mine = sampled_log_probs(model, full, batch, temperature)
            return grpo_sums(mine, *keys, batch[ADVANTAGES], weights, **settings)
        hidden, _ = model.apply({"params": full}, batch["tokens"], batch["positions"], batch["segment_ids"],
                                return_hidden=True)
        project = chunk_projection(model, full)

        def terms(hidden, targets, weights, old, reference, advantages):
            mine = target_log_probs(project(hidden).astype(jnp.float32) / temperature, targets)
            return tuple(grpo_sums(mine, old, reference, advantages, weights, **settings)[1][name] for name in NAMES)

        advantages = jnp.broadcast_to(batch[ADVANTAGES][:, None], weights.shape)
        out = dict(zip(NAMES, chunked_sums(terms, chunk, hidden, batch["targets"], weights, *keys, advantages)))
        return out["loss"], out

    return Objective(sums, count="tokens")
