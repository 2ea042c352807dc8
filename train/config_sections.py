"""The sections of a run config (`train.config.RunConfig`): optimizer, eval, DPO, reward, GRPO, distillation,
Weights & Biases, the local checkpoint tier and metrics. Each checks its own values on
construction and names the field in one line."""

from __future__ import annotations

import dataclasses
import math

from llama_jax.config import ConfigError

DECAYS = ("cosine", "linear", "constant")
WANDB_MODES = ("online", "offline", "disabled")


def positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"{name}: must be a positive finite number, got {value!r}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warm-up then decay to `min_lr_ratio * learning_rate`, and clipping."""

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    decay: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0

    def __post_init__(self):
        if self.decay not in DECAYS:
            raise ConfigError(f"optimizer.decay: {self.decay!r} is not one of {', '.join(DECAYS)}")
        for name in ("learning_rate", "eps"):
            positive(f"optimizer.{name}", getattr(self, name))
        for name in ("min_lr_ratio", "weight_decay", "b1", "b2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
                raise ConfigError(f"optimizer.{name}: must be a number in [0, 1], got {value!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps: must be a non-negative integer, got {self.warmup_steps!r}")
        if self.clip_norm is not None:
            positive("optimizer.clip_norm", self.clip_norm)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation while training, every `every` steps (0: never): the held-out loss over
    `batches` batches of `data.global_batch` rows from `paths` (files of the training source),
    or, without paths, from the fraction `data.holdout` split off the training documents; and
    lm-eval `tasks` (names of tasks, groups or tags, train/lm_eval/; `task_limit` documents
    each, a count or a fraction below 1; `include_path` a directory of task YAMLs), each logged
    as its main metric `eval/<task>/<metric>` (docs/evaluation.md)."""

    every: int = 0
    batches: int = 8
    paths: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    task_limit: float | None = None
    include_path: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "paths", (self.paths,) if isinstance(self.paths, str) else tuple(self.paths))
        tasks = self.tasks.split(",") if isinstance(self.tasks, str) else list(self.tasks)
        object.__setattr__(self, "tasks", tuple(task.strip() if isinstance(task, str) else task for task in tasks))
        for name, least in (("every", 0), ("batches", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"eval.{name}: must be an integer >= {least}, got {value!r}")
        if any(not isinstance(task, str) or not task for task in self.tasks):
            raise ConfigError(f"eval.tasks: must be lm-eval task names (a list, or one comma-separated string), "
                              f"got {list(self.tasks)!r}")
        if self.tasks and not self.every:
            raise ConfigError("eval.tasks: set eval.every, the steps between two evaluations")
        limit = self.task_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0
                                  or (limit >= 1 and limit != int(limit))):
            raise ConfigError(f"eval.task_limit: must be a document count or a fraction below 1, got {limit!r}")
        if self.include_path is not None and (not isinstance(self.include_path, str) or not self.include_path):
            raise ConfigError(f"eval.include_path: must be a directory of task YAMLs, got {self.include_path!r}")


@dataclasses.dataclass(frozen=True)
class DpoConfig:
    """Direct preference optimisation (train/objectives/dpo.py): `beta` scales the implicit rewards;
    `reference` names the reference policy's weights (default: init_from, or the
    policy's own random start without it). A LoRA run's reference is its base,
    without adapters: `reference` must then stay unset."""

    beta: float = 0.1
    reference: str | None = None

    def __post_init__(self):
        positive("dpo.beta", self.beta)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """A reward model (train/objectives/reward.py): the Bradley-Terry loss on preference pairs, and
    with `margin` Llama 2's margin term, each pair's "margin" field (0 where a line has none)
    subtracted from the reward difference."""

    margin: bool = False

    def __post_init__(self):
        if not isinstance(self.margin, bool):
            raise ConfigError(f"reward.margin: must be true or false, got {self.margin!r}")


KL_ESTIMATORS = ("k3", "k1", "none")  # train/objectives/grpo.py's estimators of KL(policy || reference)


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
    """Group relative policy optimisation (train/objectives/grpo.py) on prompts (data.source prompts).

    group: answers sampled per prompt (>= 2: a group of one has no baseline).
    reward: a Python function "module:function", called as function(messages, answer) -> float;
      or reward_model: a reward model checkpoint (a score head, the policy's vocabulary). One of them.
    temperature: sampling temperature of the rollouts (> 0; no top-k or top-p, so the
      log-probabilities are those of the sampling distribution); max_new_tokens: answer length cap.
    updates: optimizer steps on each batch of rollouts; epsilon: the ratio's clip range.
    beta: weight of the KL penalty to the reference, estimated by `kl` (k3, k1, or none: no
      reference runs); reference: the reference's weights (default init_from; a LoRA run's
      reference is its base without adapters, so it stays unset).
    log_prob_tolerance: the largest difference allowed between the sampler's log-probabilities
      and the training forward pass's on the same tokens before the run says so.
    """

    group: int = 8
    reward: str | None = None
    reward_model: str | None = None
    temperature: float = 1.0
    max_new_tokens: int = 16
    updates: int = 2
    epsilon: float = 0.2
    beta: float = 0.04
    kl: str = "k3"
    reference: str | None = None
    log_prob_tolerance: float = 1e-3

    def __post_init__(self):
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 2:
            raise ConfigError(f"grpo.group: {self.group!r} answers per prompt; a group needs at least 2 (with one, "
                              "every advantage is 0 and nothing is learned)")
        for name in ("max_new_tokens", "updates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"grpo.{name}: must be a positive integer, got {value!r}")
        if (self.reward is None) == (self.reward_model is None):
            raise ConfigError("grpo.reward, grpo.reward_model: set one: a function module:function, or a reward "
                              "model checkpoint")
        if self.reward is not None and (not isinstance(self.reward, str) or ":" not in self.reward):
            raise ConfigError(f"grpo.reward: {self.reward!r}: expected module:function, e.g. my_rewards:score")
        for name in ("temperature", "epsilon", "log_prob_tolerance"):
            positive(f"grpo.{name}", getattr(self, name))
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0 <= self.beta < math.inf:
            raise ConfigError(f"grpo.beta: must be a non-negative number, got {self.beta!r}")
        if self.kl not in KL_ESTIMATORS:
            raise ConfigError(f"grpo.kl: {self.kl!r} is not one of {', '.join(KL_ESTIMATORS)}")
        if self.kl == "none" and self.beta > 0:
            raise ConfigError(f"grpo.beta: {self.beta} weighs a KL penalty, but grpo.kl is none (no reference "
                              "runs); set beta: 0, or an estimator (k3, k1)")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Logit distillation (train/objectives/distill.py): `teacher` is our checkpoint, a run directory
    or a Hugging Face directory with the student's vocabulary; the loss is
    alpha * tau^2 * KL(teacher || student) at temperature tau + (1 - alpha) * CE."""

    teacher: str | None = None
    alpha: float = 0.5
    temperature: float = 1.0

    def __post_init__(self):
        if not isinstance(self.teacher, str) or not self.teacher:
            raise ConfigError("distill.teacher: required: our checkpoint, a run directory or a Hugging Face "
                              "directory with the student's vocabulary")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ConfigError(f"distill.alpha: must be a number in [0, 1], got {self.alpha!r}")
        positive("distill.temperature", self.temperature)


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases logging (train/tracking/wandb_logging.py): the W&B `project` (required), and
    optionally the `entity` (user or team), the run's display `name` and the `mode`
    (online, offline or disabled; unset: W&B's own, $WANDB_MODE or online)."""

    project: str | None = None
    entity: str | None = None
    name: str | None = None
    mode: str | None = None

    def __post_init__(self):
        if not isinstance(self.project, str) or not self.project:
            raise ConfigError("metrics.wandb.project: required: the W&B project to log to")
        for name in ("entity", "name"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"metrics.wandb.{name}: must be a non-empty string, got {value!r}")
        if self.mode is not None and self.mode not in WANDB_MODES:
            raise ConfigError(f"metrics.wandb.mode: {self.mode!r} is not one of {', '.join(WANDB_MODES)}")


@dataclasses.dataclass(frozen=True)
class LocalCheckpointConfig:
    """Each host's own tier (train/checkpoints/local.py): a save to `dir` every `every` steps, `keep` kept."""

    dir: str | None = None
    every: int = 10
    keep: int = 2

    def __post_init__(self):
        if not isinstance(self.dir, str) or not self.dir or "://" in self.dir:
            raise ConfigError(f"local_checkpoints.dir: must be a directory on each host, got {self.dir!r}")
        for name in ("every", "keep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"local_checkpoints.{name}: must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """Where metrics go besides metrics.jsonl and TensorBoard: `wandb` (None: nowhere else)."""

    wandb: WandbConfig | None = None
