"""PPO's arithmetic (Schulman et al. 2017) as Llama 2 used it for RLHF (Touvron et al. 2023, 3.2.3).

The policy samples an answer; a reward model scores the whole answer once. As in
InstructGPT and Llama 2, the reward is spread over the answer's tokens with a
per-token KL penalty to the frozen reference (the starting policy):

    r_t = -kl_coef * (log pi(t) - log pi_ref(t))           every answer token t
    r_T += R                                                the answer's last token: its reward

A value model V (a Llama with the score head, llama_jax/model/reward.py: the reward
model's own parameters as it starts, or the policy's) predicts, at each answer
token, the return from that token on. Advantages are generalised advantage
estimates (GAE, Schulman et al. 2016) over the answer's tokens, with the answer's
end terminal (no value past it):

    delta_t = r_t + gamma * V(t+1) - V(t)        (V(T+1) = 0)
    A_t     = delta_t + gamma * lambda * A_{t+1}  (A_{T+1} = 0)
    G_t     = A_t + V(t)                          the value model's target

The policy's loss is the clipped ratio objective of train/objectives/grpo.py with
these per-token advantages and no KL term of its own (the KL is in the reward).
The value loss is clipped around the values the rollout saw, as in the PPO
baselines:

    L_V = 1/2 * max((V - G)^2, (clip(V, V_old - c, V_old + c) - G)^2)

Arrays are [B, T] over a rollout batch's rows with `weights_bt` 1 on answer tokens
(each row one prompt and answer, its answer one contiguous run of positions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from train.objectives.grpo import grpo_sums


def kl_shaped_rewards(policy_bt, reference_bt, rewards_b, weights_bt, kl_coef: float):
    """float32 [B, T]: each answer token's reward, -kl_coef times its log-ratio to the reference,
    plus the answer's reward `rewards_b` [B] on its last answer token; 0 off the answer."""
    weights = weights_bt.astype(jnp.float32)
    shaped = -kl_coef * (policy_bt - reference_bt) * weights
    t = weights.shape[1]
    last_b = jnp.max(jnp.where(weights > 0, jnp.arange(t), -1), axis=1)
    final = (jnp.arange(t)[None, :] == last_b[:, None]).astype(jnp.float32)
    return shaped + final * rewards_b[:, None].astype(jnp.float32)


def gae(rewards_bt, values_bt, weights_bt, gamma: float, lam: float):
    """(advantages, returns), float32 [B, T]: generalised advantage estimates over each row's
    answer tokens (weights 1) and the value targets A + V; both 0 off the answer. The step
    after an answer's last token is terminal."""
    weights = weights_bt.astype(jnp.float32)
    rewards, values = rewards_bt.astype(jnp.float32) * weights, values_bt.astype(jnp.float32) * weights

    def back(carry, x):
        next_value, next_advantage = carry
        reward, value, weight = x
        delta = reward + gamma * next_value - value
        advantage = (delta + gamma * lam * next_advantage) * weight
        # off the answer nothing carries: an answer's last token sees a terminal next step
        return (value * weight, advantage), advantage

    zeros = jnp.zeros(weights.shape[0], jnp.float32)
    _, advantages_tb = jax.lax.scan(back, (zeros, zeros), (rewards.T, values.T, weights.T), reverse=True)
    advantages = advantages_tb.T
    return advantages, (advantages + values) * weights


def value_sums(values_bt, old_values_bt, returns_bt, weights_bt, clip: float) -> dict:
    """Sums over answer tokens of the clipped value loss (module docstring), "value_clip_fraction"
    (tokens whose clipped term is the larger) and "value_error" (|V - G|)."""
    weights = weights_bt.astype(jnp.float32)
    clipped = old_values_bt + jnp.clip(values_bt - old_values_bt, -clip, clip)
    plain, held = (values_bt - returns_bt) ** 2, (clipped - returns_bt) ** 2
    return {"value_loss": jnp.sum(weights * 0.5 * jnp.maximum(plain, held)),
            "value_clip_fraction": jnp.sum(weights * (held > plain).astype(jnp.float32)),
            "value_error": jnp.sum(weights * jnp.abs(values_bt - returns_bt))}


def ppo_sums(policy_bt, old_bt, advantages_bt, values_bt, old_values_bt, returns_bt, weights_bt, *,
             epsilon: float, value_clip: float, value_coef: float) -> tuple[jax.Array, dict]:
    """(summed loss, sums): the clipped policy loss (grpo.grpo_sums with per-token advantages and
    no KL term) plus value_coef times the clipped value loss, over the answer tokens."""
    _, sums = grpo_sums(policy_bt, old_bt, old_bt, advantages_bt, weights_bt, epsilon=epsilon, beta=0.0,
                        estimator="none")
    sums = {**sums, **value_sums(values_bt, old_values_bt, returns_bt, weights_bt, value_clip)}
    sums["policy_loss"] = sums["loss"]
    sums["loss"] = sums["policy_loss"] + value_coef * sums["value_loss"]
    return sums["loss"], sums
