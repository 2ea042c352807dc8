"""Rewards of sampled answers: a Python function (verifiable rewards) or a reward model.

Both are called as `reward(index_b, answers_bn, batch) -> float32 [b]`: index_b the prompts'
line indices (int [b], train/data/example_rows.py `PromptRows`), answers_bn the sampled ids
(int [b, n], NO_TOKEN past each end), batch the update rows on the mesh (train/rl/rollout.py).

- `FunctionReward`: "module:function" (as infer.rejection takes it), called on the host as
  function(messages, answer) -> float with the prompt's conversation and the answer's text
  (stop token dropped). One that raises, or returns something that is not a finite number,
  stops the run with one line naming it and the prompt.
- `ModelReward`: a reward model (a Llama with the score head, llama_jax/model/reward.py) on
  the run's mesh, reading each row at its last token (prompt and answer as the policy saw
  them). Its vocabulary must be the policy's: it scores the policy's token ids.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from llama_jax.cli import first_line, load_function
from llama_jax.config import ConfigError, ModelConfig
from llama_jax.decoding.programs import NO_TOKEN
from llama_jax.formats.weights import load_params, stored_config
from llama_jax.model.llama import Llama
from llama_jax.model.reward import last_scores
from sharding.place import Placement


class RewardError(ValueError):
    """A reward function that failed or gave no finite number (one line)."""


class FunctionReward:
    """A verifiable reward: `path` ("module:function") over `prompts` (train/data/sources.py
    `Prompts`), answers decoded by `tokenizer`."""

    def __init__(self, path: str, prompts, tokenizer):
        self.path, self.prompts, self.tokenizer = path, prompts, tokenizer
        self.function = load_function(path, "grpo.reward")

    def __call__(self, index_b, answers_bn, batch=None) -> np.ndarray:
        stops = self.tokenizer.stop_ids
        out = np.zeros(len(index_b), np.float32)
        for row, (i, ids) in enumerate(zip(index_b, answers_bn)):
            i = int(i)
            answer = _decode(self.tokenizer, [int(x) for x in ids if x != NO_TOKEN and int(x) not in stops])
            where = f"prompt {i} ({self.prompts.location(i)}), sample row {row}"
            try:
                value = self.function(self.prompts.messages(i), answer)
            except Exception as err:  # the user's code: any failure is theirs to see, in one line
                raise RewardError(f"grpo.reward {self.path} raised {type(err).__name__} on {where}: "
                                  f"{first_line(err)}"[:300]) from None
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(value):
                raise RewardError(f"grpo.reward {self.path} returned {value!r} on {where}; a reward must be a "
                                  "finite number")
            out[row] = value
        return out


def _decode(tokenizer, ids: list[int]) -> str:
    """The answer's text; an id past the tokenizer's vocabulary (the model's table may be larger,
    rounded up) reads as U+FFFD, as bytes that are not UTF-8 do."""
    text, run = "", []
    for i in ids + [None]:
        if i is not None and i < tokenizer.vocab_size:
            run.append(i)
            continue
        text += tokenizer.decode(run) if run else ""
        text += "\ufffd" if i is not None else ""
        run = []
    return text


def reward_model_config(checkpoint: str, policy: ModelConfig) -> ModelConfig:
    """The reward model's stored config; ConfigError (one line) unless it has the score head and the
    policy's vocabulary."""
    config = stored_config(checkpoint)
    if config.head != "score":
        raise ConfigError(f"grpo.reward_model {checkpoint}: a model with the next-token head, not a reward "
                          "model (score head); train one with a reward section")
    if config.vocab_size != policy.vocab_size:
        raise ConfigError(f"grpo.reward_model {checkpoint}: a vocabulary of {config.vocab_size} ids, the "
                          f"policy's has {policy.vocab_size}; it scores the policy's tokens, so it needs the "
                          "policy's tokenizer")
    return config


class ModelReward:
    """A reward model's score of each rollout row, on `placement`'s mesh (the run's layout)."""

    def __init__(self, checkpoint: str, config: ModelConfig, placement: Placement):
        self.placement = placement
        self.params = load_params(checkpoint, config, placement.param_shardings())
        model = Llama(config)

        def score(params, batch):
            scores_bt, _ = model.apply({"params": params}, batch["tokens"], batch["positions"],
                                       batch["segment_ids"])
            return last_scores(scores_bt, batch["segment_ids"] > 0)

        self._score = jax.jit(score)

    def __call__(self, index_b, answers_bn, batch) -> np.ndarray:
        with self.placement.activate():
            rows = {key: batch[key] for key in ("tokens", "positions", "segment_ids")}
            return np.asarray(jax.device_get(self._score(self.params, rows)), np.float32)
