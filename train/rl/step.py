"""One RL step: rollouts, rewards, advantages, then several optimizer steps on them.

    step = RLStep(rollout, update, reward, advantages, group, row_sharding, tolerance)
    state, metrics = step(state, prompts)        # what train.loop runs in place of a train step

The algorithm is in its two arguments: `advantages` (rewards [p, G] -> advantages [p * G];
GRPO's group normalisation, train/objectives/grpo.py) and `update` (the jitted program
applying the objective's optimizer steps, train/program.py). The rest is shared: the
jitted rollout (train/rl/rollout.py) on the live parameters, the reward on the host or the
mesh (train/rl/rewards.py), and the metrics: the update's (loss, kl, clip_fraction, ...)
with reward_mean and reward_std (over every answer of the step), response_length, entropy
and log_prob_error, and where the step's time went (rollout_time_s: sampling with the
reference's pass and the check; reward_time_s; update_time_s). A log_prob_error above
`tolerance` is said in one line on the console (the step's number, the error and the
tolerance).

Everything random derives from the run's seed and the step count the checkpoint holds, so
a resumed run samples the same answers.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import numpy as np

from train.objectives.policy_gradient import ADVANTAGES
from train.tracking.metrics import note


@dataclasses.dataclass
class RLStep:
    """`step(state, prompts) -> (state, metrics)` (see the module docstring).

    rollout: jitted `rollout(params, frozen, reference, prompts, step) -> (batch, answers, stats)`;
    update: jitted `update(state, batch) -> (state, metrics)`, the state donated;
    reward: `reward(index_b, answers_bn, batch) -> float32 [b]`; advantages: numpy rewards
    [p, group] -> float32 [p * group]; row_sharding: where per-row values of the batch go.
    """

    rollout: Callable
    update: Callable
    reward: Callable
    advantages: Callable
    group: int
    row_sharding: jax.sharding.Sharding
    tolerance: float

    def __call__(self, state, prompts):
        step = state.step
        start = time.perf_counter()
        batch, answers, stats = self.rollout(state.params, state.frozen, state.reference, prompts, step)
        index = np.repeat(np.asarray(jax.device_get(prompts["index"])), self.group)
        answers = np.asarray(jax.device_get(answers))
        sampled = time.perf_counter()
        rewards = self.reward(index, answers, batch)
        advantages = np.asarray(self.advantages(rewards.reshape(-1, self.group)), np.float32).reshape(-1)
        batch[ADVANTAGES] = jax.device_put(advantages, self.row_sharding)
        rewarded = time.perf_counter()
        state, metrics = self.update(state, batch)
        jax.block_until_ready(state.params)  # the next rollout waits for them anyway
        done = time.perf_counter()
        timings = {"rollout_time_s": sampled - start, "reward_time_s": rewarded - sampled,
                   "update_time_s": done - rewarded}
        error = float(stats["log_prob_error"])
        if error > self.tolerance:
            note(f"step {int(step) + 1}: the sampler's log-probabilities differ from the training forward "
                 f"pass's by {error:.2e} (grpo.log_prob_tolerance {self.tolerance:g})")
        return state, {**metrics, **stats, "reward_mean": np.float32(rewards.mean()),
                       "reward_std": np.float32(rewards.std()), **timings}
