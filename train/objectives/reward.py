"""Reward models (Llama 2, Touvron et al. 2023, section 3.2.2): the Bradley-Terry loss on pairs.

A batch holds one preference pair per row (train/data/example_rows.py `PairRows`
with `reward`): the chosen conversation whole as segment 1, the rejected one
as segment 2. The model (a Llama with the score head, `ModelConfig.head`)
scores each at its last token (llama_jax/model/reward.py), and per pair

    loss = -log sigmoid(r_chosen - r_rejected - m)

where m is 0, or with `margin` the pair's margin (Llama 2's m(rating), larger
for pairs whose answers the raters told apart more clearly), from the line's
"margin" field. Metrics per pair: loss, accuracy (the share of pairs whose
chosen answer scores higher), reward_gap (r_chosen - r_rejected),
chosen_reward and rejected_reward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.config import ModelConfig
from llama_jax.model.llama import Llama
from llama_jax.model.reward import last_scores
from llama_jax.model.trees import join
from train.data.example_rows import MARGIN_KEY
from train.objectives.dpo import CHOSEN, REJECTED
from train.objectives.objective import Objective


def bradley_terry_sums(chosen_b, rejected_b, margin_b, valid_b) -> tuple[jax.Array, dict]:
    """(summed loss, sums) from each pair's rewards (float32 [B]) and margins (float32 [B], zeros
    for none); valid_b: bool [B], the rows that hold a pair. Sums over valid rows of loss,
    accuracy, reward_gap, chosen_reward, rejected_reward, and "weight" = pairs."""
    gap = chosen_b - rejected_b
    losses = -jax.nn.log_sigmoid(gap - margin_b)

    def total(x):
        return jnp.sum(jnp.where(valid_b, x, 0.0))

    sums = {"loss": total(losses), "accuracy": total((gap > 0).astype(jnp.float32)), "reward_gap": total(gap),
            "chosen_reward": total(chosen_b), "rejected_reward": total(rejected_b),
            "weight": total(jnp.ones_like(gap))}
    return sums["loss"], sums


def pair_rewards(model: Llama, params, batch):
    """(chosen [B], rejected [B], valid [B]): the reward of each row's two conversations, read at
    each segment's last token, and whether the row holds both."""
    segments = batch["segment_ids"]
    scores, _ = model.apply({"params": params}, batch["tokens"], batch["positions"], segments)
    chosen, rejected = segments == CHOSEN, segments == REJECTED
    valid = jnp.any(chosen, axis=1) & jnp.any(rejected, axis=1)
    return last_scores(scores, chosen), last_scores(scores, rejected), valid


def reward(config: ModelConfig, margin: bool = False) -> Objective:
    """The Bradley-Terry objective of a reward model `config` (head "score"), with Llama 2's
    margin term when `margin` (see the module docstring)."""
    model = Llama(config)

    def sums(params, frozen, reference, batch):
        chosen, rejected, valid = pair_rewards(model, join(frozen, params), batch)
        margins = batch[MARGIN_KEY] if margin else jnp.zeros_like(chosen)
        return bradley_terry_sums(chosen, rejected, margins, valid)

    return Objective(sums, count="pairs")
