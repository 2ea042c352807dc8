"""PPO's arithmetic (train/objectives/ppo.py) against hand computations and NumPy loops."""

from __future__ import annotations

import numpy as np
import pytest

from train.objectives.ppo import gae, kl_shaped_rewards, ppo_sums, value_sums


def test_gae_of_a_short_trajectory_equals_a_hand_computation():
    # one row: 2 prompt tokens, a 3-token answer, 1 padding position; gamma 0.9, lambda 0.8
    weights = np.array([[0, 0, 1, 1, 1, 0]], np.float32)
    rewards = np.array([[9, 9, 0.1, -0.2, 1.0, 9]], np.float32)  # 9s off the answer must not count
    values = np.array([[9, 9, 0.5, 0.4, 0.3, 9]], np.float32)
    advantages, returns = gae(rewards, values, weights, gamma=0.9, lam=0.8)
    # deltas: 0.1 + 0.9*0.4 - 0.5 = -0.04; -0.2 + 0.9*0.3 - 0.4 = -0.33; 1.0 + 0 - 0.3 = 0.7
    # A_4 = 0.7; A_3 = -0.33 + 0.72*0.7 = 0.174; A_2 = -0.04 + 0.72*0.174 = 0.08528
    np.testing.assert_allclose(advantages, [[0, 0, 0.08528, 0.174, 0.7, 0]], atol=1e-6)
    np.testing.assert_allclose(returns, [[0, 0, 0.58528, 0.574, 1.0, 0]], atol=1e-6)


def _numpy_gae(rewards, values, weights, gamma, lam):
    advantages = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        answer = np.flatnonzero(weights[b])
        following = 0.0
        for i, t in reversed(list(enumerate(answer))):
            next_value = values[b, answer[i + 1]] if i + 1 < len(answer) else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            following = delta + gamma * lam * following
            advantages[b, t] = following
    return advantages, (advantages + values) * weights


def _batch(seed=0, b=4, t=12):
    rng = np.random.default_rng(seed)
    weights = np.zeros((b, t), np.float32)
    for row in range(b):  # an answer starting after a prompt of 2-4 tokens, of 1-6 tokens
        start = rng.integers(2, 5)
        weights[row, start:start + rng.integers(1, 7)] = 1
    return rng, weights


def test_gae_equals_a_numpy_loop_on_ragged_answers():
    rng, weights = _batch()
    rewards, values = rng.normal(size=weights.shape).astype(np.float32), rng.normal(size=weights.shape).astype(np.float32)
    got = gae(rewards, values, weights, gamma=0.97, lam=0.9)
    want = _numpy_gae(rewards, values, weights, 0.97, 0.9)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-6)


def test_kl_shaped_rewards_put_the_answer_reward_on_its_last_token():
    rng, weights = _batch(seed=1)
    policy, reference = rng.normal(size=(2,) + weights.shape).astype(np.float32)
    rewards_b = rng.normal(size=weights.shape[0]).astype(np.float32)
    got = np.asarray(kl_shaped_rewards(policy, reference, rewards_b, weights, kl_coef=0.05))
    want = -0.05 * (policy - reference) * weights
    for b in range(weights.shape[0]):
        want[b, np.flatnonzero(weights[b])[-1]] += rewards_b[b]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_clipped_policy_and_value_losses_equal_numpy():
    rng, weights = _batch(seed=2)
    shape = weights.shape
    old = rng.normal(-2, 0.5, size=shape).astype(np.float32)
    policy = (old + rng.normal(0, 0.3, size=shape)).astype(np.float32)  # some ratios past 1 +- 0.2
    advantages = rng.normal(size=shape).astype(np.float32)
    old_values = rng.normal(size=shape).astype(np.float32)
    values = (old_values + rng.normal(0, 0.4, size=shape)).astype(np.float32)
    returns = rng.normal(size=shape).astype(np.float32)
    eps, c, coef = 0.2, 0.2, 0.5
    loss, sums = ppo_sums(policy, old, advantages, values, old_values, returns, weights,
                          epsilon=eps, value_clip=c, value_coef=coef)

    ratio = np.exp(policy.astype(np.float64) - old)
    policy_loss = -np.minimum(ratio * advantages, np.clip(ratio, 1 - eps, 1 + eps) * advantages)
    held = old_values + np.clip(values - old_values, -c, c)
    value_loss = 0.5 * np.maximum((values - returns) ** 2, (held - returns) ** 2)
    assert float(sums["policy_loss"]) == pytest.approx(np.sum(weights * policy_loss), rel=1e-5)
    assert float(sums["value_loss"]) == pytest.approx(np.sum(weights * value_loss), rel=1e-5)
    assert float(loss) == pytest.approx(np.sum(weights * (policy_loss + coef * value_loss)), rel=1e-5)
    assert float(sums["clip_fraction"]) == np.sum(weights * (np.abs(ratio - 1) > eps))
    assert 0 < float(sums["clip_fraction"]) < weights.sum()  # the batch exercises both branches
    assert float(sums["value_clip_fraction"]) == np.sum(weights * ((held - returns) ** 2 > (values - returns) ** 2))
    assert float(sums["weight"]) == weights.sum()


def test_value_loss_is_plain_inside_the_clip_range():
    values = np.array([[0.1, 0.5]], np.float32)
    sums = value_sums(values, values + 0.05, np.array([[1.0, -1.0]], np.float32), np.ones((1, 2)), clip=0.2)
    assert float(sums["value_loss"]) == pytest.approx(0.5 * (0.9 ** 2 + 1.5 ** 2), rel=1e-6)
    assert float(sums["value_clip_fraction"]) == 0
