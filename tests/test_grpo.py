"""GRPO: its arithmetic against NumPy, rollouts against the training forward pass, layouts,
a tiny run that learns, resume after SIGKILL, and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.objectives.grpo import ADVANTAGE_EPS, grpo_sums, group_advantages, kl_estimate


def _numpy_grpo(policy, old, reference, rewards, weights, epsilon, beta, group):
    """The token-level GRPO loss written out independently, in float64."""
    r = rewards.reshape(-1, group).astype(np.float64)
    adv = ((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + ADVANTAGE_EPS)).reshape(-1)
    total, count, kl_total, clipped = 0.0, 0.0, 0.0, 0.0
    for b in range(policy.shape[0]):
        for t in range(policy.shape[1]):
            if not weights[b, t]:
                continue
            ratio = np.exp(policy[b, t] - old[b, t])
            surrogate = min(ratio * adv[b], min(max(ratio, 1 - epsilon), 1 + epsilon) * adv[b])
            d = reference[b, t] - policy[b, t]
            kl = np.exp(d) - d - 1
            total += -surrogate + beta * kl
            kl_total += kl
            clipped += abs(ratio - 1) > epsilon
            count += 1
    return total / count, kl_total / count, clipped / count


def test_grpo_loss_equals_numpy_on_a_hand_made_batch():
    """Two prompts of three answers each, answers of uneven length (zero weights past the end):
    the loss, KL and clip fraction per answer token equal the loop above, in float64."""
    rng = np.random.default_rng(0)
    b, t, group = 6, 5, 3
    old = np.log(rng.uniform(0.05, 0.9, (b, t)))
    policy = old + rng.normal(0, 0.3, (b, t))  # some ratios beyond 1 +- 0.2, some inside
    reference = old + rng.normal(0, 0.2, (b, t))
    weights = (np.arange(t)[None, :] < np.array([5, 3, 1, 4, 2, 5])[:, None]).astype(np.float32)
    rewards = np.array([1.0, 0.0, 0.5, 2.0, 2.0, -1.0], np.float32)
    adv = np.asarray(group_advantages(jnp.asarray(rewards.reshape(-1, group)))).reshape(-1)
    value, sums = grpo_sums(*(jnp.asarray(x, jnp.float32) for x in (policy, old, reference)), jnp.asarray(adv),
                            jnp.asarray(weights), epsilon=0.2, beta=0.05, estimator="k3")
    loss, kl, clipped = _numpy_grpo(policy, old, reference, rewards, weights, 0.2, 0.05, group)
    n = float(sums["weight"])
    assert n == weights.sum() == 20
    assert 0 < clipped < 1, "the batch should hold clipped and unclipped tokens"
    assert float(value) == float(sums["loss"])
    np.testing.assert_allclose(float(sums["loss"]) / n, loss, rtol=1e-5)
    np.testing.assert_allclose(float(sums["kl"]) / n, kl, rtol=1e-5)
    np.testing.assert_allclose(float(sums["clip_fraction"]) / n, clipped, rtol=1e-6)


def test_a_group_of_equal_rewards_has_zero_advantages():
    rewards = jnp.asarray([[0.7, 0.7, 0.7, 0.7], [0.0, 1.0, 0.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    adv = np.asarray(group_advantages(rewards))
    assert np.all(adv[0] == 0) and np.all(adv[2] == 0)
    np.testing.assert_allclose(adv[1], [-1, 1, -1, 1], rtol=1e-3)  # std 0.5: (r - 0.5) / 0.5


def test_kl_estimators_match_their_formulas():
    """k3 (Schulman): exp(r - p) - (r - p) - 1, never negative; k1: p - r; none: 0."""
    policy = np.array([-1.0, -2.5, -0.1, -3.0])
    reference = np.array([-1.2, -0.5, -0.1, -4.0])
    d = reference - policy
    got = {name: np.asarray(kl_estimate(jnp.asarray(policy), jnp.asarray(reference), name))
           for name in ("k3", "k1", "none")}
    np.testing.assert_allclose(got["k3"], np.exp(d) - d - 1, rtol=1e-6)
    assert np.all(got["k3"] >= 0) and got["k3"][2] == 0
    np.testing.assert_allclose(got["k1"], policy - reference, rtol=1e-6)
    assert np.all(got["none"] == 0)
    with pytest.raises(ValueError, match="grpo.kl: 'k2'"):
        kl_estimate(jnp.asarray(policy), jnp.asarray(reference), "k2")
