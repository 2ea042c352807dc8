"""Hugging Face safetensors directory -> our orbax checkpoint, tensor by tensor.

    python -m llama_jax.convert.hf_to_ours HF_DIR OUT_DIR [--dtype bfloat16] [--step 0]

Reads config.json and the safetensors files (one file or an index of shards)
through `llama_jax.formats.hf.hf_weights`, one tensor at a time, and writes each
tensor into the checkpoint with `ParamsWriter` (layer slices straight into the
stacked on-disk arrays).

Memory bound: baseline + about 2x the largest tensor. At any moment two of:
the source tensor as read, our contiguous copy in the target dtype (none if
the source already is one), tensorstore's zstd output for it (tensorstore
encodes from our copy, and its freed buffers go back to the OS after each
tensor). Measured on 317 MiB of float32 random normal weights whose largest
tensors are the 125 MiB embedding and head: 1.5x to bfloat16, 2.0x to
float32 (tests/test_convert.py asserts < 1.75x and < 2.25x). For Llama 3.1
405B in bf16 the largest tensor is the 4.2 GB embedding.
"""

from __future__ import annotations

import argparse
import os

from llama_jax.formats.checkpoint_io import ParamsWriter, as_contiguous
from llama_jax.cli import run_cli
from llama_jax.config import ModelConfig
from llama_jax.convert import DTYPES, ConvertError, progress, staged_output
from llama_jax.formats.hf import hf_tensors, hf_weights, read_hf_config
from llama_jax.paths import check_bucket, user_path


def convert_hf_to_ours(hf_dir: str | os.PathLike, output: str | os.PathLike, dtype: str = "bfloat16", step: int = 0,
                       show_progress: bool = True) -> ModelConfig:
    """Convert a HF Llama checkpoint directory into a new checkpoint directory `output`.

    Params are stored in `dtype` (the config's param_dtype is set to it).
    Returns the stored config. Raises a ValueError subclass on bad input.
    """
    check_bucket(hf_dir)
    hf_dir = user_path(hf_dir)
    if not hf_dir.is_dir():
        raise ConvertError(f"{hf_dir}: directory not found")
    config = read_hf_config(hf_dir).replace(param_dtype=dtype)
    with staged_output(output) as staging, ParamsWriter(staging, config, step) as writer:
        with progress(len(hf_tensors(config)), "hf -> ours", show_progress) as bar:
            for path, index, weight in hf_weights(hf_dir, config):
                weight = as_contiguous(weight, writer.dtype)  # drops the source copy
                writer.write(path, index, weight)
                del weight
                bar.update()
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llama_jax.convert.hf_to_ours", description=__doc__.split("\n")[0])
    parser.add_argument("hf_dir", help="directory with config.json and model*.safetensors")
    parser.add_argument("output", help="new checkpoint directory to create")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="stored parameter dtype")
    parser.add_argument("--step", type=int, default=0, help="step number to save under")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    config = convert_hf_to_ours(args.hf_dir, args.output, args.dtype, args.step, not args.no_progress)
    print(f"wrote {args.output} (step {args.step}, {config.n_layers} layers, {args.dtype})")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
