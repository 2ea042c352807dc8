"""Held-out evaluation: loss, perplexity and token accuracy over fixed batches.

    evaluator = Evaluator(model_config, data_config, placement, batches=8, tokenizer=tok)
    figures = evaluator(params)   # {"eval_loss", "eval_perplexity", "eval_accuracy", "eval_tokens"}

Every call reads the same `batches` batches from the start of the held-out
data (the pipeline is built once and rewound), so figures from different
steps compare like with like. The loss is the training objective's
cross-entropy (no z-loss), summed over weighted target tokens and divided
once by their count, so it equals one forward pass over all the batches.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from llama_jax.config import ModelConfig
from llama_jax.model import Llama
from sharding.place import Placement
from train.data import DataConfig, make_dataset
from train.step import loss_sums


def eval_data(data: DataConfig, paths: tuple[str, ...] = ()) -> DataConfig:
    """The held-out data of a run: `paths` of the training source, else the `holdout` split."""
    if paths:
        return dataclasses.replace(data, paths=tuple(paths), holdout=0.0, split="train", shuffle=False)
    return dataclasses.replace(data, split="eval", shuffle=False)


class Evaluator:
    """Evaluate parameters on fixed held-out batches (the data shard of this process)."""

    def __init__(self, config: ModelConfig, data: DataConfig, placement: Placement, batches: int,
                 tokenizer=None, shard: tuple[int, int] | None = None, loss_chunk: int = 0):
        index, count = shard if shard is not None else (None, None)
        self.data = make_dataset(data, tokenizer=tokenizer, shard_index=index, shard_count=count,
                                 model_vocab_size=config.vocab_size)
        self.start = self.data.get_state()
        self.batches, self.placement = batches, placement
        model = Llama(config)
        self.sums = jax.jit(lambda params, batch: loss_sums(model, params, batch, 0.0, loss_chunk)[1])

    def __call__(self, params) -> dict[str, float]:
        """Figures over the held-out batches for `params` (placed like the run's)."""
        self.data.set_state(self.start)
        nll = correct = weight = 0.0
        for _ in range(self.batches):
            batch = self.placement.global_batch(next(self.data))
            with self.placement.activate():
                batch_nll, _, batch_correct, batch_weight = jax.device_get(self.sums(params, batch))
            nll, correct, weight = nll + float(batch_nll), correct + float(batch_correct), weight + float(batch_weight)
        loss = nll / max(weight, 1.0)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0)),
                "eval_accuracy": correct / max(weight, 1.0), "eval_tokens": weight}
