"""What policy-gradient objectives share (GRPO, and PPO's arithmetic in ppo.py): the rollout batch's keys, the
log-probabilities of sampled tokens, and estimators of the KL divergence to a reference.

A rollout batch (train/rl/rollout.py) holds the token arrays of train/step.py's batch, one
answer after its prompt a row, and beside them per token ([B, T], aligned with "targets"):
OLD_LOG_PROBS (the sampler's log-probability of each target) and REFERENCE_LOG_PROBS (the
frozen reference's); per row ([B]): ADVANTAGES.
"""

from __future__ import annotations

import jax.numpy as jnp

from llama_jax.model.llama import Llama
from train.config_sections import KL_ESTIMATORS
from train.objectives.cross_entropy import target_log_probs

OLD_LOG_PROBS, REFERENCE_LOG_PROBS, ADVANTAGES = "old_log_probs", "reference_log_probs", "advantages"
TOKEN_KEYS = (OLD_LOG_PROBS, REFERENCE_LOG_PROBS)


def sampled_log_probs(model: Llama, params, batch, temperature: float):
    """float32 [B, T]: each target's log-probability under `model`'s logits divided by `temperature`
    (the distribution a rollout samples from); batch: token arrays [B, T] (tokens, positions,
    segment_ids, targets)."""
    logits, _ = model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"])
    return target_log_probs(logits.astype(jnp.float32) / temperature, batch["targets"])


def kl_estimate(policy, reference, estimator: str):
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probabilities
    (float32, any shape), with d = reference - policy:

        k3    exp(d) - d - 1     (Schulman 2020, "Approximating KL divergence"; >= 0, unbiased)
        k1    -d                 (the plain log-ratio; unbiased, can be negative)
        none  0                  (no reference model runs)
    """
    check_estimator(estimator)
    d = reference - policy
    if estimator == "k3":
        return jnp.exp(d) - d - 1.0
    if estimator == "k1":
        return -d
    return jnp.zeros_like(d)  # none


def check_estimator(estimator: str) -> None:
    """ValueError (one line) unless `estimator` names one of KL_ESTIMATORS."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"grpo.kl: {estimator!r} is not one of {', '.join(KL_ESTIMATORS)}")
