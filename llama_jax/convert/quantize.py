"""Quantise a checkpoint once, offline: ours or Hugging Face in, our checkpoint out.

    python -m llama_jax.convert.quantize SOURCE OUT_DIR --quantize int8|fp8 [--dtype bfloat16] [--step 0]

SOURCE is our checkpoint directory (latest step) or a Hugging Face one
(config.json + safetensors). The output stores the quantised kernels (int8
or float8_e4m3fn values and their float32 per-output-channel `scale`s, see
llama_jax/model/quantize.py) and every other weight in `--dtype`, with the
quantize setting in its config, so `python -m infer --checkpoint OUT_DIR`
serves it as it is. What is quantised: int8, every projection of every
layer; fp8, Llama 3's recipe for 405B (feed-forward weights, not the first
and last layers; ModelConfig.stacked_layers says why those two stay).

Streamed like the other converters: one tensor (or layer slice) is read,
quantised and written at a time, so host memory stays within a few copies
of the largest tensor; a 405B FP8 checkpoint is written once and served
from then on without re-quantising.
"""

from __future__ import annotations

import argparse
import os

from llama_jax.formats.assemble import ParamsBuilder, checkpoint_weights
from llama_jax.formats.checkpoint import read_config
from llama_jax.formats.checkpoint_io import ParamsWriter
from llama_jax.cli import run_cli
from llama_jax.config import QUANTIZE_TARGETS, ModelConfig
from llama_jax.convert import DTYPES, ConvertError, progress, staged_output
from llama_jax.formats.hf import hf_weights, read_hf_config
from llama_jax.paths import user_path
from llama_jax.model.quantize import require_fp8


def quantize_checkpoint(source: str | os.PathLike, output: str | os.PathLike, quantize: str, dtype: str = "bfloat16",
                        step: int = 0, show_progress: bool = True) -> ModelConfig:
    """Write a quantised copy of checkpoint `source` (ours or HF) as a new checkpoint `output`.

    Returns the stored config. Raises a ValueError subclass (one line) on bad input.
    """
    source = user_path(source)
    if quantize not in QUANTIZE_TARGETS:
        raise ConvertError(f"--quantize: unknown {quantize!r} (known: {', '.join(QUANTIZE_TARGETS)})")
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype: unknown {dtype!r} (known: {', '.join(DTYPES)})")
    if not source.is_dir():
        raise ConvertError(f"{source}: directory not found")
    if quantize == "fp8":
        require_fp8()
    is_hf = (source / "config.json").is_file()
    stored = read_hf_config(source) if is_hf else read_config(source)
    if stored.quantize is not None:
        raise ConvertError(f"{source}: already quantised ({stored.quantize}); quantise the unquantised checkpoint")
    config = stored.replace(scan_layers=True, quantize=quantize, param_dtype=dtype)
    weights = hf_weights(source, config) if is_hf else checkpoint_weights(source, config)
    builder = ParamsBuilder(config)
    total = len(builder.leaves)
    with staged_output(output) as staging, ParamsWriter(staging, config, step) as writer, \
            progress(total, f"quantise ({quantize})", show_progress) as bar:
        done = set()
        for path, index, array in weights:
            for piece_path, piece_index, piece in builder.pieces(path, index, array):
                writer.write(piece_path, piece_index, piece)
                if piece_path not in done:
                    done.add(piece_path)
                    bar.update()
            del array
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llama_jax.convert.quantize",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("source", help="our checkpoint directory, or a HF directory with config.json")
    parser.add_argument("output", help="new checkpoint directory to create")
    parser.add_argument("--quantize", required=True, metavar="KIND", help="int8 or fp8")
    parser.add_argument("--dtype", default="bfloat16", metavar="DTYPE",
                        help="dtype of the weights that stay unquantised (default bfloat16)")
    parser.add_argument("--step", type=int, default=0, help="step number to save under")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    config = quantize_checkpoint(args.source, args.output, args.quantize, args.dtype, args.step,
                                 not args.no_progress)
    print(f"wrote {args.output} (step {args.step}, {config.n_layers} layers, {args.quantize} weights, "
          f"the rest {args.dtype})")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
