"""Streaming weight converters: Meta and Hugging Face in, Hugging Face out.

    python -m llama_jax.convert.hf_to_ours   HF_DIR OUT_DIR [--dtype bfloat16]
    python -m llama_jax.convert.meta_to_ours META_DIR OUT_DIR [--vocab-size N] [--rope-scaling F]
    python -m llama_jax.convert.ours_to_hf   CKPT_DIR OUT_DIR [--dtype bfloat16] [--tokenizer DIR]
    python -m llama_jax.convert.quantize     CKPT_OR_HF_DIR OUT_DIR --quantize int8|fp8

Every converter moves one tensor (Meta: one layer's shards) at a time, so
host memory stays bounded by a few tensors, never the model (see each
module's docstring for its bound). Output goes to a hidden sibling directory
that is renamed into place at the end and removed on any error, so a failed
run never leaves a partial output behind. Inputs and outputs may be local
or gs:// paths (llama_jax/paths.py); on gs:// the final rename is a
server-side copy of each object. Bad input ends in one line on stderr and
exit code 2.

This module holds what they share: the staged output directory, the
progress bar (the command-line error handling is llama_jax.cli.run_cli).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from etils import epath
from tqdm import tqdm

from llama_jax.paths import check_bucket, is_url, remove_tree, user_path

DTYPES = ("bfloat16", "float32")


class ConvertError(ValueError):
    """Input a user can fix (one-line message)."""


@contextlib.contextmanager
def staged_output(output: str | os.PathLike) -> Iterator[epath.Path]:
    """Yield a temporary sibling of `output`; rename it to `output` on success, delete it on error."""
    check_bucket(output)
    output = user_path(output)
    if output.exists():
        raise ConvertError(f"{output}: output already exists (choose a new path)")
    if not is_url(output) and not output.parent.is_dir():  # gs:// has no directories to lack
        raise ConvertError(f"{output.parent}: parent directory of the output not found")
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    remove_tree(staging)
    staging.mkdir()
    try:
        yield staging
        staging.rename(output)
    except BaseException:
        remove_tree(staging)
        raise


def progress(total: int, desc: str, enabled: bool = True) -> tqdm:
    """A tqdm bar on stderr counting tensors."""
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, file=sys.stderr, dynamic_ncols=True)
