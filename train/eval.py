"""Held-out evaluation: loss, perplexity and token accuracy over fixed batches.

    python -m train.eval --checkpoint DIR --data FILES... [--source chat] [--tokenizer T]
        [--seq-len 2048] [--batch 8] [--batches 8] [--holdout F --seed S] [--layout fsdp]

    evaluator = Evaluator(model_config, data_config, placement, batches=8, tokenizer=tok)
    figures = evaluator(params)   # {"eval_loss", "eval_perplexity", "eval_accuracy", "eval_tokens"}

With another objective (DPO, distillation: train/step.py `Objective`), the
figures are its own metrics over the held-out batches, prefixed "eval_"
(e.g. eval_accuracy is DPO's held-out preference accuracy).

The command prints the same figures as training logs, as one JSON line, for
any checkpoint (ours, a run directory, a LoRA run, Hugging Face).

Every call reads the same `batches` batches from the start of the held-out
data (the pipeline is built once and rewound), so figures from different
steps compare like with like. The loss is the training objective's
cross-entropy (no z-loss), summed over weighted target tokens and divided
once by their count, so it equals one forward pass over all the batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

import jax

from llama_jax.cli import run_cli
from llama_jax.config import ModelConfig
from sharding.place import Placement
from train.data.pipeline import DataConfig, make_dataset
from train.step import Objective, cross_entropy


def eval_data(data: DataConfig, paths: tuple[str, ...] = ()) -> DataConfig:
    """The held-out data of a run: `paths` of the training source, else the `holdout` split."""
    if paths:
        return dataclasses.replace(data, paths=tuple(paths), holdout=0.0, split="train", shuffle=False)
    return dataclasses.replace(data, split="eval", shuffle=False)


class Evaluator:
    """Evaluate parameters on fixed held-out batches (the data shard of this process)."""

    def __init__(self, config: ModelConfig, data: DataConfig, placement: Placement, batches: int,
                 tokenizer=None, shard: tuple[int, int] | None = None, loss_chunk: int = 0,
                 objective: Objective | None = None):
        index, count = shard if shard is not None else (None, None)
        self.data = make_dataset(data, tokenizer=tokenizer, shard_index=index, shard_count=count,
                                 model_vocab_size=config.vocab_size, vision=config.vision)
        self.start = self.data.get_state()
        self.batches, self.placement = batches, placement
        self.perplexity = objective is None  # cross-entropy: the loss is a log-perplexity
        self.objective = objective or cross_entropy(config, 0.0, loss_chunk)
        self.sums = jax.jit(lambda params, frozen, reference, batch:
                            self.objective.sums(params, frozen, reference, batch)[1])

    def __call__(self, params, frozen=None, reference=None) -> dict[str, float]:
        """Figures over the held-out batches for `params` (placed like the run's; with
        `frozen` and `reference` as the objective takes them, see train/step.py)."""
        self.data.set_state(self.start)
        totals: dict[str, float] = {}
        for _ in range(self.batches):
            batch = self.placement.global_batch(next(self.data))
            with self.placement.activate():
                sums = jax.device_get(self.sums(params, frozen or {}, reference or {}, batch))
            totals = {name: totals.get(name, 0.0) + float(value) for name, value in sums.items()}
        weight = totals.pop("weight")
        figures = {f"eval_{name}": value / max(weight, 1.0) for name, value in totals.items() if name != "z_loss"}
        if self.perplexity:
            figures["eval_perplexity"] = math.exp(min(figures["eval_loss"], 80.0))
        return {**figures, f"eval_{self.objective.count}": weight}


def main(argv=None) -> int:
    """The command line; returns the exit status (2 on bad input)."""
    return run_cli(_main, argv, prog="train.eval")


def _main(argv):
    parser = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="our checkpoint, a run directory or a HF directory")
    parser.add_argument("--data", required=True, nargs="+", help="files or globs (or token directories)")
    parser.add_argument("--source", default="text", help="text, chat, completion or tokens (default: text)")
    parser.add_argument("--tokenizer", help="tokenizer file or directory (default: beside the checkpoint)")
    parser.add_argument("--text-key", default="text", help="JSONL field of a text document")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="rows per batch")
    parser.add_argument("--batches", type=int, default=8, help="batches to evaluate")
    parser.add_argument("--holdout", type=float, default=0.0,
                        help="evaluate only the fraction of documents a run with this data.holdout held out")
    parser.add_argument("--seed", type=int, default=0, help="the run's data.seed (it draws the holdout)")
    parser.add_argument("--layout", default="fsdp", help="layout to place the model with (default: fsdp)")
    args = parser.parse_args(argv)

    from llama_jax.text.tokenizer import load_tokenizer
    from llama_jax.formats.weights import load_params, resolve, stored_config
    from sharding.layout import load_layout

    config = stored_config(args.checkpoint)
    tokenizer = None
    if args.source != "tokens":
        tokenizer = load_tokenizer(args.tokenizer or _tokenizer_near(resolve(args.checkpoint)[1]))
    data = DataConfig(source=args.source, paths=tuple(args.data), text_key=args.text_key,
                      seq_len=min(args.seq_len, config.max_seq_len), global_batch=args.batch, shuffle=False,
                      holdout=args.holdout, split="eval" if args.holdout else "train", seed=args.seed)
    placement = Placement.create(config, load_layout(args.layout))
    evaluator = Evaluator(config, data, placement, args.batches, tokenizer)
    params = load_params(args.checkpoint, config, placement.param_shardings())
    figures = evaluator(params)
    print(json.dumps({"checkpoint": str(args.checkpoint), **figures}))


def _tokenizer_near(directory):
    """The tokenizer directory beside a checkpoint (it or one of its two parents)."""
    from llama_jax.text.tokenizer import tokenizer_beside

    found = tokenizer_beside(directory, up=2)
    if found is not None:
        return str(found)
    raise ValueError(f"{directory}: no tokenizer.json or tokenizer.model beside it (pass --tokenizer)")


if __name__ == "__main__":
    sys.exit(main())
