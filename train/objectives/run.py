"""What a run minimises, and the fixed model it compares with.

The run config picks the objective (train/objectives/objective.py `Objective`):
cross-entropy, DPO (a `dpo:` section), a reward model (`reward:`), logit
distillation (`distill:`) or GRPO (`grpo:`). DPO's and GRPO's reference policy
(unless a LoRA run's base serves) and the distillation teacher ride in
`TrainState.reference`, placed on the run's mesh; this module says where (their
shardings) and loads them.
`train.program` builds the run's step from these (the step `train.loop` runs and
`train.compile` compiles ahead of time), and `train.dpo_reference` runs a DPO
run's reference once.
"""

from __future__ import annotations

import jax

from llama_jax.config import ModelConfig
from llama_jax.formats.weights import load_params, stored_config
from llama_jax.params import init_params
from sharding.place import Placement
from train.config import RunConfig
from train.data.reference_log_probs import REFERENCE_KEYS
from train.objectives.cross_entropy import cross_entropy
from train.objectives.distill import check_teacher, distill, teacher_config
from train.objectives.dpo import dpo
from train.objectives.grpo import grpo
from train.objectives.policy_gradient import ADVANTAGES, TOKEN_KEYS
from train.objectives.objective import Objective
from train.objectives.reward import reward
from train.data.example_rows import MARGIN_KEY


def teacher_placement(run: RunConfig, layout, devices=None) -> Placement | None:
    """The distillation teacher's placement on the run's layout over `devices` (the student's;
    None: all), from its stored config alone (no weights read); None without distillation.
    ConfigError (one line) if its vocabulary is not the student's."""
    if run.distill is None:
        return None
    config = teacher_config(stored_config(run.distill.teacher), run.model)
    check_teacher(config, run.model, run.distill.teacher)
    return Placement.create(config, layout, devices=devices)


def run_objective(run: RunConfig, teacher: Placement | None) -> Objective:
    """What the run minimises; `teacher`: `teacher_placement`'s, for distillation."""
    if run.grpo is not None:
        g = run.grpo
        return grpo(run.model, epsilon=g.epsilon, beta=g.beta, estimator=g.kl, temperature=g.temperature,
                    chunk=run.loss_chunk)
    if run.dpo is not None:
        return dpo(run.model, run.dpo.beta, run.loss_chunk)
    if run.reward is not None:
        return reward(run.model, run.reward.margin)
    if run.distill is not None:
        return distill(run.model, teacher.config, run.distill.alpha, run.distill.temperature, run.loss_chunk)
    return cross_entropy(run.model, run.z_loss, run.loss_chunk)


def batch_row_keys(run: RunConfig) -> tuple[str, ...]:
    """The batch's per-row values ([B], on batch) beside its token arrays: a DPO pair's
    reference log-probabilities when the data holds them (`data.reference_log_probs`), a
    reward model's pair margins."""
    if run.reward is not None:
        return (MARGIN_KEY,)
    if run.grpo is not None:
        return (ADVANTAGES,)
    return REFERENCE_KEYS if run.data.reference_log_probs is not None else ()


def batch_token_keys(run: RunConfig) -> tuple[str, ...]:
    """The batch's per-token values ([B, T], on batch and length) beside its token arrays: a
    GRPO run's sampler and reference log-probabilities (train/rl/rollout.py)."""
    return TOKEN_KEYS if run.grpo is not None else ()


def reference_shardings(run: RunConfig, param_shardings, teacher: Placement | None):
    """Shardings of the fixed model the objective compares with: a teacher's by its own
    placement, a DPO reference's like the policy's (`param_shardings`); none for a
    LoRA DPO run (its reference is its base) or one whose data holds the reference's
    log-probabilities, nor for cross-entropy."""
    if teacher is not None:
        return teacher.param_shardings()
    if run.dpo is not None and run.model.lora is None and run.data.reference_log_probs is None:
        return param_shardings
    if run.grpo is not None and run.model.lora is None and run.grpo.kl != "none":
        return param_shardings
    return {}


def load_reference(run: RunConfig, shardings, teacher: Placement | None):
    """The teacher's or the DPO or GRPO reference's weights placed on `shardings` (`reference_shardings`'s;
    {} when that is empty)."""
    if not shardings:
        return {}
    if teacher is not None:
        return load_params(run.distill.teacher, teacher.config, shardings)
    return dpo_reference_params(run, shardings)


def dpo_reference_params(run: RunConfig, shardings, config: ModelConfig | None = None):
    """A DPO (or GRPO) run's reference weights as `config` (default: the run's model) placed on
    `shardings`: dpo.reference, else init_from, else the policy's own random start
    (drawn again from the run's seed, so a resumed run compares with the same one)."""
    config = config or run.model
    source = (run.dpo or run.grpo).reference or run.init_from
    if source is not None:
        return load_params(source, config, shardings)
    return jax.jit(lambda rng: init_params(config, rng), out_shardings=shardings)(jax.random.key(run.seed))
