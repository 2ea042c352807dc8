"""Streaming weight converters: Meta and Hugging Face in, Hugging Face out.

    python -m llama_jax.convert.hf_to_ours   HF_DIR OUT_DIR [--dtype bfloat16]
    python -m llama_jax.convert.meta_to_ours META_DIR OUT_DIR [--vocab-size N] [--rope-scaling F]
    python -m llama_jax.convert.ours_to_hf   CKPT_DIR OUT_DIR [--dtype bfloat16] [--tokenizer DIR]
    python -m llama_jax.convert.quantize     CKPT_OR_HF_DIR OUT_DIR --quantize int8|fp8

Every converter moves one tensor (Meta: one layer's shards) at a time, so
host memory stays bounded by a few tensors, never the model (see each
module's docstring for its bound). Output goes to a hidden sibling directory
that is renamed into place at the end and removed on any error, so a failed
run never leaves a partial output behind. Bad input ends in one line on
stderr and exit code 2.

This module holds what they share: the staged output directory, the
progress bar and the command-line error handling.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

DTYPES = ("bfloat16", "float32")


class ConvertError(ValueError):
    """Input a user can fix (one-line message)."""


@contextlib.contextmanager
def staged_output(output: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `output`; rename it to `output` on success, delete it on error."""
    output = Path(output).absolute()
    if output.exists():
        raise ConvertError(f"{output}: output already exists (choose a new path)")
    if not output.parent.is_dir():
        raise ConvertError(f"{output.parent}: parent directory of the output not found")
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def progress(total: int, desc: str, enabled: bool = True) -> tqdm:
    """A tqdm bar on stderr counting tensors."""
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def run_cli(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> int:
    """Run a converter's main; a user-fixable error becomes one line on stderr and exit code 2."""
    try:
        main(argv)
    except (ValueError, OSError) as err:
        text = str(err).strip().splitlines()
        print(f"error: {text[0] if text else type(err).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0
