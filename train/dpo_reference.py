"""Compute a DPO run's reference log-probabilities once and store them beside its pairs.

    python -m train.dpo_reference --config RUN [key=value ...] --out FILE

For every preference pair of the run's data.paths (all of them, the held-out
ones too), in file order: the log-probability of its chosen and of its rejected
answer under the reference the run would hold (dpo.reference, else init_from,
else the policy's random start drawn from the run's seed; a LoRA run's base),
computed as the run computes them (layout, loss_chunk), data.global_batch pairs
at a time. The same run with `data.reference_log_probs=FILE` then reads them
instead of holding a reference model (train/data/reference_log_probs.py: the file).
Bad input is one line on stderr and exit status 2; FILE (local or gs://) is
written once, when every pair is done.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import numpy as np
from tqdm import tqdm

from llama_jax.cli import run_cli
from llama_jax.model.llama import Llama
from sharding.layout import load_layout
from sharding.place import Placement, validate
from train.config import RunConfig
from train.objectives.dpo import answer_log_probs
from train.data.example_rows import PairRows, example_row, fit_pair
from train.objectives.run import dpo_reference_params
from train.data.reference_log_probs import pair_digest, write_reference_log_probs
from train.data.sources import Preferences
from train.step import BATCH_KEYS, batch_shardings


def reference_log_probs(run: RunConfig, progress: bool = True) -> tuple[list, list, list]:
    """(chosen, rejected, digests): per pair of `run`'s preference files, in order, its
    answers' log-probabilities under the run's reference and its `pair_digest`, both of
    the pair as its row holds it (`fit_pair`: cut to seq_len); None for the three where
    its answers alone do not fit."""
    from llama_jax.text.tokenizer import load_tokenizer

    config = run.model.replace(lora=None)  # a LoRA run's reference is its base
    layout = load_layout(run.layout, **run.mesh)
    placement = Placement.create(config, layout)
    batch = run.data.global_batch
    validate(config, layout, placement.mesh, batch=batch, seq_len=run.data.seq_len)
    tokenizer = load_tokenizer(run.data.tokenizer or run.tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer: vocabulary of {tokenizer.vocab_size} exceeds the model's vocab_size "
                         f"{config.vocab_size}")
    data = dataclasses.replace(run.data, holdout=0.0, reference_log_probs=None)
    pairs = Preferences(data.paths, tokenizer)
    kept = PairRows(pairs, np.arange(len(pairs)), data).pairs
    params = dpo_reference_params(run, placement.param_shardings(), config)
    log_probs = jax.jit(lambda params, rows: answer_log_probs(Llama(config), params, rows, run.loss_chunk),
                        out_shardings=placement.sharding())  # replicated: every process reads them all
    shardings = batch_shardings(placement)
    chosen, rejected, digests = [None] * len(pairs), [None] * len(pairs), [None] * len(pairs)
    padding = example_row([], data.seq_len)  # fills the last batch; its sums are not read
    with placement.activate():
        for start in tqdm(range(0, len(kept), batch), desc="reference log-probs", unit="batch",
                          disable=not progress or jax.process_index() != 0):
            picked = kept[start:start + batch]
            conversations = [fit_pair(pairs[i], data.seq_len) for i in picked]
            rows = [example_row(list(c), data.seq_len) for c in conversations]
            rows += [padding] * (batch - len(rows))
            stacked = {key: np.stack([row[key] for row in rows]) for key in BATCH_KEYS}
            chosen_b, rejected_b = jax.device_get(log_probs(params, placement.put(stacked, shardings)))
            for j, (i, c) in enumerate(zip(picked, conversations)):
                chosen[i], rejected[i], digests[i] = float(chosen_b[j]), float(rejected_b[j]), pair_digest(c)
    return chosen, rejected, digests


def main(argv=None) -> int:
    """The command line; returns the exit status (2 on bad input)."""
    return run_cli(_main, argv, prog="train.dpo_reference")


def _main(argv):
    parser = argparse.ArgumentParser(prog="python -m train.dpo_reference", description=__doc__.splitlines()[0],
                                     epilog="Then train with data.reference_log_probs=FILE (no reference model).")
    parser.add_argument("--config", required=True, help="the DPO run config: a YAML path or a name in configs/runs/")
    parser.add_argument("--out", required=True, help="the file to write (local or gs://)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="as for python -m train")
    args = parser.parse_intermixed_args(argv)

    from llama_jax.config import ConfigError
    from llama_jax.paths import check_bucket, is_url, user_path
    from train.config import load_run_config

    run = load_run_config(args.config, args.overrides)
    if run.dpo is None:
        raise ConfigError(f"{args.config}: not a DPO run (it needs a dpo section and data.source preference)")
    check_bucket(args.out)
    if not is_url(args.out) and not user_path(args.out).parent.is_dir():
        raise ConfigError(f"--out {args.out}: its directory does not exist")
    chosen, rejected, digests = reference_log_probs(run, progress=not args.quiet)
    if jax.process_index() == 0:
        reference = run.dpo.reference or run.init_from or f"the policy's random start (seed {run.seed})"
        write_reference_log_probs(args.out, reference, run.data.seq_len, chosen, rejected, digests)
    done = sum(d is not None for d in digests)
    print(f"{done} of {len(digests)} preference pairs ({len(digests) - done} with answers too long for seq_len) "
          f"-> {args.out}")


if __name__ == "__main__":
    sys.exit(main())
