"""python -m train --config configs/runs/<run>.yaml [key=value ...]

Trains as the run config says, resuming from the run directory's latest
checkpoint. Bad input is one line on stderr and exit code 2; a diverged run
(a non-finite loss with on_nonfinite=stop) one line and exit code 1; another
process of the run lost (killed, or silent for peer_timeout seconds) one line
and exit code 3 (train/peers.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

import jax

from llama_jax.cli import run_cli
from llama_jax.paths import check_bucket, user_path
from train.checkpoints import resume_config
from train.config import load_run_config
from train.loop import loss_curve_png, train
from train.nonfinite import DivergenceError
from train.peers import initialize
from train.runtime import CacheCounter, enable_compile_cache, tpu_env


def main(argv=None) -> int:
    return run_cli(_main, argv, prog="train")


def _main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train", description="Pre-train or continue training a Llama model.",
        epilog="Overrides use dotted keys, e.g. steps=100 optimizer.learning_rate=1e-3 "
               "data.global_batch=32 layout=fsdp_tp mesh.tensor=4. A run directory that "
               "holds checkpoints is resumed from its latest complete step.")
    parser.add_argument("--config", required=True,
                        help="run config: a YAML path, a name in configs/runs/, or a run directory "
                             "with checkpoints (continues it with the config saved there)")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first (multi-host TPU pods)")
    parser.add_argument("--coordinator", metavar="HOST:PORT",
                        help="with --distributed, outside a detected cluster: process 0's address "
                             "(with --num-processes and --process-id)")
    parser.add_argument("--num-processes", type=int, metavar="N")
    parser.add_argument("--process-id", type=int, metavar="I")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)  # flags may follow key=value overrides
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in explicit) and (None in explicit or not args.distributed):
        parser.error("--coordinator, --num-processes and --process-id go together, with --distributed")

    # orbax's notes, and asyncio's about futures of a failed save collected at exit,
    # would bury the one-line errors (a run logs them to <run_dir>/orbax.log).
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    check_bucket(args.config)  # a gs:// run directory: bucket and credentials, in one line
    if user_path(args.config).is_dir():
        run = resume_config(args.config, args.overrides)
    else:
        run = load_run_config(args.config, args.overrides)
    if args.distributed:  # after the config, whose peer_timeout sets JAX's heartbeat timeout
        initialize(run.peer_timeout, *explicit)
    os.environ.update(tpu_env(run.tpu_flags))  # read by libtpu when JAX starts its TPU backend
    cache_dir, cache = enable_compile_cache(run.compile_cache), CacheCounter()
    try:
        summary = train(run, progress=not args.quiet, whole_process=True)
    except DivergenceError as err:  # no input error, so not run_cli's exit code 2
        print(f"train: error: {err}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        metrics = summary["metrics"]
        if metrics:
            print(f"step {summary['step']}: loss {metrics['loss']:.4f}, "
                  f"{metrics['tokens_per_s']:,.0f} tokens/s, MFU {metrics['mfu']:.1%} "
                  f"(causal, as MaxText counts: {metrics['mfu_causal']:.1%}; peak: {summary['peak_source']})")
            if "reward_mean" in metrics:
                print(f"rewards: mean {metrics['reward_mean']:.3f}, std {metrics['reward_std']:.3f}; "
                      f"KL {metrics['kl']:.4f}, answers of {metrics['response_length']:.1f} tokens")
            if "eval_perplexity" in metrics:
                print(f"held-out: loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_perplexity']:.2f}, "
                      f"token accuracy {metrics['eval_accuracy']:.1%}")
            elif "eval_margin" in metrics:
                print(f"held-out: loss {metrics['eval_loss']:.4f}, margin {metrics['eval_margin']:.3f}, "
                      f"preference accuracy {metrics['eval_accuracy']:.1%}")
            elif "eval_reward_gap" in metrics:
                print(f"held-out: loss {metrics['eval_loss']:.4f}, reward gap {metrics['eval_reward_gap']:.3f}, "
                      f"pair accuracy {metrics['eval_accuracy']:.1%}")
            elif "eval_loss" in metrics:
                print(f"held-out: loss {metrics['eval_loss']:.4f}, token accuracy {metrics['eval_accuracy']:.1%}")
            print(f"loss curve: {loss_curve_png(summary['run_dir'])}")
        if cache_dir is not None:
            print(f"compile cache: {cache.hits} hits, {cache.misses} misses ({cache_dir})")
        if summary["preempted"]:
            print(f"preempted: saved step {summary['step']}; run the same command to resume")
    if args.distributed:
        jax.distributed.shutdown()
    return 0


def _exit_now(code: int):
    """Exit with `code`. After a failure, library threads may still wait on storage that
    stopped answering (orbax's, on tensorstore writes that it retries for a quarter of an
    hour): Python joins them before exiting, so a failed run leaves without them."""
    waiting = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if code and waiting:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit_now(main())
