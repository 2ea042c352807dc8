"""An RL run's step from its config: the rollout, the reward and the algorithm's advantages
around the update program train/program.py builds (train/rl/step.py `RLStep`)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax.config import ModelConfig
from sharding.place import Placement
from train.config import RunConfig
from train.data.prompts import Prompts
from train.objectives.grpo import group_advantages
from train.rl.rewards import FunctionReward, ModelReward, reward_model_config
from train.objectives.policy_gradient import TOKEN_KEYS
from train.rl.rollout import make_rollout
from train.rl.step import RLStep
from train.step import batch_shardings


def check_reward(run: RunConfig) -> ModelConfig | None:
    """The reward model's config (None for a reward function), checked before anything is
    written: ConfigError (one line) for a model without the score head or with another vocabulary."""
    if run.grpo.reward_model is None:
        return None
    return reward_model_config(run.grpo.reward_model, run.model)


def build_rl_step(run: RunConfig, placement: Placement, update, tokenizer, reward_config: ModelConfig | None) -> RLStep:
    """The GRPO step of `run` on `placement` around `update` (the TrainProgram's jitted step);
    `tokenizer` the prompts'; `reward_config`: `check_reward`'s. Loads a reward model's weights
    onto the run's mesh; compiles nothing until the first call."""
    g = run.grpo
    rollout = make_rollout(run.model, group=g.group, temperature=g.temperature, max_new_tokens=g.max_new_tokens,
                           prompt_len=run.data.seq_len, stops=tokenizer.stop_ids, seed=run.seed,
                           reference=g.kl != "none")
    replicated = NamedSharding(placement.mesh, PartitionSpec())
    rollout = jax.jit(rollout, out_shardings=(batch_shardings(placement, (), TOKEN_KEYS), replicated, replicated))
    if reward_config is None:
        reward = FunctionReward(g.reward, Prompts(run.data.paths, tokenizer), tokenizer)
    else:
        reward = ModelReward(g.reward_model, reward_config,
                             Placement.create(reward_config, placement.layout, devices=placement.mesh.devices.flat))
    return RLStep(rollout, update, reward, lambda rewards: np.asarray(group_advantages(rewards)), g.group,
                  placement.sharding("batch"), g.log_prob_tolerance)
