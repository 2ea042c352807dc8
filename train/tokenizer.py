"""python -m train.tokenizer --input FILES_OR_GLOBS --vocab-size N --output PATH

Trains a tokenizer on local text for a model trained from scratch: a
Llama-3-style byte-level BPE in tiktoken's format (default) or a Llama-2-style
SentencePiece model. The file loads with `llama_jax.text.tokenizer.load_tokenizer`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llama_jax.cli import run_cli


def _read_texts(files):
    for path in files:
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a stray binary or latin-1 file among sources teaches nothing


def main(argv=None) -> int:
    """The command line; returns the exit status (2 on bad input)."""
    return run_cli(_main, argv, prog="tokenizer")


def _main(argv):
    parser = argparse.ArgumentParser(prog="python -m train.tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="text files or globs (** allowed)")
    parser.add_argument("--vocab-size", type=int, required=True,
                        help="regular tokens (bpe: 256 byte tokens included; 256 special tokens are added)")
    parser.add_argument("--output", required=True, help="tokenizer file to write")
    parser.add_argument("--kind", choices=("bpe", "sentencepiece"), default="bpe")
    args = parser.parse_args(argv)

    from llama_jax.text.tokenizer_training import train_bpe, train_sentencepiece
    from train.data.sources import expand_paths

    output = Path(args.output)
    files = expand_paths(args.input)
    if args.vocab_size < 256:
        raise ValueError(f"--vocab-size {args.vocab_size} is below the 256 byte tokens")
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    trainer = train_bpe if args.kind == "bpe" else train_sentencepiece
    print(f"training a {args.kind} tokenizer on {len(files)} files ...", file=sys.stderr)
    try:
        trainer(_read_texts(files), args.vocab_size, partial)
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)  # a failed training leaves nothing behind
    print(f"wrote {output}")


if __name__ == "__main__":
    sys.exit(main())
