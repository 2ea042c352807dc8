"""Held-out evaluation: loss, perplexity and token accuracy over fixed batches; or benchmarks.

    python -m train.eval --checkpoint DIR --data FILES... [--source chat] [--tokenizer T]
        [--seq-len 2048] [--batch 8] [--batches 8] [--holdout F --seed S] [--layout fsdp]
    python -m train.eval --checkpoint DIR --tasks hellaswag,arc_easy [--limit N] [--output results.json]
        [--num-fewshot K] [--include-path DIR] [--dtype bfloat16] [--batch 8] [--layout fsdp]

With --tasks, the checkpoint runs lm-eval's tasks (EleutherAI's LM
Evaluation Harness, through train/lm_eval/: the `llama-jax` model type)
and the command prints lm-eval's table and writes its results as JSON.

    evaluator = Evaluator(model_config, data_config, placement, batches=8, tokenizer=tok)
    figures = evaluator(params)   # {"eval_loss", "eval_perplexity", "eval_accuracy", "eval_tokens"}

With another objective (DPO, distillation: train/objectives/objective.py `Objective`), the
figures are its own metrics over the held-out batches, prefixed "eval_"
(e.g. eval_accuracy is DPO's held-out preference accuracy). A reward model (a
checkpoint with the score head) is evaluated on preference pairs (--source
preference, its default): eval_accuracy is the share of held-out pairs whose
chosen answer it scores higher, eval_reward_gap the mean r_chosen - r_rejected.

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
from train.data.config import DataConfig
from train.data.pipeline import make_dataset
from train.objectives.cross_entropy import cross_entropy
from train.objectives.objective import Objective
from train.objectives.reward import reward
from llama_jax.formats.weights import load_params, resolve, stored_config
from llama_jax.text.tokenizer import find_tokenizer, load_tokenizer
from sharding.layout import load_layout


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
        scoring = config.head == "score"  # a reward model: its pairs, its Bradley-Terry loss
        if scoring and data.source != "preference":
            raise ValueError(f"a reward model (score head) is evaluated on preference pairs, not "
                             f"{data.source!r} data: pass --source preference")
        self.data = make_dataset(data, tokenizer=tokenizer, shard_index=index, shard_count=count,
                                 model_vocab_size=config.vocab_size, vision=config.vision, reward=scoring)
        self.start = self.data.get_state()
        self.batches, self.placement = batches, placement
        self.perplexity = objective is None and not scoring  # cross-entropy: the loss is a log-perplexity
        self.objective = objective or (reward(config) if scoring else cross_entropy(config, 0.0, loss_chunk))
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
    parser.add_argument("--data", nargs="+", help="files or globs (or token directories) of held-out data")
    parser.add_argument("--source", help="text, chat, completion, preference or tokens (default: text; "
                        "preference for a reward model)")
    parser.add_argument("--tokenizer", help="tokenizer file or directory (default: beside the checkpoint)")
    parser.add_argument("--text-key", default="text", help="JSONL field of a text document")
    parser.add_argument("--seq-len", type=int, help="tokens per row (default: 2048; with --tasks: the "
                        "longest sequence read, default the model's context)")
    parser.add_argument("--batch", type=int, default=8, help="rows per batch")
    parser.add_argument("--batches", type=int, default=8, help="batches to evaluate")
    parser.add_argument("--holdout", type=float, default=0.0,
                        help="evaluate only the fraction of documents a run with this data.holdout held out")
    parser.add_argument("--seed", type=int, default=0, help="the run's data.seed (it draws the holdout)")
    parser.add_argument("--layout", default="fsdp", help="layout to place the model with (default: fsdp)")
    benchmarks = parser.add_argument_group("benchmarks (lm-eval tasks, instead of --data)")
    benchmarks.add_argument("--tasks", help="comma-separated lm-eval task, group or tag names")
    benchmarks.add_argument("--limit", type=float, help="documents per task (a count, or a fraction below 1)")
    benchmarks.add_argument("--num-fewshot", type=int, help="examples in each prompt (default: the task's)")
    benchmarks.add_argument("--include-path", help="a directory of your own task YAMLs")
    benchmarks.add_argument("--output", help="write lm-eval's results to this JSON file")
    benchmarks.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: the checkpoint's")
    args = parser.parse_args(argv)
    if args.tasks and args.data:
        raise ValueError("--tasks and --data: pass one (lm-eval benchmarks, or the held-out loss)")
    if args.tasks:
        return _benchmarks(args)
    if not args.data:
        raise ValueError("pass --data FILES (held-out loss) or --tasks NAMES (lm-eval benchmarks)")


    config = stored_config(args.checkpoint)
    if args.source is None:
        args.source = "preference" if config.head == "score" else "text"
    tokenizer = None
    if args.source != "tokens":
        tokenizer = load_tokenizer(args.tokenizer or find_tokenizer(resolve(args.checkpoint)[1], up=2))
    data = DataConfig(source=args.source, paths=tuple(args.data), text_key=args.text_key,
                      seq_len=min(args.seq_len or 2048, config.max_seq_len), global_batch=args.batch, shuffle=False,
                      holdout=args.holdout, split="eval" if args.holdout else "train", seed=args.seed)
    placement = Placement.create(config, load_layout(args.layout))
    evaluator = Evaluator(config, data, placement, args.batches, tokenizer)
    params = load_params(args.checkpoint, config, placement.param_shardings())
    figures = evaluator(params)
    print(json.dumps({"checkpoint": str(args.checkpoint), **figures}))


def _benchmarks(args):
    """--tasks: lm-eval on the checkpoint (train/lm_eval/run.py `evaluate_checkpoint`)."""
    try:
        import lm_eval  # noqa: F401  (an optional dependency: say how to get it)

        from train.lm_eval.run import evaluate_checkpoint  # imports lm-eval
    except ModuleNotFoundError as err:
        raise ValueError(f"--tasks needs lm-eval ({err}): pip install 'llama-jax[eval]'") from None
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    evaluate_checkpoint(args.checkpoint, [t for t in args.tasks.split(",") if t], include_path=args.include_path,
                        limit=limit, num_fewshot=args.num_fewshot, output=args.output, tokenizer=args.tokenizer,
                        layout=args.layout, dtype=args.dtype, batch_size=args.batch, max_length=args.seq_len)


if __name__ == "__main__":
    sys.exit(main())
