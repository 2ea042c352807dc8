"""`python -m train.lm_eval`: lm-eval's own command line, with the `llama-jax` model type.

    python -m train.lm_eval --model llama-jax --model_args checkpoint=DIR,layout=fsdp,dtype=bfloat16 \\
        --tasks arc_easy,llama_jax_tiny --include_path my_tasks/ --output_path results/ --limit 100
    python -m train.lm_eval ls tasks

Every flag is lm-eval's (`lm-eval run --help`); `--model` defaults to
llama-jax and `--batch_size` to 16 rows, and the shipped offline tasks
(train/lm_eval/tasks/) are found beside any --include_path. Bad input (an unknown task, a dataset that
cannot be reached, a missing checkpoint) is one line and exit code 2.
"""

from __future__ import annotations

import contextlib
import sys

from llama_jax.cli import run_cli

PROG = "train.lm_eval"


def main(argv=None) -> int:
    """The command line; returns the exit status (2 on bad input)."""
    return run_cli(_main, sys.argv[1:] if argv is None else list(argv), prog=PROG)


def _main(argv: list[str]) -> None:
    try:
        import lm_eval.models  # noqa: F401  (lm-eval fills its registry only while it is empty)
    except ModuleNotFoundError as err:
        raise ValueError(f"lm-eval is not installed ({err}): pip install 'llama-jax[eval]'") from None
    from lm_eval._cli import HarnessCLI  # what lm-eval's own `lm-eval` command runs
    from lm_eval.utils import setup_logging

    from train.lm_eval.model import DEFAULT_BATCH  # importing it registers llama-jax
    from train.lm_eval.run import include_paths, reachable_datasets

    argv = _with_defaults(argv, DEFAULT_BATCH)
    setup_logging()
    cli = HarnessCLI()
    with _argv([f"python -m {PROG}", *argv]):
        args = cli.parse_args()
    if hasattr(args, "include_path") and not (getattr(args, "config", None) and args.include_path is None):
        args.include_path = include_paths(args.include_path)
    with reachable_datasets(), _unknown_tasks():
        cli.execute(args)


def _with_defaults(argv: list[str], batch: int) -> list[str]:
    """An evaluation's arguments with `--model llama-jax` unless another model is named, and for
    llama-jax `--batch_size batch` unless a batch size is given (lm-eval's default is one row)."""
    if not argv or argv[0] in ("ls", "validate", "-h", "--help"):
        return argv
    models = [value for flag, value in zip(argv, argv[1:]) if flag in ("--model", "-M")]
    models += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--model=")]
    if not models:
        argv = [*argv, "--model", "llama-jax"]
    if models in ([], ["llama-jax"]) and not any(arg in ("-b", "--batch_size") or "batch_size=" in arg
                                                  for arg in argv):
        argv = [*argv, "--batch_size", str(batch)]
    return argv


@contextlib.contextmanager
def _argv(argv: list[str]):
    """sys.argv set to `argv` for lm-eval's parser (it reads sys.argv itself)."""
    saved, sys.argv = sys.argv, argv
    try:
        yield
    finally:
        sys.argv = saved


@contextlib.contextmanager
def _unknown_tasks():
    """lm-eval's "Tasks not found" error, with where tasks come from."""
    try:
        yield
    except ValueError as err:
        if str(err).startswith("Tasks not found"):
            raise ValueError(f"{err} (list them with `python -m {PROG} ls tasks`; pass your own task YAMLs' "
                             "directory with --include_path)") from None
        raise


if __name__ == "__main__":
    sys.exit(main())
